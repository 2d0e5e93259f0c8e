"""The low-rank attention op (DESIGN 6): the PyTorch reference against a naive loop and SDPA, and
the Triton kernels against the reference under the CPU interpreter (TRITON_INTERPRET=1).

triton reads TRITON_INTERPRET when its kernels are decorated, and another test module may already
have imported triton (or torch, which can import it) in this process. So the kernel grid runs in
one subprocess started with the variable set; its per-case results are then asserted here, one
pytest case each. bf16 is left to bench/gpu_check.py: the interpreter's bf16 is unreliable.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
from eigen_export_plugins.lowrank_attention.kv_codec import Quantized, encode  # noqa: E402
from eigen_export_plugins.lowrank_attention.latent_rope import LatentKeys, latent_key_tables  # noqa: E402
from eigen_export_plugins.lowrank_attention.reference import (  # noqa: E402
    check_inputs,
    lowrank_attention_reference,
)

TOLERANCES = {"float32": (1e-5, 1e-5), "float16": (2e-3, 2e-3)}  # (atol, rtol)


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    heads_kv: int
    seq: int  # S new tokens; 1 = decode kernel
    past: int  # P cached tokens
    rank_k: int
    rank_v: int
    dtype: str
    left_pad: tuple[int, ...] = ()  # padding tokens at the start of each batch row
    view: bool = False  # q a transpose of [B, S, H, r]; k, v slices of a larger cache buffer
    chunk_len: int | None = None  # decode: force many small chunks (some fully padded)
    prefetch: bool = False  # decode: register double buffering of the next key block
    kv: str = "float"  # the cache: float, int8 / int4 / mixed (keys and values quantized; mixed: mixed_counts),
    #                    v-int8 / v-int4 (values only, as in rope_mode pre, whose keys reach the op rebuilt in full)
    latent: str = ""  # pre-RoPE key latents turned in the op (latent_rope.py): the rope layout, half / interleaved,
    #                   or partial (half, a quarter of the features rotated); q is then LATENT_HEAD_DIM wide
    joint: bool = False  # latent keys: k and v hold one head (a joint latent) that the heads_kv maps all read

    @property
    def cache_heads(self) -> int:
        return 1 if self.joint else self.heads_kv

    @property
    def name(self) -> str:
        kind = "decode" if self.seq == 1 else f"prefill{self.seq}"
        pad = f"-pad{'.'.join(map(str, self.left_pad))}" if self.left_pad else ""
        extra = ("-view" if self.view else "") + (f"-chunk{self.chunk_len}" if self.chunk_len else "")
        extra += "-prefetch" if self.prefetch else ""
        extra += f"-{self.kv}" if self.kv != "float" else ""
        extra += f"-latent-{self.latent}" if self.latent else ""
        extra += "-joint" if self.joint else ""
        return (f"{kind}-b{self.batch}-h{self.heads}kv{self.heads_kv}-past{self.past}"
                f"-r{self.rank_k}x{self.rank_v}-{self.dtype}{pad}{extra}")


CASES = [
    # decode (S = 1): past 0 / 1 / odd / long, GQA ratios 1 / 3 / 4
    Case(1, 4, 4, 1, 0, 8, 8, "float32"),
    Case(3, 6, 2, 1, 1, 40, 56, "float16", left_pad=(0, 1, 0)),
    Case(3, 8, 2, 1, 37, 77, 40, "float32", left_pad=(4, 0, 9), view=True),
    Case(1, 3, 1, 1, 300, 64, 48, "float16"),
    Case(3, 4, 4, 1, 300, 56, 64, "float32", left_pad=(0, 120, 7), chunk_len=32),
    Case(3, 12, 4, 1, 300, 77, 77, "float16", left_pad=(100, 0, 301), chunk_len=64, view=True),
    Case(1, 8, 2, 1, 129, 33, 17, "float16", chunk_len=16),
    Case(3, 12, 4, 1, 300, 77, 40, "float16", left_pad=(100, 0, 301), chunk_len=64, prefetch=True),
    Case(1, 4, 4, 1, 70, 24, 56, "float32", view=True, chunk_len=48, prefetch=True),
    # prefill (S > 1); rows of left padding have no visible key and must come out as zeros
    Case(1, 4, 4, 7, 0, 8, 16, "float32"),
    Case(3, 6, 2, 5, 1, 40, 56, "float16", left_pad=(3, 0, 1)),
    Case(3, 8, 2, 33, 17, 77, 40, "float32", left_pad=(20, 0, 3), view=True),
    Case(1, 3, 1, 16, 300, 64, 48, "float16"),
    Case(3, 4, 4, 70, 0, 56, 24, "float16", left_pad=(0, 66, 5)),
    Case(1, 12, 4, 9, 300, 33, 64, "float32", view=True),
    Case(1, 4, 2, 65, 3, 64, 64, "float16", left_pad=(10,)),
    # quantized caches (kv_codec): codes dequantized on load, odd ranks (int4 pads half a byte), views
    Case(3, 6, 2, 1, 37, 40, 56, "float16", left_pad=(0, 1, 0), kv="int8"),
    Case(3, 8, 2, 1, 37, 77, 41, "float32", left_pad=(4, 0, 9), view=True, chunk_len=16, kv="int4"),
    Case(1, 3, 1, 1, 300, 64, 33, "float16", kv="v-int4"),
    Case(1, 8, 2, 1, 70, 24, 56, "float32", view=True, chunk_len=48, prefetch=True, kv="int8"),
    Case(3, 6, 2, 5, 1, 41, 56, "float32", left_pad=(3, 0, 1), kv="int4"),
    Case(1, 4, 2, 33, 17, 64, 40, "float16", view=True, kv="v-int8"),
    Case(1, 12, 4, 9, 300, 33, 77, "float16", kv="int4"),
    # mixed codes (8-, 4- and 2-bit runs, each from a fresh byte; a layout per side), decode and prefill, views
    Case(3, 6, 2, 1, 37, 41, 23, "float32", left_pad=(0, 5, 0), view=True, chunk_len=16, kv="mixed"),
    Case(1, 8, 2, 1, 70, 64, 56, "float16", chunk_len=32, prefetch=True, kv="mixed"),
    Case(3, 6, 2, 5, 1, 45, 45, "float32", left_pad=(3, 0, 1), kv="mixed"),
    # pre-RoPE key latents rebuilt and turned in the op: GQA, left padding (positions count real tokens only),
    # odd and aligned latent ranks, chunked decode with prefetch, quantized latents, views
    Case(3, 6, 2, 1, 37, 24, 40, "float32", left_pad=(0, 5, 0), chunk_len=16, latent="half"),
    Case(2, 8, 2, 1, 70, 41, 56, "float16", left_pad=(9, 0), chunk_len=32, prefetch=True, latent="interleaved"),
    Case(1, 4, 4, 1, 300, 33, 33, "float32", view=True, latent="partial"),
    Case(3, 6, 2, 1, 37, 41, 40, "float32", left_pad=(4, 0, 9), chunk_len=16, kv="int4", latent="half"),
    Case(3, 6, 2, 5, 1, 24, 56, "float32", left_pad=(3, 0, 1), latent="half"),
    Case(1, 12, 4, 9, 300, 33, 64, "float16", view=True, latent="interleaved"),
    Case(1, 4, 2, 33, 17, 48, 40, "float32", kv="int8", latent="partial"),
    # joint latents (issue 13): one cache head read by all 9 query heads, latents wider than a head (SmolLM2 at
    # KV 0.63 keeps ~120 of 192 features per side)
    Case(2, 9, 1, 1, 300, 120, 184, "float16", left_pad=(0, 40), chunk_len=64),
    Case(2, 9, 1, 5, 17, 184, 120, "float32", left_pad=(2, 0)),
    Case(1, 9, 1, 1, 70, 117, 131, "float32", kv="int8"),
    # ... and in pre mode: the one latent rebuilt by each of the 3 KV heads' maps, read in place (head stride 0)
    Case(3, 6, 3, 1, 37, 24, 40, "float32", left_pad=(0, 5, 0), chunk_len=16, latent="half", joint=True),
    Case(2, 9, 3, 5, 17, 120, 120, "float16", left_pad=(2, 0), latent="half", joint=True),
    Case(1, 9, 3, 1, 70, 117, 131, "float32", kv="int8", latent="interleaved", joint=True),
    Case(2, 6, 2, 1, 33, 41, 24, "float16", left_pad=(3, 0), kv="int4", latent="partial", joint=True),
    Case(3, 6, 2, 1, 37, 41, 40, "float32", left_pad=(4, 0, 9), chunk_len=16, kv="mixed", latent="half"),
    Case(2, 9, 3, 5, 17, 120, 120, "float16", left_pad=(2, 0), kv="mixed", latent="half", joint=True),
]
LATENT_HEAD_DIM = 64

# Each should fail validation with a one-line error naming the tensor: (description, message part)
BAD_SHAPES = [
    ("q_3d", "q must be 4-D"),
    ("k_rank", "k must be [B=2, H_kv, P+S, r_k=16]"),
    ("v_len", "v must be [B=2, H_kv=2, P+S=6"),
    ("heads", "must divide q's H=4"),
    ("mask_len", "attention_mask must be [B=2, P+S=6]"),
    ("k_short", "k must hold the past plus the S=3"),
    ("dtype_mix", "must share one dtype"),
    ("rank_big", "r_v=300 is outside"),
    ("codes_dtype", "k codes must be torch.int8 [2, 2, 6, 16] for int8 rank 16"),
    ("scale_shape", "v scales must be float16 [2, 2, 6, 1]"),
    ("latent_basis", "latent keys' basis_cos must be float [H_kv=2, r_k=16, d=16]"),
    ("latent_positions", "latent keys' positions must be integer [B=2, P+S=6]"),
    ("latent_groups", "k has H_kv=3 heads, which must divide q's H=4"),
]


def make_inputs(case: Case, seed: int = 0):
    """q, k, v, attention_mask, scale for a case (k, v possibly views into a larger buffer)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    total = case.past + case.seq

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    width = LATENT_HEAD_DIM if case.latent else case.rank_k
    if case.view:
        q = randn(case.batch, case.seq, case.heads, width).transpose(1, 2)  # [B, H, S, r_k or d]
        capacity = total + 11  # a preallocated cache with room left: k is [:, :, :P+S]
        k = randn(case.batch, case.cache_heads, capacity, case.rank_k)[:, :, :total]
        v = randn(case.batch, case.cache_heads, capacity, case.rank_v)[:, :, :total]
    else:
        q = randn(case.batch, case.heads, case.seq, width)
        k = randn(case.batch, case.cache_heads, total, case.rank_k)
        v = randn(case.batch, case.cache_heads, total, case.rank_v)
    mask = torch.ones(case.batch, total, dtype=torch.int64)
    for row, pad in enumerate(case.left_pad):
        mask[row, :pad] = 0
    kv_dtype = case.kv.removeprefix("v-")
    if case.kv != "float":
        # encode the whole buffer, then take the same slices: codes and scales keep the buffer's strides
        sides = [k, v] if case.kv in ("int8", "int4", "mixed") else [v]
        counts = [mixed_counts(t.shape[-1], side) if kv_dtype == "mixed" else None for side, t in enumerate(sides)]
        quantized = [Quantized(*_encode_buffer(t, kv_dtype, case.view, total, c), kv_dtype, t.shape[-1], c)
                     for t, c in zip(sides, counts)]
        k, v = quantized if len(quantized) == 2 else (k, quantized[0])
    # 1/sqrt(d_original) with d_original above the ranks, as after a fold (DESIGN 3.1)
    scale = 1.0 / math.sqrt(max(case.rank_k, 64) * 1.5)
    return q, k, v, mask, scale


def latent_keys_for(case: Case, mask: torch.Tensor, seed: int = 1) -> LatentKeys | None:
    """The latent-key tables of a case: an orthonormal key basis per KV head (a joint latent: one over all KV heads'
    features) in the case's dtype (as the exporter makes them: fp16 maps take the kernels' fp16 dots), Llama's
    frequencies, an attention factor != 1, and each key's position counted over real tokens (the model's
    default_position_ids)."""
    if not case.latent:
        return None
    gen = torch.Generator().manual_seed(seed)
    d = LATENT_HEAD_DIM
    if case.joint:      # one orthonormal basis over all KV heads' features: ranks up to H_kv x d, in H_kv blocks
        width = case.heads_kv * d
        basis = torch.linalg.qr(torch.randn(width, width, generator=gen))[0][:, :case.rank_k]
        basis = basis.reshape(case.heads_kv, d, case.rank_k)
    else:
        basis = torch.linalg.qr(torch.randn(case.heads_kv, d, d, generator=gen))[0][..., :case.rank_k]
    rope_dim = d // 4 if case.latent == "partial" else d
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rope_dim, 2).float() / rope_dim)
    layout = "interleaved" if case.latent == "interleaved" else "half"
    return LatentKeys(*latent_key_tables(basis.to(getattr(torch, case.dtype)), inv_freq, rope_dim, layout, gain=1.2),
                      (mask.cumsum(-1) - 1).clamp(min=0))


def mixed_counts(rank: int, side: int) -> tuple[int, int, int]:
    """A mixed layout (8-, 4-, 2-bit counts) with every width present and odd runs: keys (side 0) and values differ."""
    n8, n4 = (rank // 4, rank // 2 + 1) if side == 0 else (rank // 3, rank // 3)
    return n8, n4, rank - n8 - n4


def _encode_buffer(t, kv_dtype, view, total, counts=None):
    """(codes, scales) of t; for a view, of the buffer it slices, sliced the same way."""
    if view:
        buffer = t._base if t._base is not None else t
        codes, scale = encode(buffer, kv_dtype, counts)
        return codes[:, :, :total], scale[:, :, :total]
    return encode(t.float(), kv_dtype, counts)


# ---------------------------------------------------------------- the reference, in-process


def _naive_attention(q, k, v, mask, scale):
    """One query at a time, in float64: an independent statement of the semantics."""
    batch, heads, seq, _ = q.shape
    total = k.shape[2]
    group, v_group, past = heads // k.shape[1], heads // v.shape[1], total - seq   # v: one head if joint
    out = torch.zeros(batch, heads, seq, v.shape[3], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(seq):
                keys = [j for j in range(past + i + 1) if mask is None or mask[b, j] != 0]
                if not keys:
                    continue  # a padding query: zeros by definition
                kk = k[b, h // group, keys].double()
                weights = torch.softmax(kk @ q[b, h, i].double() * scale, dim=0)
                out[b, h, i] = weights @ v[b, h // v_group, keys].double()
    return out


@pytest.mark.parametrize("case", [c for c in CASES if c.dtype == "float32"], ids=lambda c: c.name)
def test_reference_matches_naive_loop(case):
    q, k, v, mask, scale = make_inputs(case)
    latent_keys = latent_keys_for(case, mask)
    got = lowrank_attention_reference(q, k, v, mask, scale, latent_keys)
    assert got.shape == (case.batch, case.heads, case.seq, case.rank_v)
    assert got.dtype == q.dtype
    k, v = (t.values(torch.float64) if isinstance(t, Quantized) else t for t in (k, v))   # what the codes mean
    if latent_keys is not None:
        k = latent_keys.keys(k)
    torch.testing.assert_close(got.double(), _naive_attention(q, k, v, mask, scale),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_dtype", [None, "int4"])
def test_a_joint_latent_is_read_by_every_kv_heads_maps(kv_dtype):
    """One cache head (a joint latent) gives what the same latent copied to each KV head gives: each KV head's maps
    rebuild its keys from it, and every query head reads it as its values."""
    case = Case(2, 6, 3, 4, 9, 24, 40, "float32", left_pad=(0, 3), latent="half", joint=True,
                kv=kv_dtype or "float")
    q, k, v, mask, scale = make_inputs(case)
    latent = latent_keys_for(case, mask)

    def copied(t):
        if isinstance(t, Quantized):
            return Quantized(copied(t.codes), copied(t.scale), t.kv_dtype, t.rank)
        return t.repeat(1, case.heads_kv, 1, 1)
    got = lowrank_attention_reference(q, k, v, mask, scale, latent)
    torch.testing.assert_close(got, lowrank_attention_reference(q, copied(k), copied(v), mask, scale, latent),
                               atol=1e-6, rtol=1e-6)
    # and not what one KV head's maps alone would give
    first = LatentKeys(latent.basis_cos[:1], latent.basis_sin[:1], latent.freq, latent.positions)
    assert (got - lowrank_attention_reference(q, k, v, mask, scale, first)).abs().max() > 1e-2


def test_reference_padding_queries_are_zero_and_finite():
    case = Case(2, 4, 2, 6, 0, 16, 8, "float16", left_pad=(4, 0))
    q, k, v, mask, scale = make_inputs(case)
    out = lowrank_attention_reference(q, k, v, mask, scale)
    assert torch.isfinite(out).all()
    assert (out[0, :, :4] == 0).all()  # queries 0..3 of row 0 are padding: no visible key
    assert (out[0, :, 4:] != 0).any()


def test_reference_equals_sdpa_with_gqa_and_offset_causal_mask():
    """At full rank with no padding the op is ordinary causal GQA attention."""
    q, k, v, _, _ = make_inputs(Case(2, 6, 2, 5, 7, 32, 32, "float32"))
    scale = 1 / math.sqrt(32)
    k_heads, v_heads = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    causal = torch.ones(5, 12, dtype=torch.bool).tril(diagonal=7)  # query i sees keys 0..7+i
    want = torch.nn.functional.scaled_dot_product_attention(q, k_heads, v_heads,
                                                            attn_mask=causal, scale=scale)
    got = lowrank_attention_reference(q, k, v, None, scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,kv_dtype", [("llama-gqa", None), ("qwen2", "int8"), ("mistral", "int4"),
                                           ("gpt_neox", None)])
def test_latent_keys_reproduce_the_models_pre_mode_attention(name, kv_dtype):
    """The op fed the cached key latents and latent_key_tables of a folded `pre` model gives what the model's own
    attention core gives from the keys it rebuilds and rotates in full (GPT-NeoX: half the features rotated), with
    left padding, in every layer; int8 / int4: the cached latents are codes and scales."""
    from eigen_export.modeling import default_position_ids
    from tests.helpers.folds import tiny_fold
    from tests.helpers.tiny_models import ptb_like_ids

    _, _, folded, _, ranks, _ = tiny_fold(name, "pre", 0.5, 0.75, kv_dtype=kv_dtype, rotate=bool(kv_dtype))
    spec = folded.spec
    seen = []
    for block in folded.layers:
        def core(q, k, v, ctx, present, k_scale=None, v_scale=None, original=block.attn.core, attn=block.attn):
            out = original(q, k, v, ctx, present, k_scale, v_scale)
            seen.append((attn, q, present, ctx.attention_mask, out))
            return out
        block.attn.core = core
    ids = ptb_like_ids(2, 11, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        folded(ids, mask, default_position_ids(mask, 0), None)
    assert len(seen) == spec.num_layers
    for attn, q, present, attention_mask, want in seen:
        tables = latent_key_tables(attn.basis_k, folded.inv_freq, spec.rope_dim, spec.rope_layout, folded.rope_scaling)
        k, v = present[:2]
        if kv_dtype is not None:
            k, v = (Quantized(c, s, kv_dtype, r) for c, s, r in ((present[0], present[2], attn.ranks.k),
                                                                (present[1], present[3], attn.ranks.v)))
        assert k.shape[-1] == attn.ranks.k < spec.head_dim == q.shape[-1]
        got = lowrank_attention_reference(q, k, v, attention_mask, spec.softmax_scale,
                                          LatentKeys(*tables, default_position_ids(attention_mask, 0)))
        real = mask.bool()[:, None, :, None].expand_as(want)        # padding queries: zeros here, anything there
        torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)


def _bad_inputs(kind: str):
    """Valid inputs (B=2, H=4, H_kv=2, S=3, P=3, r_k=16, r_v=8) with one thing broken: the arguments of
    check_inputs (q, k, v, attention_mask, scale, latent_keys)."""
    q, k, v = torch.zeros(2, 4, 3, 16), torch.zeros(2, 2, 6, 16), torch.zeros(2, 2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.int64)
    latent = None
    if kind.startswith("latent"):
        maps, positions = torch.zeros(2, 16, 16), torch.zeros(2, 6, dtype=torch.int64)
        if kind == "latent_basis":
            latent = LatentKeys(torch.zeros(2, 16, 12), maps, torch.zeros(16), positions)
        elif kind == "latent_groups":           # a joint latent (one cache head) whose maps have 3 KV heads
            k, v, maps = k[:, :1], v[:, :1], torch.zeros(3, 16, 16)
            latent = LatentKeys(maps, maps, torch.zeros(16), positions)
        else:
            latent = LatentKeys(maps, maps, torch.zeros(16), positions.float())
    if kind == "q_3d":
        q = q[0]
    elif kind == "k_rank":
        k = torch.zeros(2, 2, 6, 12)
    elif kind == "v_len":
        v = torch.zeros(2, 2, 5, 8)
    elif kind == "heads":
        k, v = torch.zeros(2, 3, 6, 16), torch.zeros(2, 3, 6, 8)
    elif kind == "mask_len":
        mask = torch.ones(2, 5, dtype=torch.int64)
    elif kind == "k_short":
        k, v, mask = torch.zeros(2, 2, 2, 16), torch.zeros(2, 2, 2, 8), torch.ones(2, 2)
    elif kind == "dtype_mix":
        k = k.half()
    elif kind == "rank_big":
        v = torch.zeros(2, 2, 6, 300)
    elif kind == "codes_dtype":
        k = Quantized(torch.zeros(2, 2, 6, 16, dtype=torch.uint8), torch.zeros(2, 2, 6, 1).half(), "int8", 16)
    elif kind == "scale_shape":
        v = Quantized(torch.zeros(2, 2, 6, 8, dtype=torch.int8), torch.zeros(2, 2, 6, 8).half(), "int8", 8)
    return q, k, v, mask, 0.125, latent


@pytest.mark.parametrize("kind,message", BAD_SHAPES, ids=[b[0] for b in BAD_SHAPES])
def test_reference_rejects_bad_shapes_clearly(kind, message):
    with pytest.raises(ValueError, match="lowrank_attention: ") as err:
        check_inputs(*_bad_inputs(kind))
    assert message in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- the kernels, in a subprocess


@pytest.fixture(scope="module")
def kernel_results(tmp_path_factory):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install -e '.[dev]' provides it)")
    from tests.helpers.shared import built_once          # here: the file also runs as the kernel worker

    def run_worker(out):
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run([sys.executable, __file__, "--kernel-worker"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=900)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            pytest.fail(f"kernel worker failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
        (out / "results.json").write_text(lines[-1])

    results = json.loads((built_once(tmp_path_factory, "kernel-results", run_worker) / "results.json").read_text())
    if "skip" in results:
        pytest.skip(results["skip"])
    return results


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_matches_reference(kernel_results, case):
    result = kernel_results["cases"][case.name]
    assert "error" not in result, result.get("error")
    atol, rtol = TOLERANCES[case.dtype]
    assert result["finite"], "non-finite output"
    assert result["excess"] <= 0, (f"max abs error {result['max_abs_err']:.3g} exceeds "
                                   f"atol {atol} + rtol {rtol} * |ref| by {result['excess']:.3g}")


@pytest.mark.parametrize("kind,message", BAD_SHAPES, ids=[b[0] for b in BAD_SHAPES])
def test_kernel_entry_rejects_bad_shapes_clearly(kernel_results, kind, message):
    got = kernel_results["bad_shapes"][kind]
    assert message in got and "\n" not in got, got


def _kernel_worker() -> dict:
    """Runs under TRITON_INTERPRET=1: every case through the kernel entry, errors as numbers."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    try:
        from eigen_export_plugins.lowrank_attention.triton_kernels import DecodeConfig, lowrank_attention
    except ImportError as err:
        return {"skip": f"triton is not importable: {err}"}
    cases = {}
    for case in CASES:
        try:
            q, k, v, mask, scale = make_inputs(case)
            latent_keys = latent_keys_for(case, mask)
            config = (DecodeConfig(block_n=16, chunk_len=case.chunk_len, prefetch=case.prefetch)
                      if case.chunk_len else None)
            got = lowrank_attention(q, k, v, mask, scale, latent_keys=latent_keys, decode_config=config).float()
            want = lowrank_attention_reference(q, k, v, mask, scale, latent_keys).float()
            atol, rtol = TOLERANCES[case.dtype]
            err = (got - want).abs()
            cases[case.name] = {
                "max_abs_err": err.max().item(),
                "excess": (err - atol - rtol * want.abs()).max().item(),
                "finite": bool(torch.isfinite(got).all()),
                "case": asdict(case),
            }
        except Exception as exc:  # reported per case, so one failure does not hide the rest
            cases[case.name] = {"error": f"{type(exc).__name__}: {exc}"}
    bad = {}
    for kind, _ in BAD_SHAPES:
        try:
            *args, latent = _bad_inputs(kind)
            lowrank_attention(*args, latent_keys=latent)
            bad[kind] = "no error raised"
        except ValueError as exc:
            bad[kind] = str(exc)
    return {"cases": cases, "bad_shapes": bad}


if __name__ == "__main__" and "--kernel-worker" in sys.argv:
    print(json.dumps(_kernel_worker()))
