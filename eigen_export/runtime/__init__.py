"""Backends with one interface (DESIGN 7) and what runs on top of them: generate(), perplexity()."""
from .base import Backend
from .generate import generate
from .perplexity import perplexity
from .torch_backend import TorchBackend

__all__ = ["Backend", "TorchBackend", "generate", "perplexity"]
