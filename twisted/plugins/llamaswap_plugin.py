"""twistd plugin: ``twistd llamaswap --config cfg.yaml``.

Only ServiceMaker is imported here: twistd imports every plugin before it reads
``--reactor``, so importing a reactor (or anything that does) would break
``--reactor`` for every twistd on the machine.
"""
from twisted.application.service import ServiceMaker

LlamaSwap = ServiceMaker(
    "llamaswap",
    "llamaswap.tap",
    "Swap local LLM servers (llama.cpp, vLLM, ...) on demand behind one OpenAI-compatible endpoint.",
    "llamaswap",
)
