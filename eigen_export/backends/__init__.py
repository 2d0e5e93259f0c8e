"""Backends with one interface (DESIGN 7), each backend's builder beside its runner, and what runs on top of
them: generate(), perplexity(). onnxruntime and tensorrt themselves are imported only when used."""
from .base import Backend
from .generate import generate
from .onnxruntime_backend import OnnxRuntimeBackend
from .perplexity import perplexity
from .tensorrt_backend import TensorRTBackend
from .torch_backend import TorchBackend

__all__ = ["Backend", "OnnxRuntimeBackend", "TensorRTBackend", "TorchBackend", "generate", "perplexity"]
