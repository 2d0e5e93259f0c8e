"""What the parity report measures, as pure functions of tensors (DESIGN 8)."""
from __future__ import annotations

import math
import statistics

import torch
import torch.nn.functional as F

from ..errors import EigenExportError


def logit_metrics(ref: torch.Tensor, test: torch.Tensor, valid: torch.Tensor | None = None) -> dict:
    """Agreement of logits [B, S, V] at the positions where `valid` [B, S] is true (default: all).

    cosine is the smallest per-position cosine similarity; kl is the mean KL(softmax(ref) || softmax(test))."""
    ref, test = ref.float(), test.float()
    if valid is None:
        valid = torch.ones(ref.shape[:2], dtype=torch.bool, device=ref.device)
    ref, test = ref[valid], test[valid]                                  # [N, V]
    diff = (ref - test).abs()
    kl = F.kl_div(F.log_softmax(test, -1), F.log_softmax(ref, -1), log_target=True,
                  reduction="none").sum(-1).clamp_min(0)         # >= 0 in exact arithmetic; rounding dips below
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
            "cosine": F.cosine_similarity(ref, test, dim=-1).min().item(),
            "top1": (ref.argmax(-1) == test.argmax(-1)).float().mean().item(), "kl": kl.mean().item(),
            "positions": int(ref.shape[0])}


def present_max_abs(ref: list, test: list, mask: torch.Tensor) -> float:
    """Largest |difference| over every layer's key and value cache at real (unpadded) positions."""
    keep = mask.bool()[:, None, :, None]                                 # [B, 1, T, 1]
    worst = 0.0
    for (rk, rv), (tk, tv) in zip(ref, test):
        for a, b in ((rk, tk), (rv, tv)):
            if a.shape != b.shape:
                raise EigenExportError(f"a backend returned a cache of shape {tuple(b.shape)} where PyTorch has "
                                       f"{tuple(a.shape)}: the export does not match the folded model")
            worst = max(worst, ((a.float() - b.float().to(a.device)).abs() * keep).max().item())
    return worst


def relative_errors(ref: list[torch.Tensor], test: list[torch.Tensor]) -> list[float]:
    return [((t.float() - r.float()).norm() / r.float().norm().clamp_min(1e-12)).item() for r, t in zip(ref, test)]


def percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    return {"p50": statistics.median(ordered), "p90": p90, "n": len(ordered)}
