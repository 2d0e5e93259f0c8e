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


# Positions per slice where a whole [S, V] logits tensor would be copied several times over: at SmolLM2's
# 49k vocabulary a 2048-token window's logits alone take 400 MB, and each softmax another 400 MB.
LOGIT_CHUNK = 128


def chunked_logit_metrics(ref: torch.Tensor, test: torch.Tensor, chunk: int = LOGIT_CHUNK) -> dict:
    """logit_metrics over every position of [B, S, V] logits, computed `chunk` positions at a time."""
    return combined_logit_metrics([logit_metrics(r, t) for r, t in zip(ref.split(chunk, 1), test.split(chunk, 1))])


def combined_logit_metrics(parts: list[dict]) -> dict:
    """logit_metrics of disjoint sets of positions -> those of their union."""
    n = sum(p["positions"] for p in parts)
    mean = {key: sum(p[key] * p["positions"] for p in parts) / n for key in ("mean_abs", "top1", "kl")}
    return {"max_abs": max(p["max_abs"] for p in parts), "cosine": min(p["cosine"] for p in parts), **mean,
            "positions": n}


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, chunk: int = LOGIT_CHUNK) -> tuple[float, int]:
    """(summed cross-entropy of each token of ids [B, S] but the first given the logits of the position before,
    how many of them the top-1 logit predicts), `chunk` positions at a time. logits: [B, S or S - 1, V] (the
    last position predicts nothing)."""
    nll, correct = 0.0, 0
    for start in range(0, ids.shape[1] - 1, chunk):
        lg = logits[:, start:min(start + chunk, ids.shape[1] - 1)].float()
        target = ids[:, start + 1:start + 1 + lg.shape[1]]
        nll += F.cross_entropy(lg.flatten(0, 1), target.flatten(), reduction="sum").item()
        correct += (lg.argmax(-1) == target).sum().item()
    return nll, correct


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
