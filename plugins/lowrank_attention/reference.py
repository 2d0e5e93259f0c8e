"""PyTorch reference of the low-rank attention op (DESIGN 6): the spec the Triton kernel,
the ONNX graph and the TensorRT plugin are checked against.

Semantics, for q [B, H, S, r_k], k [B, H_kv, P+S, r_k], v [B, H_kv, P+S, r_v]:
- query i of the S new tokens sits at absolute position P+i and sees keys 0..P+i (causal,
  offset by the past length P = k.shape[2] - S);
- key j is visible only where attention_mask[b, j] != 0 (1 = real token, 0 = padding);
- query head h reads KV head h // (H // H_kv), as HF `repeat_kv` does;
- scores are scaled by the explicit `scale`, which is 1/sqrt(d_original), never 1/sqrt(r)
  (DESIGN 3.1: the fold keeps q.k, so the original scale keeps the softmax unchanged);
- softmax runs in fp32; masked scores take finfo(fp32).min rather than -inf (DESIGN 5);
- a query row with no visible key (a left-padding query) outputs zeros: softmax over an
  all-masked row is uniform and meaningless, so the probabilities are zeroed explicitly.
  Zeros keep the row finite; the row is padding, so its value is never used downstream;
- with latent keys (rope_mode `pre`, latent_rope.py), k holds r_k-dim pre-RoPE key latents and q is the full
  rotated query [B, H, S, d]: each key is rebuilt and turned by its own position before the scores. The maps'
  H_kv sets the GQA groups; k and v may then hold one head (a joint latent, issue 13), which every KV head's
  maps rebuild their keys from and every query head reads as its values.
The output is [B, H, S, r_v] in q's dtype.
"""
from __future__ import annotations

import torch

from .kv_codec import Quantized
from .latent_rope import LatentKeys

# The op's identity, one definition for the ONNX node (onnx_op.py) and the TensorRT plugin (trt_plugin.py):
# TensorRT's parser finds the creator by op_type + plugin_version + plugin_namespace.
OP_NAME = "LowRankAttention"
NAMESPACE = "eigen_export"
VERSION = "1"
ROPE_MODES = ("none", "pre", "post")
# Ranks are padded to a power of two inside the kernel; beyond this the register tiles get too
# large to be useful, and no model we target has head_dim > 256.
MAX_RANK = 256


def check_inputs(q: torch.Tensor, k: torch.Tensor | Quantized, v: torch.Tensor | Quantized,
                 attention_mask: torch.Tensor | None, scale: float, latent_keys: LatentKeys | None = None) -> None:
    """Raise ValueError with a one-line message naming the tensor and the expected shape. A quantized k or v
    (kv_codec.Quantized) is checked as the [B, H_kv, P+S, rank] numbers it stands for, its codes and scales
    against its format. With latent_keys, k holds pre-RoPE key latents of its own rank and q the full width."""
    for name, t in (("k", k), ("v", v)):
        if isinstance(t, Quantized):
            t.check(name)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if len(t.shape) != 4:
            raise ValueError(f"lowrank_attention: {name} must be 4-D "
                             f"{_expected(name)}, got shape {tuple(t.shape)}")
    batch, heads, seq, rank_k = q.shape
    _, heads_kv, total, _ = k.shape
    rank_v = v.shape[3]
    groups = heads_kv
    if latent_keys is not None:
        latent_keys.check(heads_kv, k.shape[3], rank_k, batch, total)
        rank_k, groups = k.shape[3], latent_keys.heads
    if k.shape[0] != batch or k.shape[3] != rank_k:
        raise ValueError(f"lowrank_attention: k must be [B={batch}, H_kv, P+S, r_k={rank_k}], "
                         f"got {tuple(k.shape)}")
    if groups == 0 or heads % groups != 0:
        raise ValueError(f"lowrank_attention: k has H_kv={groups} heads, which must divide "
                         f"q's H={heads} (GQA groups)")
    if total < seq:
        raise ValueError(f"lowrank_attention: k must hold the past plus the S={seq} new tokens "
                         f"([B, H_kv, P+S >= {seq}, r_k]), got length {total}")
    if tuple(v.shape[:3]) != (batch, heads_kv, total):
        raise ValueError(f"lowrank_attention: v must be [B={batch}, H_kv={heads_kv}, "
                         f"P+S={total}, r_v], got {tuple(v.shape)}")
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, total):
        raise ValueError(f"lowrank_attention: attention_mask must be [B={batch}, P+S={total}], "
                         f"got {tuple(attention_mask.shape)}")
    for name, rank in (("r_k", rank_k), ("r_v", rank_v)):
        if not 1 <= rank <= MAX_RANK:
            raise ValueError(f"lowrank_attention: {name}={rank} is outside 1..{MAX_RANK}")
    floats = [t.dtype for t in (k, v) if not isinstance(t, Quantized)]
    if any(dtype != q.dtype for dtype in floats):
        raise ValueError(f"lowrank_attention: q and a float k / v must share one dtype, got "
                         f"{q.dtype} and {floats}")
    if not (isinstance(scale, (float, int)) and scale > 0):
        raise ValueError(f"lowrank_attention: scale must be a positive float "
                         f"(1/sqrt(d_original)), got {scale!r}")


def _expected(name: str) -> str:
    return {"q": "[B, H, S, r_k]", "k": "[B, H_kv, P+S, r_k]", "v": "[B, H_kv, P+S, r_v]"}[name]


def visible_keys(attention_mask: torch.Tensor | None, batch: int, seq: int, total: int,
                 device: torch.device) -> torch.Tensor:
    """Boolean [B, 1, S, P+S]: which keys each new query may attend to (causal and not padding)."""
    past = total - seq
    query_pos = past + torch.arange(seq, device=device)
    key_pos = torch.arange(total, device=device)
    allowed = (key_pos[None, :] <= query_pos[:, None])[None, None]  # [1, 1, S, P+S]
    if attention_mask is not None:
        allowed = allowed & (attention_mask != 0)[:, None, None, :]  # [B, 1, S, P+S]
    return allowed.expand(batch, 1, seq, total)


def lowrank_attention_reference(q: torch.Tensor, k: torch.Tensor | Quantized, v: torch.Tensor | Quantized,
                                attention_mask: torch.Tensor | None, scale: float,
                                latent_keys: LatentKeys | None = None) -> torch.Tensor:
    """Causal GQA attention in the low-rank space; see the module docstring for the semantics. A quantized k or
    v is decoded to q's dtype first (kv_codec), as the reference decoder reads its cache. latent_keys: k holds
    pre-RoPE key latents, turned into rotated keys of q's width first (latent_rope.py)."""
    check_inputs(q, k, v, attention_mask, scale, latent_keys)
    k, v = (t.values(q.dtype) if isinstance(t, Quantized) else t for t in (k, v))
    if latent_keys is not None:
        k = latent_keys.keys(k)                         # a joint latent: rebuilt once per KV head of the maps
    batch, heads, seq, _ = q.shape
    total = k.shape[2]
    # k, v: [B, H_kv, T, r] -> [B, H, T, r], query head h reads KV head h // (H / H_kv) (v: one head if joint)
    k_heads = k.float().repeat_interleave(heads // k.shape[1], dim=1)
    v_heads = v.float().repeat_interleave(heads // v.shape[1], dim=1)
    scores = torch.matmul(q.float(), k_heads.transpose(-1, -2)) * scale  # [B, H, S, T]
    allowed = visible_keys(attention_mask, batch, seq, total, q.device)
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1) * allowed  # all-masked rows -> zeros
    return torch.matmul(probs, v_heads).to(q.dtype)  # [B, H, S, r_v]
