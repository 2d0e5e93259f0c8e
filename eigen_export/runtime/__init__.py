"""Backends with one interface (DESIGN 7) and what runs on top of them: generate(), perplexity()."""
from .base import Backend
from .generate import generate
from .perplexity import perplexity
from .torch_backend import TorchBackend

__all__ = ["Backend", "OnnxRuntimeBackend", "TensorRTBackend", "TorchBackend", "generate", "perplexity"]


def __getattr__(name):
    # onnxruntime is an optional, heavy import: load it only when its backend is asked for
    if name == "OnnxRuntimeBackend":
        from .onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend
    if name == "TensorRTBackend":         # tensorrt is imported when the backend is built, not here
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
