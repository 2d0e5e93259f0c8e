"""The one layer-by-layer pass over calibration text (DESIGN 4), shared by calibration and head merging.

The text is embedded once; each layer then runs on the outputs of the ORIGINAL layers before it (the
paper's rule), in batches, with forward hooks on its q/k/v linears so the propagation pass doubles as
the statistics pass. Peak memory: the model + one layer's activations (N x L x D) + the caller's Grams.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..modeling import Decoder


class Capture:
    """Forward hooks on a layer's q/k/v linears: the raw projection outputs of the batch just run."""

    def __init__(self, attn):
        self.outputs = {}
        self.handles = [getattr(attn, name).register_forward_hook(self._hook(name)) for name in "qkv"]

    def _hook(self, name):
        def save(module, inputs, output):
            self.outputs[name] = output
        return save

    def remove(self):
        for handle in self.handles:
            handle.remove()


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class LayerPass:
    """Calibration activations [N, L, D] flowing through the decoder one layer at a time."""

    def __init__(self, model: Decoder, calib_ids: torch.Tensor, batch_size: int = 4, key_tables: bool = False):
        self.model = model
        device = next(model.parameters()).device
        n, length = calib_ids.shape
        calib_ids = calib_ids.to(device)
        self.positions = torch.arange(length, device=device).expand(n, length)
        self.mask = torch.ones(n, length, dtype=torch.long, device=device)
        self.batches = chunks(n, batch_size)
        self.key_tables = key_tables
        self.x = torch.cat([model.embed_tokens(calib_ids[s], self.positions[s]) for s in self.batches])
        self.dtype = self.x.dtype          # the contexts' (the activations may be dropped before the last one)
        self._contexts = {}

    def ctx(self, s: slice):
        """The attention context of a batch (cached by batch size: every row is a full unpadded window)."""
        size = s.stop - s.start
        if size not in self._contexts:
            self._contexts[size] = self.model.context(self.mask[s], self.positions[s], self.dtype,
                                                      key_tables=self.key_tables)
        return self._contexts[size]

    def forward(self, block, on_batch: Callable[[slice, dict], None] | None = None) -> torch.Tensor:
        """The block's output on every batch; on_batch(batch, {"q", "k", "v": raw projection outputs}) runs
        after each batch."""
        capture = Capture(block.attn) if on_batch is not None else None
        outputs = []
        try:
            for s in self.batches:
                outputs.append(block(self.x[s], self.ctx(s))[0])
                if capture is not None:
                    on_batch(s, capture.outputs)
        finally:
            if capture is not None:
                capture.remove()
        return torch.cat(outputs)

    def advance(self, outputs: torch.Tensor) -> None:
        """The next layer's inputs: this layer's outputs."""
        self.x = outputs
