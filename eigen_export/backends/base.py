from __future__ import annotations

from typing import Protocol

import torch

from ..errors import EigenExportError

Cache = list[tuple[torch.Tensor, ...]]     # per layer: key, value[, key scales, value scales]


class Backend(Protocol):
    """A compressed or original model behind the flat-tensor contract of DESIGN 5.

    forward() takes the new tokens, the mask over past + new tokens, their positions and the cache of
    every layer (None for a prefill) and returns logits [B, S, V] and the updated cache.
    """

    name: str
    device: torch.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: Cache | None) -> tuple[torch.Tensor, Cache]: ...


def check_step_inputs(input_ids, attention_mask, position_ids, past, num_kv_heads: int,
                      layout: list[list[tuple[str, int, torch.dtype]]], what: str) -> tuple[int, int, int]:
    """The shapes and types of one forward() a compiled backend would reject with an opaque message, named
    precisely here; returns (batch, seq, past). layout: per layer (name, last dim, type) of each cache tensor
    (OnnxIO.cache_layout). `what` is "graph" or "engine", as the messages call it."""
    if input_ids.dim() != 2:
        raise EigenExportError(f"input_ids has shape {tuple(input_ids.shape)}, expected (batch, seq)")
    b, s = input_ids.shape
    p = past[0][0].shape[2] if past else 0
    if tuple(attention_mask.shape) != (b, p + s):
        raise EigenExportError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                               f"{(b, p + s)} (batch, past + seq)")
    if tuple(position_ids.shape) != (b, s):
        raise EigenExportError(f"position_ids has shape {tuple(position_ids.shape)}, expected {(b, s)} (batch, seq)")
    if past is None:
        return b, s, p
    if len(past) != len(layout):
        raise EigenExportError(f"past holds {len(past)} layers, the {what} has {len(layout)}")
    for i, slots in enumerate(layout):
        if len(past[i]) != len(slots):
            names = ", ".join(name for name, _, _ in slots)
            raise EigenExportError(f"past layer {i} holds {len(past[i])} tensors, the {what} takes {len(slots)} "
                                   f"({names})")
        for tensor, (name, width, element) in zip(past[i], slots):
            expected = (b, num_kv_heads, p, width)
            if tuple(tensor.shape) != expected:
                raise EigenExportError(f"past_key_values.{i}.{name} has shape {tuple(tensor.shape)}, expected "
                                       f"{expected} [batch, H_kv, past, width]")
            if tensor.dtype != element:
                raise EigenExportError(f"past_key_values.{i}.{name} is {tensor.dtype}, the {what} takes {element}")
    return b, s, p
