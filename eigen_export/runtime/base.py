from __future__ import annotations

from typing import Protocol

import torch

Cache = list[tuple[torch.Tensor, torch.Tensor]]


class Backend(Protocol):
    """A compressed or original model behind the flat-tensor contract of DESIGN 5.

    forward() takes the new tokens, the mask over past + new tokens, their positions and the cache of
    every layer (None for a prefill) and returns logits [B, S, V] and the updated cache.
    """

    name: str
    device: torch.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: Cache | None) -> tuple[torch.Tensor, Cache]: ...
