from __future__ import annotations

import torch

from ..modeling import Decoder


class TorchBackend:
    """The PyTorch reference Decoder as a backend: the spec the others are compared with."""

    name = "torch"

    def __init__(self, model: Decoder):
        self.model = model.eval()
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def forward(self, input_ids, attention_mask, position_ids, past):
        return self.model(input_ids, attention_mask, position_ids, past)
