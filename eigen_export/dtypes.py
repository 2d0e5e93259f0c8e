"""The element types the pipeline handles, under every name the stages and runtimes use for them."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import EigenExportError


@dataclass(frozen=True)
class DType:
    name: str             # torch / eigen.json / io.json spelling: "float16"
    short: str            # CLI and recipe spelling of export dtypes: "fp16"
    torch: torch.dtype
    onnx: int             # onnx.TensorProto element type (ORT's bind_input/bind_output take it as an int)
    ort: str              # how ONNX Runtime names the type of a graph input: "tensor(float16)"


FLOATS = (DType("float32", "fp32", torch.float32, 1, "tensor(float)"),
          DType("float16", "fp16", torch.float16, 10, "tensor(float16)"),
          DType("bfloat16", "bf16", torch.bfloat16, 16, "tensor(bfloat16)"))
INT64 = DType("int64", "int64", torch.int64, 7, "tensor(int64)")
# the codes of a quantized cache (kv_codec): int8, and int4 packed two to a uint8
CODES = (DType("int8", "int8", torch.int8, 3, "tensor(int8)"), DType("uint8", "uint8", torch.uint8, 2, "tensor(uint8)"))
_ALL = (*FLOATS, INT64, *CODES)
FLOAT_NAMES = tuple(d.name for d in FLOATS)
EXPORT_NAMES = tuple(d.short for d in FLOATS)


def dtype(value: "str | torch.dtype") -> DType:
    """The DType of "float16", "fp16" or torch.float16; a one-line error for anything else."""
    for d in _ALL:
        if value in (d.name, d.short) or value is d.torch:
            return d
    raise EigenExportError(f"unknown dtype {value!r}: use one of {', '.join(FLOAT_NAMES + EXPORT_NAMES)}")


def resolve_dtype(value: "str | torch.dtype") -> torch.dtype:
    return dtype(value).torch
