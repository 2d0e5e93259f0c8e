"""eigen_export: low-rank KV-cache compression exported through ONNX and TensorRT."""
__version__ = "0.1.0"

from .artifacts.folded import load_model as load  # noqa: E402  (the reference Decoder of a folded or HF model)

__all__ = ["__version__", "load"]
