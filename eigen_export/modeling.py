"""The PyTorch reference decoder with low-rank attention: the spec every backend must match (DESIGN 3, 6).

One module serves every family through its `ModelSpec`; a layer's attention is described by its ranks
(r_k, r_v) and the RoPE mode. Uncompressed models are the special case r_k = r_v = head_dim with no
basis, so "original" and "folded" run the same code. The interface is flat tensors (ids, mask,
positions, per-layer key/value caches), the same as the ONNX contract of DESIGN 5.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eigen_export_plugins.lowrank_attention.kv_codec import KV_DTYPES, CodeFormat, code_values, encode

from .errors import EigenExportError
from .families import ModelSpec

ROPE_MODES = ("pre", "post")
# heads: a cached latent per KV head; joint: one per layer side over all its KV heads (ModelSpec.joint_latents)
LATENTS = ("heads", "joint")


@dataclass(frozen=True)
class LayerRanks:
    k: int
    v: int


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # the variance is taken in fp32 as the Llama family does, then the weight multiplies in x's dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(spec: ModelSpec, bias: bool) -> nn.Module:
    if spec.norm == "rmsnorm":
        return RMSNorm(spec.hidden_size, spec.norm_eps)
    return nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps, bias=bias)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int, layout: str) -> torch.Tensor:
    """Apply RoPE to the first `rope_dim` features of x [B, heads, T, d]; cos/sin [B, 1, T, rope_dim]."""
    rot, rest = x[..., :rope_dim], x[..., rope_dim:]
    if layout == "half":
        a, b = rot.chunk(2, dim=-1)
        rotated = torch.cat((-b, a), dim=-1)
    else:  # interleaved pairs (2i, 2i+1)
        a, b = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((-b, a), dim=-1).flatten(-2)
    out = rot * cos + rotated * sin
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def alibi_slopes(num_heads: int, bias_max: float) -> torch.Tensor:
    """MPT's ALiBi slopes (non-power-of-two head counts interleave two geometric series)."""
    n = 2 ** math.ceil(math.log2(num_heads))
    slopes = 1.0 / torch.pow(2.0, torch.arange(1, n + 1, dtype=torch.float64) * (bias_max / n))
    if n != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[0::2]])[:num_heads]
    return slopes.float()


def default_position_ids(attention_mask: torch.Tensor, past_length: int) -> torch.Tensor:
    """Positions count real tokens only, so left padding does not shift them (HF's convention)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_length:]


def attention_core(q, k, v, bias, scale: float, k_scale=None, v_scale=None):
    """softmax(q k^T * scale + bias) v with grouped KV heads, never expanding the cache.

    q [B, H, S, r_k], k [B, H_kv, T, r_k], v [B, H_kv, T, r_v], bias broadcastable to [B, H, S, T] (fp32,
    finfo.min where masked). scale = 1/sqrt(original head_dim): the low-rank q.k approximates the full one.
    k_scale, v_scale [B, H_kv, T, 1]: per-token factors of k and v (a quantized cache's scales, k and v then its
    codes), taken on the scores and on the probabilities: one multiply per token instead of one per number.
    Returns [B, H, S, r_v] in v's dtype; softmax is accumulated in fp32.
    """
    b, h, s, r_k = q.shape
    h_kv, t = k.shape[1], k.shape[2]
    g = h // h_kv
    # the g query heads of a KV head are stacked along the query axis: plain batched matmuls, no broadcast
    # copies of the cache (query head h = h_kv_index * g + j, as HF's repeat_kv maps them)
    qg = q.reshape(b, h_kv, g * s, r_k)                                          # [B, H_kv, g*S, r_k]
    scores = torch.matmul(qg * scale, k.transpose(-1, -2)).float()               # [B, H_kv, g*S, T]
    if k_scale is not None:
        scores = scores * k_scale.float().transpose(-1, -2)
    # in place: at 2048 tokens each [B, H, S, T] fp32 copy is 150 MB per layer of SmolLM2
    scores = scores.view(b, h_kv, g, s, t).add_(bias.reshape(bias.shape[0], -1, g if bias.shape[1] > 1 else 1, s, t))
    probs = torch.softmax(scores, dim=-1).view(b, h_kv, g * s, t)
    if v_scale is not None:
        probs = probs * v_scale.float().transpose(-1, -2)
    return torch.matmul(probs.to(v.dtype), v).view(b, h, s, v.shape[-1])         # [B, H, S, r_v]


@dataclass
class AttentionContext:
    """Per-forward tensors shared by all layers: the additive mask and the rotary tables."""
    bias: torch.Tensor                  # [B, 1 or H, S, T] fp32
    q_cos: torch.Tensor | None = None   # [B, 1, S, rope_dim]
    q_sin: torch.Tensor | None = None
    k_cos: torch.Tensor | None = None   # [B, 1, T, rope_dim] (pre-RoPE mode rotates the whole cache)
    k_sin: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None   # [B, T], what a fused attention op reads instead of bias


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, ranks: LayerRanks, rope_mode: str | None, biases: set[str],
                 kv_dtype: str | None = None, kv_layout=None):
        super().__init__()
        d, h, h_kv, dim = spec.head_dim, spec.num_heads, spec.num_kv_heads, spec.hidden_size
        width, cached = spec.latent_width, spec.cache_heads
        if not (1 <= ranks.k <= width and 1 <= ranks.v <= width):
            bound = f"{h_kv} KV heads x head_dim {d} = {width}" if spec.joint_latents else f"head_dim={d}"
            raise EigenExportError(f"ranks {ranks} must lie in [1, {bound}]")
        if spec.joint_latents and spec.positions == "rope" and rope_mode == "post":
            raise EigenExportError("joint latents need rope_mode pre: a post-RoPE basis cannot mix the KV heads "
                                   "of a layer (calibrate with --rope-mode pre)")
        self.spec, self.ranks, self.kv_dtype = spec, ranks, kv_dtype
        # a mixed cache's (key counts, value counts) of its 8/4/2-bit coordinates (kv_codec.CodeFormat)
        self.kv_layout = tuple(tuple(int(n) for n in side) for side in kv_layout) if kv_layout else None
        try:
            for rank, counts in zip((ranks.k, ranks.v), self.counts if kv_dtype == "mixed" else ()):
                CodeFormat.of("mixed", rank, counts)
        except ValueError as e:
            raise EigenExportError(f"{e}: the fold's kv_layout does not fit its ranks, re-run `eigen-export "
                                   "fold`") from None
        rope = spec.positions == "rope"
        self.rope_mode = rope_mode if rope else None
        # Width of q/k rows per head: non-RoPE folds put the basis into W_Q/W_K; post keeps q, k full and
        # projects after rotation; pre stores low-rank keys and keeps q full (DESIGN 3.1-3.2).
        if not rope:
            q_width = k_width = ranks.k
        else:
            q_width, k_width = d, (ranks.k if self.rope_mode == "pre" else d)
        self.q = nn.Linear(dim, h * q_width, bias="q" in biases)
        self.k = nn.Linear(dim, cached * k_width, bias="k" in biases)
        self.v = nn.Linear(dim, cached * ranks.v, bias="v" in biases)
        self.o = nn.Linear(h * ranks.v, dim, bias="o" in biases)
        if self.rope_mode is not None:
            # U per KV head: [H_kv, d, r_k]; a joint latent's U is its H_kv blocks, all reading the one latent
            self.register_buffer("basis_k", torch.zeros(h_kv, d, ranks.k))

    def _heads(self, x, linear, heads):
        b, s, _ = x.shape
        return linear(x).view(b, s, heads, -1).transpose(1, 2)           # [B, heads, S, width]

    def project(self, x, ctx: AttentionContext):
        """q [B, H, S, *], k [B, H_kv, S, *], v [B, H_kv, S, r_v] as the model uses them before the cache."""
        spec = self.spec
        q = self._heads(x, self.q, spec.num_heads)
        k = self._heads(x, self.k, spec.cache_heads)
        v = self._heads(x, self.v, spec.cache_heads)
        if spec.positions == "rope":
            q = rotate(q, ctx.q_cos, ctx.q_sin, spec.rope_dim, spec.rope_layout)
            if self.rope_mode != "pre":
                k = rotate(k, ctx.q_cos, ctx.q_sin, spec.rope_dim, spec.rope_layout)
            if self.rope_mode == "post":
                b, h, s, d = q.shape
                u = self.basis_k.to(q.dtype)
                k = torch.matmul(k, u)                                    # [B, H_kv, S, r_k]
                qg = q.reshape(b, spec.num_kv_heads, spec.group_size, s, d)
                q = torch.matmul(qg, u.unsqueeze(1)).reshape(b, h, s, -1)  # a query head uses its KV head's U
        return q, k, v

    def core(self, q, k, v, ctx: AttentionContext, present: tuple[torch.Tensor, ...], k_scale=None, v_scale=None):
        """The attention core on what the cache holds; the plugin-graph export swaps it for one custom op per layer
        (backends/onnx_export.py), which reads a quantized cache from `present` (k, v here are then its codes, the
        scales k_scale, v_scale). In `pre` mode k holds the key latents: each cached key is rebuilt and rotated by
        ITS OWN position here (DESIGN 3.2); both are linear in the key, so a quantized key's scale still multiplies
        its score afterwards. A joint latent (one cache head) rebuilds every KV head's keys by broadcasting; its
        one value head serves all query heads."""
        if self.rope_mode == "pre":
            k = self.rotate_keys(torch.matmul(k, self.basis_k.to(k.dtype).transpose(-1, -2)), ctx)
        return attention_core(q, k, v, ctx.bias, self.spec.softmax_scale, k_scale, v_scale)

    def rotate_keys(self, k, ctx: AttentionContext):
        """`pre` mode: the rebuilt keys [B, H_kv, T, d] turned by their positions (the export may swap this for one
        RotaryEmbedding node: backends/onnx_export.py)."""
        return rotate(k, ctx.k_cos, ctx.k_sin, self.spec.rope_dim, self.spec.rope_layout)

    def forward(self, x, ctx: AttentionContext, past: tuple[torch.Tensor, ...] | None = None):
        """(output, present): the layer's cache with this chunk appended, (key, value) or, quantized,
        (key codes, value codes, key scales, value scales): what the ONNX graph takes and returns."""
        q, k, v = self.project(x, ctx)
        present = self._cached(k, v)
        if past is not None:
            present = tuple(torch.cat([p, n], dim=2) for p, n in zip(past, present))
        # every key and value is read back from the cache, this chunk's too: a token's codes do not depend on
        # its neighbours, so a prefill, a decode step and a full recomputation read the same keys and values
        k, v, k_scale, v_scale = self._read(present, x.dtype)
        out = self.core(q, k, v, ctx, present, k_scale, v_scale)      # [B, H, S, r_v]
        b, h, s, r_v = out.shape
        return self.o(out.transpose(1, 2).reshape(b, s, h * r_v)), present


    @property
    def counts(self) -> tuple:
        """(key counts, value counts) of a mixed cache, (None, None) otherwise."""
        return (self.kv_layout or (None, None)) if self.kv_dtype == "mixed" else (None, None)

    def _cached(self, k, v) -> tuple[torch.Tensor, ...]:
        if self.kv_dtype is None:
            return k, v
        (k_codes, k_scale), (v_codes, v_scale) = (encode(k, self.kv_dtype, self.counts[0]),
                                                  encode(v, self.kv_dtype, self.counts[1]))
        return k_codes, v_codes, k_scale, v_scale

    def _read(self, cache: tuple[torch.Tensor, ...], dtype: torch.dtype):
        """(k, v, k_scale, v_scale): the cached numbers in `dtype`, or a quantized cache's codes as numbers with
        their per-token scales (attention_core applies them: decoding every cached number each step would cost
        a pass over the whole cache)."""
        if self.kv_dtype is None:
            return cache[0], cache[1], None, None
        k_codes, v_codes, k_scale, v_scale = cache
        return (code_values(k_codes, self.ranks.k, self.kv_dtype, dtype, self.counts[0]),
                code_values(v_codes, self.ranks.v, self.kv_dtype, dtype, self.counts[1]), k_scale, v_scale)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, ffn_dim: int, biases: set[str]):
        super().__init__()
        from transformers.activations import ACT2FN

        self.up = nn.Linear(spec.hidden_size, ffn_dim, bias="up" in biases)
        self.gate = nn.Linear(spec.hidden_size, ffn_dim, bias=False) if spec.mlp == "gated" else None
        self.down = nn.Linear(ffn_dim, spec.hidden_size, bias="down" in biases)
        self.act = ACT2FN[spec.activation]

    def forward(self, x):
        h = self.act(self.gate(x)) * self.up(x) if self.gate is not None else self.act(self.up(x))
        return self.down(h)


class Block(nn.Module):
    def __init__(self, spec, ranks, rope_mode, ffn_dim, biases: set[str], kv_dtype: str | None = None,
                 kv_layout=None):
        super().__init__()
        self.spec = spec
        self.attn_norm = make_norm(spec, "attn_norm" in biases)
        self.mlp_norm = make_norm(spec, "mlp_norm" in biases)
        self.attn = Attention(spec, ranks, rope_mode, biases, kv_dtype, kv_layout)
        self.mlp = MLP(spec, ffn_dim, biases)

    def attn_input(self, x):
        """What the attention projections read: the normed stream, except for post-norm OPT."""
        return self.attn_norm(x) if self.spec.prenorm or self.spec.parallel_residual else x

    def forward(self, x, ctx, past=None):
        """(output, present): see Attention.forward."""
        if self.spec.parallel_residual:
            a, present = self.attn(self.attn_norm(x), ctx, past)
            return x + a + self.mlp(self.mlp_norm(x)), present
        if self.spec.prenorm:
            a, present = self.attn(self.attn_norm(x), ctx, past)
            x = x + a
            return x + self.mlp(self.mlp_norm(x)), present
        a, present = self.attn(x, ctx, past)     # OPT-350m: normalise after the residual add
        x = self.attn_norm(x + a)
        return self.mlp_norm(x + self.mlp(x)), present


class Decoder(nn.Module):
    """A causal LM whose attention layers may be low rank. Weights use the canonical names of families.base."""

    def __init__(self, spec: ModelSpec, ranks: list[LayerRanks] | None, rope_mode: str | None,
                 state_dict: dict[str, torch.Tensor], inv_freq: torch.Tensor | None = None,
                 rope_scaling: float = 1.0, kv_dtype: str | None = None, kv_layout=None):
        """kv_dtype: int8 | int4 | mixed to quantize the cache (plugins/lowrank_attention/kv_codec.py), None to
        keep it in the model's dtype; kv_layout (mixed): per layer, the counts of 8/4/2-bit coordinates of its
        keys and of its values."""
        super().__init__()
        if rope_mode is not None and rope_mode not in ROPE_MODES:
            raise EigenExportError(f"rope_mode must be one of {ROPE_MODES}, got {rope_mode!r}")
        if kv_dtype is not None and kv_dtype not in KV_DTYPES:
            raise EigenExportError(f"kv cache dtype must be one of {KV_DTYPES} (or none), got {kv_dtype!r}")
        self.kv_dtype = kv_dtype
        if kv_layout is not None and len(kv_layout) != spec.num_layers:
            raise EigenExportError(f"kv_layout has {len(kv_layout)} layers, the model {spec.num_layers}: re-run "
                                   "`eigen-export fold`")
        self.kv_layout = [tuple(map(tuple, layer)) for layer in kv_layout] if kv_layout is not None else None
        full = LayerRanks(spec.head_dim, spec.head_dim)
        self.spec = spec
        self.ranks = list(ranks) if ranks is not None else [full] * spec.num_layers
        if len(self.ranks) != spec.num_layers:
            raise EigenExportError(f"{len(self.ranks)} layer ranks given for a {spec.num_layers}-layer model")
        self.rope_mode = rope_mode if spec.positions == "rope" else None
        biases = {name.split(".")[-2] for name in state_dict if name.endswith(".bias")}
        ffn_dim = state_dict["layers.0.mlp.up.weight"].shape[0]
        self._block_args = (ffn_dim, biases)
        # no random init: load_weights assigns the given tensors (a meta tensor there stays a placeholder: a
        # model streamed from disk holds its layers one at a time, loading.StreamedCheckpoint)
        with torch.device("meta"):
            self.embed = nn.Embedding(spec.vocab_size, state_dict["embed.weight"].shape[1])
            self.pos_embed = (nn.Embedding(*state_dict["pos_embed.weight"].shape)
                              if spec.positions == "learned" else None)
            self.proj_in = nn.Linear(*reversed(state_dict["proj_in.weight"].shape), bias=False) \
                if "proj_in.weight" in state_dict else None
            self.proj_out = nn.Linear(*reversed(state_dict["proj_out.weight"].shape), bias=False) \
                if "proj_out.weight" in state_dict else None
            self.layers = nn.ModuleList(
                Block(spec, r, self.rope_mode, ffn_dim, biases, kv_dtype,
                      self.kv_layout[i] if self.kv_layout else None) for i, r in enumerate(self.ranks)
            )
            self.final_norm = make_norm(spec, "final_norm" in biases) if spec.final_norm else None
            self.lm_head = None if spec.tie_embeddings else nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.positions == "rope":
            self.register_buffer("inv_freq", inv_freq.float().clone(), persistent=False)
            self.rope_scaling = rope_scaling
        if spec.positions == "alibi":
            self.register_buffer("alibi", alibi_slopes(spec.num_heads, spec.alibi_bias_max), persistent=False)
        load_weights(self, state_dict)

    def _apply(self, fn, recurse=True):
        # RoPE frequencies and ALiBi slopes stay fp32 whatever dtype the model is cast to (they move with it):
        # rounding inv_freq to fp16 turns into radians of angle error at positions in the thousands
        kept = {name: self._buffers[name] for name in ("inv_freq", "alibi") if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, original in kept.items():
            self._buffers[name] = original.to(self._buffers[name].device)
        return self

    # -- pieces, also used by calibration --------------------------------------------------------------
    def make_block(self, ranks: LayerRanks, rope_mode: str | None, layer_state: dict[str, torch.Tensor]) -> Block:
        """A stand-alone layer with other ranks (calibration tries candidates with it)."""
        with torch.device("meta"):     # no random init: every tensor is replaced by layer_state
            block = Block(self.spec, ranks, rope_mode if self.spec.positions == "rope" else None, *self._block_args)
        ref = next(self.parameters())
        load_weights(block, {k: v.to(device=ref.device, dtype=ref.dtype) for k, v in layer_state.items()})
        return block.eval()

    def embed_tokens(self, input_ids, position_ids):
        x = self.embed(input_ids)
        if self.proj_in is not None:
            x = self.proj_in(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids + self.spec.learned_pos_offset)
        return x

    def context(self, attention_mask, position_ids, dtype, key_tables: bool | None = None) -> AttentionContext:
        """Mask and rotary tables for S new tokens after P cached ones (T = P + S = mask width).

        key_tables: also build per-key rotary tables (needed by `pre` mode; default: when this model uses it).
        """
        b, t = attention_mask.shape
        s = position_ids.shape[1]
        p = t - s
        q_index = torch.arange(p, t, device=attention_mask.device)
        k_index = torch.arange(t, device=attention_mask.device)
        allowed = (k_index[None, :] <= q_index[:, None])[None] & attention_mask.bool()[:, None, :]  # [B, S, T]
        bias = torch.zeros(b, 1, s, t, dtype=torch.float32, device=attention_mask.device)
        bias = bias.masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        if self.spec.positions == "alibi":
            # Only key offsets matter: a per-row constant cancels in softmax, so padding does not shift it.
            rel = (k_index[None, :] - q_index[:, None]).float()                                # [S, T]
            bias = bias + self.alibi.view(1, -1, 1, 1) * rel
        ctx = AttentionContext(bias=bias, attention_mask=attention_mask)
        if self.spec.positions == "rope":
            ctx.q_cos, ctx.q_sin = self.rope_tables(position_ids, dtype)
            if key_tables or (key_tables is None and self.rope_mode == "pre"):
                ctx.k_cos, ctx.k_sin = self.rope_tables(default_position_ids(attention_mask, 0), dtype)
        return ctx

    def rope_tables(self, positions, dtype):
        freqs = positions[..., None].float() * self.inv_freq                                     # [B, T, n/2]
        if self.spec.rope_layout == "half":
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = freqs.repeat_interleave(2, dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(dtype)[:, None]
        sin = (emb.sin() * self.rope_scaling).to(dtype)[:, None]
        return cos, sin

    def head(self, x):
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.proj_out is not None:
            x = self.proj_out(x)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, weight)

    # -- the model --------------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, position_ids=None, past=None):
        """logits [B, S, V] and presents: per layer (key [B, H_kv, P+S, r_k], value [B, H_kv, P+S, r_v]), or
        with a quantized cache (key codes, value codes, key scales, value scales) (kv_codec.cache_slots).

        `past` is a list of what presents holds, or None for a prefill.
        """
        b, s = input_ids.shape
        p = past[0][0].shape[2] if past else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, p + s, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (b, p + s):
            raise EigenExportError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, p + s)} (batch, past + seq)")
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, p)
        x = self.embed_tokens(input_ids, position_ids)
        ctx = self.context(attention_mask, position_ids, x.dtype)
        presents = []
        for i, layer in enumerate(self.layers):
            x, present = layer(x, ctx, past[i] if past else None)
            presents.append(present)
        return self.head(x), presents

    @contextlib.contextmanager
    def cache_format(self, kv_dtype: str | None):
        """Run with another cache format meanwhile (None: floats in the model's dtype): validate measures what
        quantizing the cache does by comparing the two on the same input."""
        saved = self.kv_dtype
        for module in (self, *(layer.attn for layer in self.layers)):
            module.kv_dtype = kv_dtype
        try:
            yield self
        finally:
            for module in (self, *(layer.attn for layer in self.layers)):
                module.kv_dtype = saved

    def cache_widths(self) -> list[LayerRanks]:
        """Last dims of each layer's cached key and value: r_k and r_v in every mode."""
        return list(self.ranks)


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Strict load with one-line errors naming the first missing, unexpected or misshapen tensor."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing:
        raise EigenExportError(f"weights are missing {len(missing)} tensors (first: {missing[0]}): "
                               "the checkpoint is incomplete or belongs to another model")
    if unexpected:
        raise EigenExportError(f"weights hold {len(unexpected)} unexpected tensors (first: {unexpected[0]}): "
                               "the checkpoint does not match its config/manifest")
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise EigenExportError(f"tensor {name} has shape {tuple(tensor.shape)}, the manifest implies "
                                   f"{tuple(own[name].shape)}: the weights do not match their manifest")
    meta = any(t.is_meta for t in own.values())
    # into a model built on meta: floating tensors keep their dtype (an fp16 checkpoint is not widened to fp32
    # on its way; the caller's .to(dtype) decides)
    model.load_state_dict({k: v if meta and v.is_floating_point() and own[k].is_floating_point()
                           else v.to(own[k].dtype) for k, v in state_dict.items()}, strict=True, assign=meta)
