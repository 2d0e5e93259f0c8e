from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..method.metrics import next_token_nll


@torch.no_grad()
def perplexity(backend, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """exp(mean NLL) over non-overlapping windows [N, L]; every token but each window's first is predicted."""
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", disable=not progress):
        ids = windows[start:start + batch_size].to(backend.device)
        mask = torch.ones_like(ids)
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        logits, _ = backend.forward(ids, mask, positions, None)
        total_nll += next_token_nll(logits, ids)[0]
        total_tokens += ids[:, 1:].numel()
    return math.exp(total_nll / total_tokens)
