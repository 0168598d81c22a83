"""Every config in examples/ loads without errors or warnings, and the demo is what the README promises."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamaswap.demo.tinymodels import MODELS

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))


def load(path: Path):
    from llamaswap.config import ConfigError, load_config

    try:
        return load_config(str(path))
    except ConfigError as e:
        pytest.fail(f"{path.name} does not load:\n  " + "\n  ".join(e.errors))


def test_examples_exist():
    """The three documented examples are there."""
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "llama-swap-style.yaml", "minimal.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_loads_cleanly(path):
    """The example loads with load_config: no error, no warning, no later-phase key."""
    config = load(path)
    assert config.models, "an example without models"
    assert list(config.warnings) == []
    assert list(config.later_keys) == []


def test_demo_models_and_groups():
    """demo.yaml: chat-a/chat-b swap in one group; embed and rerank run beside them in a persistent group."""
    config = load(EXAMPLES / "demo.yaml")
    assert list(config.models) == ["chat-a", "chat-b", "embed", "rerank"]
    chat, helpers = config.groups["chat"], config.groups["helpers"]
    assert (chat.swap, chat.exclusive, chat.persistent, set(chat.members)) == (True, True, False, {"chat-a", "chat-b"})
    assert (helpers.swap, helpers.exclusive, helpers.persistent, set(helpers.members)) == (
        False, False, True, {"embed", "rerank"})


def test_demo_commands():
    """Each demo model runs llamaswap-llama-server on the tiny model of the same name, on its own port."""
    config = load(EXAMPLES / "demo.yaml")
    ports = set()
    for model_id, model in config.models.items():
        argv = list(model.argv)
        assert argv[0] == "llamaswap-llama-server"
        assert argv[argv.index("--tiny") + 1] == model_id
        assert model_id in MODELS
        assert argv[argv.index("--alias") + 1] == model_id
        assert argv[argv.index("--host") + 1] == "127.0.0.1"
        port = int(argv[argv.index("--port") + 1])
        assert model.port == port
        assert model.proxy == f"http://127.0.0.1:{port}"
        ports.add(port)
    assert len(ports) == 4
    assert "--embeddings" in config.models["embed"].argv
    assert "--reranking" in config.models["rerank"].argv


def test_demo_console_script_declared():
    """The launcher the demo names is a console script of the package (setup.cfg)."""
    setup_cfg = (EXAMPLES.parent / "setup.cfg").read_text()
    assert "llamaswap-llama-server = llamaswap.demo.llama_server:main" in setup_cfg


def test_llama_swap_style_shape():
    """llama-swap-style.yaml: a group runs an embedding model beside a chat model; ttl, aliases and macros work."""
    config = load(EXAMPLES / "llama-swap-style.yaml")
    coding = config.groups["coding"]
    assert not coding.swap and {"qwen2.5-coder-32b", "nomic-embed"} <= set(coding.members)
    assert config.models["qwen2.5-7b"].ttl == 600
    assert config.resolve("gpt-4o-mini") == "qwen2.5-7b"
    assert config.resolve("text-embedding-3-small") == "nomic-embed"
    qwen = list(config.models["qwen2.5-7b"].argv)
    assert qwen[0] == "/opt/llama.cpp/build/bin/llama-server"
    assert "--cache-type-k" not in qwen               # a comment line of the cmd
    assert qwen[qwen.index("--alias") + 1] == "qwen2.5-7b"
    assert qwen[qwen.index("--port") + 1] == str(config.models["qwen2.5-7b"].port)
    assert all(m.port and m.port >= 10001 for m in config.models.values())


def test_minimal_shape():
    """minimal.yaml: one model on ${PORT} with the default proxy."""
    config = load(EXAMPLES / "minimal.yaml")
    (model,) = config.models.values()
    assert model.argv[0] == "llama-server"
    assert model.proxy == f"http://localhost:{model.port}"
