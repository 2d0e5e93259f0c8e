"""Pre-RoPE key latents turned into rotated keys inside the attention op (issue 14, candidate (c)).

In rope_mode `pre` the cache holds each key as its latent c = down^T k (r_k numbers per KV head), taken BEFORE
RoPE, because a low-rank basis does not commute with the rotation. The attention scores need the rotated key
  key = R_pos (U c)        (U [d, r_k] the key basis, R_pos RoPE at the key's own position)
which the graph used to build in full width for every cached key at every step. The op can build it from the
latent instead, feature by feature, with two constant maps per KV head:
  key_j = (c @ basis_cos)_j cos(pos freq_j) + (c @ basis_sin)_j sin(pos freq_j)
basis_cos = U^T G and basis_sin = U^T M G, where M is the layout's rotate-half map (x M = (-b, a) on each plane
(a, b)) and G the rope attention factor on the rotated features; freq_j is the angular frequency of feature j's
plane (0 past rope_dim: cos 1 and sin 0 leave those features as rebuilt). So the op reads only the reduced cache
and the key positions, and the full-width keys live in registers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LatentKeys:
    """How the op turns cached key latents [B, H_kv, P+S, r_k] into rotated keys [B, H_kv, P+S, d]:
    basis_cos, basis_sin [H_kv, r_k, d] fp32, freq [d] fp32, positions [B, P+S] integer (each cached key's
    position: real tokens counted, left padding not, as the model's rotary tables count them). A joint latent
    (one cache head for all KV heads, issue 13) is [B, 1, P+S, r_k]: each KV head's maps read the same latent."""
    basis_cos: torch.Tensor
    basis_sin: torch.Tensor
    freq: torch.Tensor
    positions: torch.Tensor

    @property
    def heads(self) -> int:
        """H_kv: the KV heads whose keys the maps rebuild (the GQA groups of the query heads)."""
        return self.basis_cos.shape[0]

    def keys(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [B, H_kv or 1, T, r_k] (any float dtype) -> rotated keys [B, H_kv, T, d] fp32."""
        angle = self.positions.float()[:, None, :, None] * self.freq.float()            # [B, 1, T, d]
        c = latent.float()
        return c @ self.basis_cos.float()[None] * angle.cos() + c @ self.basis_sin.float()[None] * angle.sin()

    def check(self, cache_heads: int, rank_k: int, width: int, batch: int, total: int) -> None:
        """ValueError (one line) unless the tables fit a latent of rank_k per cache head (one cache head: a joint
        latent, any number of KV heads), queries of `width` and a cache of `total` keys in `batch` rows."""
        heads = self.heads if cache_heads == 1 else cache_heads
        for name in ("basis_cos", "basis_sin"):
            t = getattr(self, name)
            if tuple(t.shape) != (heads, rank_k, width) or not t.is_floating_point():
                raise ValueError(f"lowrank_attention: latent keys' {name} must be float [H_kv={heads}, r_k={rank_k}, "
                                 f"d={width}], got {t.dtype} {list(t.shape)}")
        if tuple(self.freq.shape) != (width,) or not self.freq.is_floating_point():
            raise ValueError(f"lowrank_attention: latent keys' freq must be float [d={width}], got "
                             f"{self.freq.dtype} {list(self.freq.shape)}")
        if tuple(self.positions.shape) != (batch, total) or self.positions.is_floating_point():
            raise ValueError(f"lowrank_attention: latent keys' positions must be integer [B={batch}, P+S={total}], "
                             f"got {self.positions.dtype} {list(self.positions.shape)}")


def rope_pairs(head_dim: int, rope_dim: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(partner [d] long, sign [d] float32): the layout's rotate-half of x is sign * x[partner], i.e. (-b, a) on
    each plane (a, b) ((i, i + rope_dim/2) for `half`, (2i, 2i + 1) for `interleaved`), zeros past rope_dim."""
    half = rope_dim // 2
    if layout == "half":
        first, second = torch.arange(half), torch.arange(half, rope_dim)
    elif layout == "interleaved":
        first, second = torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)
    else:
        raise ValueError(f"rope layout must be 'half' or 'interleaved', got {layout!r}")
    partner, sign = torch.arange(head_dim), torch.zeros(head_dim)
    partner[first], partner[second] = second, first
    sign[first], sign[second] = -1.0, 1.0
    return partner, sign


def latent_key_tables(basis_k: torch.Tensor, inv_freq: torch.Tensor, rope_dim: int, layout: str,
                      gain: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(basis_cos, basis_sin [H_kv, r_k, d] in basis_k's dtype, freq [d] fp32) from the key basis basis_k
    [H_kv, d, r_k] (columns rebuild a key from its latent), the rotary inverse frequencies [rope_dim / 2] and the
    attention factor. Elementwise ops and a gather only: the plugin graph computes them from the stored basis
    (no float64, no matmul), and TensorRT folds them into constants at build time."""
    d = basis_k.shape[-2]
    partner, sign = rope_pairs(d, rope_dim, layout)
    rotated = torch.arange(d) < rope_dim
    gain_of = torch.where(rotated, torch.tensor(float(gain)), torch.tensor(1.0)).to(basis_k.device, basis_k.dtype)
    basis_cos = basis_k.transpose(-1, -2) * gain_of
    basis_sin = basis_cos[..., partner.to(basis_k.device)] * sign.to(basis_k.device, basis_k.dtype)
    return basis_cos, basis_sin, feature_freq(inv_freq.float(), d, rope_dim, layout)


def feature_freq(inv_freq: torch.Tensor, head_dim: int, rope_dim: int, layout: str) -> torch.Tensor:
    """[d] in inv_freq's dtype: the angular frequency of each feature's plane, 0 past rope_dim."""
    rotated = torch.arange(head_dim) < rope_dim
    plane = torch.arange(head_dim) % (rope_dim // 2) if layout == "half" else torch.arange(head_dim) // 2
    plane = torch.where(rotated, plane, torch.zeros_like(plane)).to(inv_freq.device)
    return inv_freq[plane] * rotated.to(inv_freq.device, inv_freq.dtype)
