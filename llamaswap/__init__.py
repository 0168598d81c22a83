"""llamaswap: a Twisted re-implementation of llama-swap."""

__version__ = "0.1.0"
