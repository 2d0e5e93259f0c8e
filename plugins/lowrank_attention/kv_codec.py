"""The quantized latent cache: one format for the reference decoder, the ONNX graph and the plugin (issue 15).

Each cached latent vector (one token of one KV head, r numbers) is quantized on its own, symmetrically:
  scale = fp16(absmax / qmax),  code = clamp(round(x / scale), -qmax, qmax),  x ~ code * scale
with qmax = 127 (int8) or 7 (int4). Per token, not per channel: a token's codes and scale are final when it
is written, so a cache filled one step at a time holds exactly what a prefill of the same tokens would (no
group of future tokens to wait for, as KIVI's per-channel keys need), and decode == recomputation stays exact.
Per-channel spread (eigen coordinates fall off in energy) is handled by the fold instead: an orthogonal
rotation folded into the basis spreads every direction over all coordinates (method/fold.py).

The scale is rounded to fp16 BEFORE the codes are computed, so the stored scale is the one the codes were
made with, and re-encoding a decoded vector gives back the same codes and scale. Scales are fp16 whatever the
model's dtype: 2 bytes per vector, the difference between meeting and missing 0.37x of the fp16 cache at
rank ratio 0.7 in int8. int4 codes are stored offset by 8 (0..15), two per byte along the last dim, the even
element in the low nibble; an odd rank pads one code 0 (stored 8).

Everything here is plain torch arithmetic (div, round, clamp, casts, integer ops), so the exporter turns it into
standard ONNX ops that make the same codes from the same inputs. (Inputs computed by another backend differ in
the last float bits, and a value on a rounding boundary then takes the neighbouring code: validate's parity
allows for that.) Attention need not decode: a token's scale multiplies its score and its probability.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KV_DTYPES = ("int8", "int4")
QMAX = {"int8": 127, "int4": 7}
BITS = {"int8": 8, "int4": 4}
SCALE_DTYPE = torch.float16
SCALE_BYTES = 2
# fp16's smallest normal: a zero vector gets this scale (its codes are 0 either way) instead of dividing by 0
_TINY = 2.0 ** -14


def check_kv_dtype(kv_dtype: str) -> None:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv cache dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")


def code_width(rank: int, kv_dtype: str) -> int:
    """Last dim of the stored codes of an r-dim latent: r bytes in int8, ceil(r / 2) in int4."""
    return rank if kv_dtype == "int8" else (rank + 1) // 2


def code_torch_dtype(kv_dtype: str) -> torch.dtype:
    return torch.int8 if kv_dtype == "int8" else torch.uint8


def vector_bytes(rank: int, kv_dtype: str) -> int:
    """Bytes one cached latent vector takes: its codes and its scale."""
    return code_width(rank, kv_dtype) + SCALE_BYTES


def encode(x: torch.Tensor, kv_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., r] (any float dtype) -> (codes [..., code_width], scale [..., 1] fp16)."""
    qmax = QMAX[kv_dtype]
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / qmax).clamp_min(_TINY).to(SCALE_DTYPE)
    codes = torch.round(xf / scale.float()).clamp(-qmax, qmax)
    if kv_dtype == "int8":
        return codes.to(torch.int8), scale
    return _pack_nibbles(codes.to(torch.int32) + 8), scale


def decode(codes: torch.Tensor, scale: torch.Tensor, rank: int, kv_dtype: str, dtype: torch.dtype) -> torch.Tensor:
    """(codes, scale) -> [..., rank] in `dtype` (the product is taken in fp32, then cast)."""
    return (code_values(codes, rank, kv_dtype, torch.float32) * scale.float()).to(dtype)


def code_values(codes: torch.Tensor, rank: int, kv_dtype: str, dtype: torch.dtype) -> torch.Tensor:
    """The signed codes [..., rank] as numbers in `dtype` (exact: |code| <= 127), before their scale. Attention
    can take a token's scale on its score and on its probability instead of on each of its r numbers."""
    if kv_dtype == "int8":
        return codes.to(dtype)
    return _unpack_nibbles(codes)[..., :rank].to(dtype) - 8


def cache_values(layer: tuple[torch.Tensor, ...], r_k: int, r_v: int, kv_dtype: str | None,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) in `dtype` of one layer's cache tuple (cache_slots' order), a quantized one decoded."""
    if kv_dtype is None:
        return layer[0].to(dtype), layer[1].to(dtype)
    key, value, key_scale, value_scale = layer
    return decode(key, key_scale, r_k, kv_dtype, dtype), decode(value, value_scale, r_v, kv_dtype, dtype)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int32 codes 0..15 [..., r] -> uint8 [..., ceil(r/2)], element 2i in the low nibble of byte i."""
    r = codes.shape[-1]
    if r % 2:
        codes = torch.cat([codes, torch.full_like(codes[..., :1], 8)], dim=-1)
    pairs = codes.unflatten(-1, (-1, 2))
    return (pairs[..., 0] + pairs[..., 1] * 16).to(torch.uint8)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., w] -> int32 codes 0..15 [..., 2w]. Widened first: the exporter has no uint8 right shift, and
    ONNX Runtime's CPU Div / Mod take int32."""
    p = packed.to(torch.int32)
    return torch.stack([p % 16, p // 16], dim=-1).flatten(-2)



def cache_slots(r_k: int, r_v: int, kv_dtype: str | None, float_dtype: torch.dtype) -> list[tuple[str, int, torch.dtype]]:
    """(name suffix, last dim, element type) of each cached tensor of one layer, in the order the reference
    decoder and the ONNX graph keep them: key, value[, key_scale, value_scale]. Keys and values come first in
    both formats, so cache[i][0] / cache[i][1] are a layer's keys / values either way."""
    if kv_dtype is None:
        return [("key", r_k, float_dtype), ("value", r_v, float_dtype)]
    codes = code_torch_dtype(kv_dtype)
    return [("key", code_width(r_k, kv_dtype), codes), ("value", code_width(r_v, kv_dtype), codes),
            ("key_scale", 1, SCALE_DTYPE), ("value_scale", 1, SCALE_DTYPE)]


@dataclass(frozen=True)
class Quantized:
    """One side (keys or values) of a quantized cache as the attention op reads it: codes [B, H_kv, T, w],
    scales [B, H_kv, T, 1] fp16, and the latent rank (int4 codes cannot tell an odd rank from the next)."""
    codes: torch.Tensor
    scale: torch.Tensor
    kv_dtype: str
    rank: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The shape of the numbers it stands for: [B, H_kv, T, rank]."""
        return (*self.codes.shape[:3], self.rank)

    def values(self, dtype: torch.dtype) -> torch.Tensor:
        return decode(self.codes, self.scale, self.rank, self.kv_dtype, dtype)

    def check(self, name: str) -> None:
        """ValueError (one line) unless codes and scales have the format's types and matching shapes."""
        check_kv_dtype(self.kv_dtype)
        want = (*self.codes.shape[:3], code_width(self.rank, self.kv_dtype))
        if self.codes.dtype != code_torch_dtype(self.kv_dtype) or tuple(self.codes.shape) != want:
            raise ValueError(f"lowrank_attention: {name} codes must be {code_torch_dtype(self.kv_dtype)} {list(want)} "
                             f"for {self.kv_dtype} rank {self.rank}, got {self.codes.dtype} {list(self.codes.shape)}")
        if self.scale.dtype != SCALE_DTYPE or tuple(self.scale.shape) != (*self.codes.shape[:3], 1):
            raise ValueError(f"lowrank_attention: {name} scales must be float16 {[*self.codes.shape[:3], 1]}, got "
                             f"{self.scale.dtype} {list(self.scale.shape)}")
