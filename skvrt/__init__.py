"""skvrt: a PyTorch-free LLM inference runtime with a Spherical KV cache (arXiv 2605.18856)."""

from .errors import SkvrtError
from .llm import LLM, load

__version__ = "0.1.0"
__all__ = ["LLM", "load", "SkvrtError", "__version__"]
