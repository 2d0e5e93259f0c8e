"""The low-rank attention op (DESIGN 6): PyTorch reference and Triton kernels.

The reference imports only torch. The Triton entry point is loaded on first use, so importing
this package never needs triton (and TRITON_INTERPRET can still be set before triton loads).
"""
from .reference import MAX_RANK, check_inputs, lowrank_attention_reference

__all__ = ["MAX_RANK", "check_inputs", "lowrank_attention_reference", "lowrank_attention"]


def __getattr__(name: str):
    if name == "lowrank_attention":
        from .triton_kernels import lowrank_attention
        return lowrank_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
