"""Helpers for the bundled demo and the real-llama.cpp tests, outside the daemon's core.

* :mod:`llamaswap.demo.llama_server`: the ``llamaswap-llama-server`` launcher, which finds
  llama.cpp's ``llama-server`` and optionally serves a tiny model with it;
* :mod:`llamaswap.demo.tinymodels`: tiny deterministic GGUF models generated on first use
  (the vocabulary files they need are in ``data/vocab/`` here).

The daemon never imports this package; model ``cmd`` lines name the launcher as a program.
"""
