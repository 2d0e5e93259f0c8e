"""eigen_export: low-rank KV-cache compression exported through ONNX and TensorRT."""
__version__ = "0.1.0"


def load(path, dtype="float32", device="cpu"):
    """The PyTorch reference model of a folded directory (or of an original HF model)."""
    from .loading import load as _load

    return _load(path, dtype=dtype, device=device)
