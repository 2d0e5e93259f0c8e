"""Triton kernels of the low-rank attention op (DESIGN 6); semantics in reference.py.

Two paths, picked by the number of new tokens S:
- prefill (S > 1): flash-attention style; one program per (block of queries, batch, query head),
  online softmax over key blocks, keys past the block's causal horizon never loaded.
- decode (S == 1): flash-decoding; the cache is split along its length into chunks, one program per
  (chunk, batch, KV head) handles every query head of that KV head's GQA group, so each cached key
  and value is read once per group (decode is bound by cache bandwidth, not by compute). Each
  program writes an unnormalised partial output with its running max and sum; a reduce kernel
  combines the chunks.
Ranks are padded to the next power of two (tl.arange and tl.dot need it, >= 16 for tl.dot) and the
padding is masked on load, so ranks like 40, 56 or 77 need no copy of the cache. Every tensor is
addressed through explicit strides: the cache may be a view into a larger preallocated buffer.
Accumulation is fp32 for every input dtype; fp32 inputs use IEEE dots (TF32 would cost ~1e-3).
With latent keys (rope_mode `pre`, latent_rope.py) the cache holds pre-RoPE key latents: every key block is
turned into rotated full-width keys in registers (the latent times its KV head's two [r_k, d] maps, 16 latent
coordinates at a time, then a cos / sin per feature), so only the reduced cache crosses memory.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .kv_codec import Quantized
from .latent_rope import LatentKeys
from .reference import check_inputs

LOG2E = 1.4426950408889634
# Finite start for the running max: with -inf, a block whose keys are all masked would compute
# exp2(-inf - -inf) = nan. Any real scaled score is far above it.
_NO_SCORE = tl.constexpr(-1.0e30)


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    # Split the cache until there are about this many programs per SM: decode is latency bound on
    # memory, so each SM needs several programs' loads in flight.
    programs_per_sm: int = 4
    # Shortest chunk worth a program; a fixed chunk_len (a multiple of block_n) overrides the split.
    min_chunk: int = 256
    chunk_len: int | None = None
    # Register double buffering of the next key block (see _decode_split_kernel); helps ranks whose
    # rows are not 16-byte aligned, at the price of registers.
    prefetch: bool = False


@triton.jit
def _attend_block(q, k, v, visible, m_i, l_i, acc, qk_scale_log2, IEEE_DOT: tl.constexpr):
    """One key block of the online softmax: q [M, RK], k [N, RK], v [N, RV], visible [M, N]."""
    k, v = k.to(q.dtype), v.to(q.dtype)          # a dequantized side arrives in fp32
    if IEEE_DOT:
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        scores = tl.dot(q, tl.trans(k))
    scores = tl.where(visible, scores * qk_scale_log2, float("-inf"))  # [M, N], log2 domain
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE_DOT:
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _load_side(base, scale_base, keys, key_ok, offs_r, r_ok, stride_t, stride_r, stride_st, n8, n4,
               BITS: tl.constexpr):
    """[BLOCK_N, R_PAD] of one cache side (BITS: CODE_KINDS): the stored floats, or int8 / int4 / mixed codes times
    each token's fp16 scale, in fp32; masked elements are 0, as the padding past the rank must be. Mid-rise packed
    codes (kv_codec's format) stand for c - 2^(w-1) + 1/2: int4 element j is nibble j % 2 of byte j // 2; mixed:
    the first n8 numbers are one byte each, the next n4 two to a byte, the rest four to a byte, each run from a
    fresh byte, lowest bits first (int4 keeps its own branch: its byte index j // 2 is what the compiler can turn
    into vector loads)."""
    ok = key_ok[:, None] & r_ok[None, :]
    if BITS == 0:
        x = tl.load(base + keys[:, None] * stride_t + offs_r[None, :] * stride_r, mask=ok, other=0.0)
    else:
        if BITS == 8:
            codes = tl.load(base + keys[:, None] * stride_t + offs_r[None, :] * stride_r, mask=ok, other=0)
            codes = codes.to(tl.float32)
        elif BITS == 4:
            packed = tl.load(base + keys[:, None] * stride_t + (offs_r[None, :] // 2) * stride_r, mask=ok, other=8)
            codes = ((packed.to(tl.int32) >> ((offs_r[None, :] % 2) * 4)) & 15) - 8
            codes = tl.where(ok, codes.to(tl.float32) + 0.5, 0.0)
        else:
            wide, mid = offs_r < n8, offs_r < n8 + n4
            i4, i2 = offs_r - n8, offs_r - n8 - n4
            i2 = tl.where(mid, 0, i2)                    # keeps the unused branch's arithmetic non-negative
            byte = tl.where(wide, offs_r, tl.where(mid, n8 + i4 // 2, n8 + (n4 + 1) // 2 + i2 // 4))
            shift = tl.where(wide, 0, tl.where(mid, (i4 % 2) * 4, (i2 % 4) * 2))
            bits = tl.where(wide, 8, tl.where(mid, 4, 2))
            packed = tl.load(base + keys[:, None] * stride_t + byte[None, :] * stride_r, mask=ok, other=0)
            codes = ((packed.to(tl.int32) >> shift[None, :]) & ((1 << bits[None, :]) - 1)) - (1 << (bits[None, :] - 1))
            codes = tl.where(ok, codes.to(tl.float32) + 0.5, 0.0)
        s = tl.load(scale_base + keys * stride_st, mask=key_ok, other=0.0).to(tl.float32)
        x = codes * s[:, None]
    return x


@triton.jit
def _load_kv(k_base, v_base, ks_base, vs_base, keys, key_ok, offs_rk, offs_rv, rk_ok, rv_ok,
             stride_kt, stride_kr, stride_vt, stride_vr, stride_kst, stride_vst, k_n8, k_n4, v_n8, v_n4,
             K_BITS: tl.constexpr, V_BITS: tl.constexpr):
    k = _load_side(k_base, ks_base, keys, key_ok, offs_rk, rk_ok, stride_kt, stride_kr, stride_kst, k_n8, k_n4, K_BITS)
    v = _load_side(v_base, vs_base, keys, key_ok, offs_rv, rv_ok, stride_vt, stride_vr, stride_vst, v_n8, v_n4, V_BITS)
    return k, v  # [BLOCK_N, RK_PAD], [BLOCK_N, RV_PAD]


@triton.jit
def _latent_keys(k_base, ks_base, keys, key_ok, rank_k, stride_kt, stride_kr, stride_kst, cos_base, sin_base,
                 stride_lr, stride_ld, freq, offs_qk, qk_ok, pos_base, stride_pt, k_n8, k_n4, K_BITS: tl.constexpr,
                 IEEE_DOT: tl.constexpr, RK_PAD: tl.constexpr, QK_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_N, QK_PAD] fp32 rotated keys of a block of cached key latents at their positions (latent_rope.py).
    The latent times the KV head's two [r_k, d] maps is summed over chunks of 16 latent coordinates, each chunk's
    codes and map rows loaded in turn (the maps come from L1 / L2, shared by every block and program): the whole
    maps would take 64 KB of shared memory at r_k 128 x d 128 in fp16, past the 48 KB a TensorRT AOT launch
    gets. The dots take the maps' dtype (fp16 / bf16: tensor cores, fp32 sums), IEEE fp32 for fp32 models."""
    part_cos = tl.zeros([BLOCK_N, QK_PAD], tl.float32)
    part_sin = tl.zeros([BLOCK_N, QK_PAD], tl.float32)
    for c0 in range(0, RK_PAD, 16):
        offs_c = c0 + tl.arange(0, 16)
        c_ok = offs_c < rank_k
        latent = _load_side(k_base, ks_base, keys, key_ok, offs_c, c_ok, stride_kt, stride_kr, stride_kst, k_n8, k_n4,
                            K_BITS)
        rows = offs_c[:, None] * stride_lr + offs_qk[None, :] * stride_ld
        ok = c_ok[:, None] & qk_ok[None, :]
        map_cos = tl.load(cos_base + rows, mask=ok, other=0.0)
        map_sin = tl.load(sin_base + rows, mask=ok, other=0.0)
        if IEEE_DOT:
            latent = latent.to(tl.float32)
            part_cos = tl.dot(latent, map_cos.to(tl.float32), part_cos, input_precision="ieee")
            part_sin = tl.dot(latent, map_sin.to(tl.float32), part_sin, input_precision="ieee")
        else:
            latent = latent.to(map_cos.dtype)
            part_cos = tl.dot(latent, map_cos, part_cos)
            part_sin = tl.dot(latent, map_sin, part_sin)
    pos = tl.load(pos_base + keys * stride_pt, mask=key_ok, other=0).to(tl.float32)
    angle = pos[:, None] * freq[None, :]
    return part_cos * tl.cos(angle) + part_sin * tl.sin(angle)


# Sizes and counts are not specialised on (only strides are, for vectorised loads): otherwise every
# new cache length or split count would compile another kernel variant.
@triton.jit(do_not_specialize=["num_heads", "seq_len", "total_len", "group_size", "k_n8", "k_n4", "v_n8", "v_n4"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, mask_ptr, out_ptr, lcos_ptr, lsin_ptr, freq_ptr, pos_ptr,
    stride_qb, stride_qh, stride_qs, stride_qr,
    stride_kb, stride_kh, stride_kt, stride_kr,
    stride_vb, stride_vh, stride_vt, stride_vr,
    stride_ksb, stride_ksh, stride_kst, stride_vsb, stride_vsh, stride_vst,
    stride_mb, stride_mt,
    stride_ob, stride_oh, stride_os, stride_or,
    stride_lh, stride_lr, stride_ld, stride_pb, stride_pt,
    num_heads, seq_len, total_len, group_size, rank_k, rank_v, qk_dim, qk_scale_log2, k_n8, k_n4, v_n8, v_n4,
    HAS_MASK: tl.constexpr, IEEE_DOT: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    LATENT_KEYS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RK_PAD: tl.constexpr,
    RV_PAD: tl.constexpr, QK_PAD: tl.constexpr,
):
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    # int64 offsets: batch * batch_stride of a large cache overflows int32 (32 x 32 x 32k x 128).
    b = (batch_head // num_heads).to(tl.int64)
    head = batch_head % num_heads
    kv_head = (head // group_size).to(tl.int64)
    head = head.to(tl.int64)
    past = total_len - seq_len

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_rk = tl.arange(0, RK_PAD)
    offs_rv = tl.arange(0, RV_PAD)
    offs_qk = tl.arange(0, QK_PAD)
    row_ok = offs_m < seq_len
    rk_ok = offs_rk < rank_k
    rv_ok = offs_rv < rank_v
    qk_ok = offs_qk < qk_dim

    q = tl.load(q_ptr + b * stride_qb + head * stride_qh
                + offs_m[:, None] * stride_qs + offs_qk[None, :] * stride_qr,
                mask=row_ok[:, None] & qk_ok[None, :], other=0.0)  # [BLOCK_M, QK_PAD]
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh
    ks_base = ks_ptr + b * stride_ksb + kv_head * stride_ksh
    vs_base = vs_ptr + b * stride_vsb + kv_head * stride_vsh
    if LATENT_KEYS:
        cos_base, sin_base = lcos_ptr + kv_head * stride_lh, lsin_ptr + kv_head * stride_lh
        freq = tl.load(freq_ptr + offs_qk, mask=qk_ok, other=0.0).to(tl.float32)
        pos_base = pos_ptr + b * stride_pb

    m_i = tl.full([BLOCK_M], _NO_SCORE, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, RV_PAD], tl.float32)
    # The last query of this block sits at past + (block_m + 1) * BLOCK_M - 1: later keys are unseen.
    key_end = tl.minimum(total_len, past + (block_m + 1) * BLOCK_M)
    for start_n in range(0, key_end, BLOCK_N):
        keys = start_n + offs_n
        key_ok = keys < total_len
        if LATENT_KEYS:
            k = _latent_keys(k_base, ks_base, keys, key_ok, rank_k, stride_kt, stride_kr, stride_kst, cos_base,
                             sin_base, stride_lr, stride_ld, freq, offs_qk, qk_ok, pos_base, stride_pt, k_n8, k_n4,
                             K_BITS, IEEE_DOT, RK_PAD, QK_PAD, BLOCK_N)
            v = _load_side(v_base, vs_base, keys, key_ok, offs_rv, rv_ok, stride_vt, stride_vr, stride_vst, v_n8, v_n4,
                           V_BITS)
        else:
            k, v = _load_kv(k_base, v_base, ks_base, vs_base, keys, key_ok, offs_rk, offs_rv, rk_ok, rv_ok,
                            stride_kt, stride_kr, stride_vt, stride_vr, stride_kst, stride_vst, k_n8, k_n4, v_n8, v_n4,
                            K_BITS, V_BITS)
        visible = key_ok[None, :] & (keys[None, :] <= past + offs_m[:, None])
        if HAS_MASK:
            real = tl.load(mask_ptr + b * stride_mb + keys * stride_mt, mask=key_ok, other=0)
            visible = visible & (real != 0)[None, :]
        m_i, l_i, acc = _attend_block(q, k, v, visible, m_i, l_i, acc, qk_scale_log2, IEEE_DOT)

    # l_i >= 1 wherever a key was visible (the max key contributes exp2(0)); a row with none
    # has acc == 0, so dividing by max(l_i, 1) yields the documented zeros.
    out = acc / tl.maximum(l_i, 1.0)[:, None]
    tl.store(out_ptr + b * stride_ob + head * stride_oh
             + offs_m[:, None] * stride_os + offs_rv[None, :] * stride_or,
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & rv_ok[None, :])


@triton.jit(do_not_specialize=["num_kv_heads", "total_len", "group_size", "chunk_len", "num_splits",
                               "k_n8", "k_n4", "v_n8", "v_n4"])
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, mask_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    lcos_ptr, lsin_ptr, freq_ptr, pos_ptr,
    stride_qb, stride_qh, stride_qr,
    stride_kb, stride_kh, stride_kt, stride_kr,
    stride_vb, stride_vh, stride_vt, stride_vr,
    stride_ksb, stride_ksh, stride_kst, stride_vsb, stride_vsh, stride_vst,
    stride_mb, stride_mt,
    stride_lh, stride_lr, stride_ld, stride_pb, stride_pt,
    num_kv_heads, total_len, group_size, rank_k, rank_v, qk_dim, chunk_len, num_splits, qk_scale_log2,
    k_n8, k_n4, v_n8, v_n4, HAS_MASK: tl.constexpr, IEEE_DOT: tl.constexpr, PREFETCH: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, LATENT_KEYS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, RK_PAD: tl.constexpr, RV_PAD: tl.constexpr,
    QK_PAD: tl.constexpr,
):
    split = tl.program_id(0)
    batch_kv = tl.program_id(1)
    b = (batch_kv // num_kv_heads).to(tl.int64)
    kv_head = batch_kv % num_kv_heads

    offs_g = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_rk = tl.arange(0, RK_PAD)
    offs_rv = tl.arange(0, RV_PAD)
    offs_qk = tl.arange(0, QK_PAD)
    in_group = offs_g < group_size
    rk_ok = offs_rk < rank_k
    rv_ok = offs_rv < rank_v
    qk_ok = offs_qk < qk_dim
    heads = (kv_head * group_size + offs_g).to(tl.int64)  # the query heads reading this KV head
    kv_head = kv_head.to(tl.int64)

    # The one new token of each query head; rows past the group are zero padding for tl.dot.
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_qk[None, :] * stride_qr,
                mask=in_group[:, None] & qk_ok[None, :], other=0.0)  # [BLOCK_H, QK_PAD]
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh
    ks_base = ks_ptr + b * stride_ksb + kv_head * stride_ksh
    vs_base = vs_ptr + b * stride_vsb + kv_head * stride_vsh
    if LATENT_KEYS:
        cos_base, sin_base = lcos_ptr + kv_head * stride_lh, lsin_ptr + kv_head * stride_lh
        freq = tl.load(freq_ptr + offs_qk, mask=qk_ok, other=0.0).to(tl.float32)
        pos_base = pos_ptr + b * stride_pb

    m_i = tl.full([BLOCK_H], _NO_SCORE, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, RV_PAD], tl.float32)
    # The new token sits at position total_len - 1, so causality hides nothing: only padding.
    start = split * chunk_len
    end = tl.minimum(start + chunk_len, total_len)
    if PREFETCH:
        # Rows of a rank that is not a multiple of 16 are not 16-byte aligned: their loads are
        # 2-byte scalars that the compiler does not pipeline. Loading block i+1 into registers
        # before computing block i keeps those loads in flight during the math. (Not with latent keys: the
        # launcher turns it off, their chunked loads live inside the rebuild.)
        keys = start + offs_n
        k, v = _load_kv(k_base, v_base, ks_base, vs_base, keys, keys < end, offs_rk, offs_rv, rk_ok, rv_ok,
                        stride_kt, stride_kr, stride_vt, stride_vr, stride_kst, stride_vst, k_n8, k_n4, v_n8, v_n4,
                        K_BITS, V_BITS)
        for start_n in range(start, end, BLOCK_N):
            keys = start_n + offs_n
            key_ok = keys < end
            k_next, v_next = _load_kv(k_base, v_base, ks_base, vs_base, keys + BLOCK_N, keys + BLOCK_N < end,
                                      offs_rk, offs_rv, rk_ok, rv_ok, stride_kt, stride_kr, stride_vt, stride_vr,
                                      stride_kst, stride_vst, k_n8, k_n4, v_n8, v_n4, K_BITS, V_BITS)
            visible = key_ok
            if HAS_MASK:
                real = tl.load(mask_ptr + b * stride_mb + keys * stride_mt, mask=key_ok, other=0)
                visible = visible & (real != 0)
            m_i, l_i, acc = _attend_block(q, k, v, visible[None, :], m_i, l_i, acc,
                                          qk_scale_log2, IEEE_DOT)
            k, v = k_next, v_next
    else:
        for start_n in range(start, end, BLOCK_N):
            keys = start_n + offs_n
            key_ok = keys < end
            if LATENT_KEYS:
                k = _latent_keys(k_base, ks_base, keys, key_ok, rank_k, stride_kt, stride_kr, stride_kst, cos_base,
                                 sin_base, stride_lr, stride_ld, freq, offs_qk, qk_ok, pos_base, stride_pt, k_n8, k_n4,
                                 K_BITS, IEEE_DOT, RK_PAD, QK_PAD, BLOCK_N)
                v = _load_side(v_base, vs_base, keys, key_ok, offs_rv, rv_ok, stride_vt, stride_vr, stride_vst,
                               v_n8, v_n4, V_BITS)
            else:
                k, v = _load_kv(k_base, v_base, ks_base, vs_base, keys, key_ok, offs_rk, offs_rv, rk_ok, rv_ok,
                                stride_kt, stride_kr, stride_vt, stride_vr, stride_kst, stride_vst, k_n8, k_n4, v_n8,
                                v_n4, K_BITS, V_BITS)
            visible = key_ok
            if HAS_MASK:
                real = tl.load(mask_ptr + b * stride_mb + keys * stride_mt, mask=key_ok, other=0)
                visible = visible & (real != 0)
            m_i, l_i, acc = _attend_block(q, k, v, visible[None, :], m_i, l_i, acc,
                                          qk_scale_log2, IEEE_DOT)

    # partials: [B, H, num_splits, (RV_PAD)] contiguous fp32, allocated by the launcher
    num_heads = num_kv_heads * group_size
    row = (b * num_heads + heads) * num_splits + split  # [BLOCK_H]
    tl.store(part_max_ptr + row, m_i, mask=in_group)
    tl.store(part_sum_ptr + row, l_i, mask=in_group)
    tl.store(part_acc_ptr + row[:, None] * RV_PAD + offs_rv[None, :], acc, mask=in_group[:, None])


@triton.jit(do_not_specialize=["num_heads", "num_splits"])
def _decode_reduce_kernel(
    part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr,
    stride_ob, stride_oh, stride_or,
    num_heads, num_splits, rank_v,
    SPLIT_BLOCK: tl.constexpr, RV_PAD: tl.constexpr,
):
    batch_head = tl.program_id(0)
    b = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    first_row = batch_head.to(tl.int64) * num_splits
    offs_s = tl.arange(0, SPLIT_BLOCK)
    offs_rv = tl.arange(0, RV_PAD)

    # Pass 1: the global max, so every chunk's weight exp2(m_chunk - m_max) is <= 1.
    m_max = tl.full([SPLIT_BLOCK], _NO_SCORE, tl.float32)
    for s0 in range(0, num_splits, SPLIT_BLOCK):
        ok = s0 + offs_s < num_splits
        m_max = tl.maximum(m_max, tl.load(part_max_ptr + first_row + s0 + offs_s, mask=ok,
                                          other=_NO_SCORE))
    m_all = tl.max(m_max, 0)

    # Pass 2: sum the rescaled partial outputs and softmax denominators.
    numer = tl.zeros([RV_PAD], tl.float32)
    denom = tl.zeros([SPLIT_BLOCK], tl.float32)
    for s0 in range(0, num_splits, SPLIT_BLOCK):
        ok = s0 + offs_s < num_splits
        rows = first_row + s0 + offs_s
        m = tl.load(part_max_ptr + rows, mask=ok, other=_NO_SCORE)
        l = tl.load(part_sum_ptr + rows, mask=ok, other=0.0)
        acc = tl.load(part_acc_ptr + rows[:, None] * RV_PAD + offs_rv[None, :],
                      mask=ok[:, None], other=0.0)  # [SPLIT_BLOCK, RV_PAD]
        weight = tl.exp2(m - m_all)
        numer += tl.sum(weight[:, None] * acc, 0)
        denom += weight * l
    # As in the prefill kernel: the denominator is >= 1 unless no key was visible (then numer == 0).
    out = numer / tl.maximum(tl.sum(denom, 0), 1.0)
    tl.store(out_ptr + b * stride_ob + head * stride_oh + offs_rv * stride_or,
             out.to(out_ptr.dtype.element_ty), mask=offs_rv < rank_v)


def _padded(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the CPU interpreter: a small number still exercises several chunks
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def decode_split_plan(total_len: int, batch: int, heads_kv: int, config: DecodeConfig,
                      num_sms: int) -> tuple[int, int]:
    """(chunk_len, num_splits) for a cache of total_len keys; chunk_len is a multiple of block_n."""
    block_n = config.block_n
    if config.chunk_len is not None:
        chunk = triton.cdiv(config.chunk_len, block_n) * block_n
    else:
        wanted_splits = max(1, triton.cdiv(config.programs_per_sm * num_sms, batch * heads_kv))
        chunk = max(triton.cdiv(total_len, wanted_splits), config.min_chunk)
        chunk = triton.cdiv(chunk, block_n) * block_n
    chunk = max(chunk, block_n)
    return chunk, triton.cdiv(total_len, chunk)


def _mask_for_kernel(attention_mask: torch.Tensor | None, fallback: torch.Tensor):
    if attention_mask is None:
        return fallback, 0, 0, False  # never read: HAS_MASK is False
    if attention_mask.dtype == torch.bool:
        attention_mask = attention_mask.view(torch.uint8)  # same bytes, a dtype Triton loads
    return attention_mask, attention_mask.stride(0), attention_mask.stride(1), True


# The kernels' K_BITS / V_BITS: how a cache side is stored (floats: 0)
CODE_KINDS = {"int8": 8, "int4": 4, "mixed": 1}


@dataclass(frozen=True)
class _Side:
    """What a kernel reads of one cache side: the tensor, its scales (a placeholder pointer for floats; never
    read) and their strides, the code kind (CODE_KINDS; 0: floats) and, mixed, how many leading numbers are 8-bit,
    then 4-bit (kv_codec.Quantized.runs)."""
    data: torch.Tensor
    scale: torch.Tensor
    scale_strides: tuple[int, int, int]
    bits: int
    runs: tuple[int, int] = (0, 0)

    @classmethod
    def of(cls, t: torch.Tensor | Quantized) -> "_Side":
        if not isinstance(t, Quantized):
            return cls(t, t, (0, 0, 0), 0)
        return cls(t.codes, t.scale, tuple(t.scale.stride()[:3]), CODE_KINDS[t.kv_dtype], t.runs)


def lowrank_attention(q: torch.Tensor, k: torch.Tensor | Quantized, v: torch.Tensor | Quantized,
                      attention_mask: torch.Tensor | None, scale: float, *,
                      latent_keys: LatentKeys | None = None,
                      prefill_config: PrefillConfig | None = None,
                      decode_config: DecodeConfig | None = None) -> torch.Tensor:
    """Causal GQA attention in the low-rank space -> [B, H, S, r_v] in q's dtype.

    q [B, H, S, r_k]; k [B, H_kv, P+S, r_k]; v [B, H_kv, P+S, r_v]; attention_mask [B, P+S]
    (1 = real token, 0 = padding; None = no padding); scale = 1/sqrt(d_original). k and v may each be a
    quantized cache (kv_codec.Quantized: int8, or packed int4 / mixed codes, + fp16 scales), dequantized on load.
    latent_keys: k holds pre-RoPE key latents [B, H_kv, P+S, r_k] and q is [B, H, S, d], rotated
    (latent_rope.py); a joint latent ([B, 1, P+S, r_k], v alike) is read by every KV head of the maps through a
    stride-0 view, never copied. S == 1 runs the flash-decoding kernels, S > 1 the prefill kernel.
    """
    check_inputs(q, k, v, attention_mask, scale, latent_keys)
    if latent_keys is not None and k.shape[1] != latent_keys.heads:
        k, v = (_broadcast_heads(t, latent_keys.heads) for t in (k, v))
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"lowrank_attention: dtype must be float32, float16 or bfloat16, "
                         f"got {q.dtype}")
    ks, vs = _Side.of(k), _Side.of(v)
    tensors = [q, ks.data, vs.data, ks.scale, vs.scale] + ([attention_mask] if attention_mask is not None else [])
    if latent_keys is not None:
        tensors += [latent_keys.basis_cos, latent_keys.basis_sin, latent_keys.freq, latent_keys.positions]
    if any(t.device != q.device for t in tensors):
        raise ValueError("lowrank_attention: q, k, v and attention_mask must be on one device, "
                         f"got {[str(t.device) for t in tensors]}")
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(f"lowrank_attention: tensors are on {q.device}; the Triton kernels need "
                         "a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter)")

    batch, heads, seq, qk_dim = q.shape
    heads_kv, rank_k = k.shape[1], k.shape[3]
    rank_v = v.shape[3]
    out = torch.empty((batch, heads, seq, rank_v), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    mask, stride_mb, stride_mt, has_mask = _mask_for_kernel(attention_mask, q)
    common = dict(group_size=heads // heads_kv, rank_k=rank_k, rank_v=rank_v, qk_dim=qk_dim,
                  qk_scale_log2=float(scale) * LOG2E, HAS_MASK=has_mask,
                  IEEE_DOT=q.dtype == torch.float32, RK_PAD=_padded(rank_k),
                  RV_PAD=_padded(rank_v), QK_PAD=_padded(qk_dim), K_BITS=ks.bits, V_BITS=vs.bits,
                  LATENT_KEYS=latent_keys is not None)
    tables = _latent_args(latent_keys, q)
    if seq == 1:
        _launch_decode(q, ks, vs, mask, stride_mb, stride_mt, tables, out, common,
                       decode_config or _default_decode_config(common))
    else:
        _launch_prefill(q, ks, vs, mask, stride_mb, stride_mt, tables, out, common,
                        prefill_config or _default_prefill_config(common))
    return out


def _broadcast_heads(t: torch.Tensor | Quantized, heads: int) -> torch.Tensor | Quantized:
    """A one-head cache side as `heads` heads: a view with head stride 0 (codes and scales alike)."""
    def expand(x):
        return x.expand(x.shape[0], heads, *x.shape[2:])
    if isinstance(t, Quantized):
        return Quantized(expand(t.codes), expand(t.scale), t.kv_dtype, t.rank, t.counts)
    return expand(t)


def _latent_args(latent_keys: LatentKeys | None, fallback: torch.Tensor) -> tuple[list, list]:
    """(pointers, strides) of the latent-key tables as the kernels take them: basis_cos, basis_sin, freq,
    positions and the maps' (head, row, feature) and the positions' (batch, key) strides (the two maps share a
    layout: basis_sin is made contiguous like basis_cos). Placeholders, never read, without latent keys."""
    if latent_keys is None:
        return [fallback] * 4, [0] * 5
    basis_cos = latent_keys.basis_cos.contiguous()
    basis_sin = latent_keys.basis_sin.contiguous()
    return ([basis_cos, basis_sin, latent_keys.freq.contiguous(), latent_keys.positions],
            [*basis_cos.stride(), *latent_keys.positions.stride()])


def _default_prefill_config(common: dict) -> PrefillConfig:
    if max(common["RK_PAD"], common["RV_PAD"], common["QK_PAD"]) > 128 or common["IEEE_DOT"]:
        return PrefillConfig(block_m=64, block_n=32)  # keep the tiles within shared memory
    return PrefillConfig()


def _default_decode_config(common: dict) -> DecodeConfig:
    if max(common["RK_PAD"], common["RV_PAD"], common["QK_PAD"]) > 128 or common["IEEE_DOT"]:
        return DecodeConfig(block_n=32)
    if common["rank_k"] % 16 or common["rank_v"] % 16:
        # Scalar loads (rows not 16-byte aligned) need more programs in flight: on an H200,
        # rank 77, B=8, H_kv=8, 16k keys took 256 us at 8 programs per SM vs 320 us at 4.
        return DecodeConfig(programs_per_sm=8)
    return DecodeConfig()


def _runs(ks: _Side, vs: _Side) -> dict:
    """The kernels' k_n8, k_n4, v_n8, v_n4: where each side's packed widths change (read for mixed codes only)."""
    return dict(zip(("k_n8", "k_n4", "v_n8", "v_n4"), (*ks.runs, *vs.runs)))


def _launch_prefill(q, ks: _Side, vs: _Side, mask, stride_mb, stride_mt, tables, out, common,
                    config: PrefillConfig):
    batch, heads, seq, _ = q.shape
    grid = (triton.cdiv(seq, config.block_m), batch * heads)
    _prefill_kernel[grid](
        q, ks.data, vs.data, ks.scale, vs.scale, mask, out, *tables[0],
        *q.stride(), *ks.data.stride(), *vs.data.stride(), *ks.scale_strides, *vs.scale_strides,
        stride_mb, stride_mt, *out.stride(), *tables[1],
        heads, seq, ks.data.shape[2], **common, **_runs(ks, vs),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


# The reduce kernel walks the chunks in blocks of this many (a few hundred chunks at most).
_SPLIT_BLOCK = 32


def _launch_decode(q, ks: _Side, vs: _Side, mask, stride_mb, stride_mt, tables, out, common, config: DecodeConfig):
    batch, heads, _, _ = q.shape
    heads_kv, total = ks.data.shape[1], ks.data.shape[2]
    chunk_len, num_splits = decode_split_plan(total, batch, heads_kv, config, _num_sms(q.device))
    rv_pad = common["RV_PAD"]
    # partials: acc [B, H, num_splits, RV_PAD], running max / sum [B, H, num_splits]; fp32
    part_acc = torch.empty((batch, heads, num_splits, rv_pad), dtype=torch.float32, device=q.device)
    part_max = torch.empty((batch, heads, num_splits), dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    block_h = max(16, triton.next_power_of_2(common["group_size"]))  # tl.dot needs M >= 16
    _decode_split_kernel[(num_splits, batch * heads_kv)](
        q, ks.data, vs.data, ks.scale, vs.scale, mask, part_acc, part_max, part_sum, *tables[0],
        q.stride(0), q.stride(1), q.stride(3), *ks.data.stride(), *vs.data.stride(), *ks.scale_strides,
        *vs.scale_strides, stride_mb, stride_mt, *tables[1],
        heads_kv, total, common["group_size"], common["rank_k"], common["rank_v"], common["qk_dim"],
        chunk_len, num_splits, common["qk_scale_log2"], **_runs(ks, vs),
        HAS_MASK=common["HAS_MASK"], IEEE_DOT=common["IEEE_DOT"],
        PREFETCH=config.prefetch and not common["LATENT_KEYS"],
        K_BITS=common["K_BITS"], V_BITS=common["V_BITS"], LATENT_KEYS=common["LATENT_KEYS"],
        BLOCK_H=block_h,
        BLOCK_N=config.block_n, RK_PAD=common["RK_PAD"], RV_PAD=rv_pad, QK_PAD=common["QK_PAD"],
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    _decode_reduce_kernel[(batch * heads,)](
        part_acc, part_max, part_sum, out,
        out.stride(0), out.stride(1), out.stride(3),
        heads, num_splits, common["rank_v"],
        SPLIT_BLOCK=_SPLIT_BLOCK, RV_PAD=rv_pad, num_warps=4,
    )


__all__ = ["lowrank_attention", "PrefillConfig", "DecodeConfig", "decode_split_plan"]
