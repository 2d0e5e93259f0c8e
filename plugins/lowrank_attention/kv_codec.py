"""The quantized latent cache: one format for the reference decoder, the ONNX graph and the plugin (issue 15).

Each cached latent vector (one token of one KV head, r numbers) is quantized on its own, with one fp16 scale.
int8 codes are symmetric:
  scale = fp16(absmax / 127),  code = clamp(round(x / scale), -127, 127),  x ~ code * scale
Packed codes (int4, and each w-bit coordinate of `mixed`) are mid-rise, with h = 2^(w-1):
  scale = fp16(absmax / h),  code = clamp(floor(x / scale), -h, h - 1),  x ~ (code + 1/2) * scale
so all 2^w codes are levels; a symmetric code leaves one unused and spends another on zero, which at 2 bits
is three levels instead of four: in the fold's run scaling a Gaussian coordinate kept 0.47 of its variance as
error at 2 bits instead of 0.14, and 0.0104 instead of 0.0085 at 4 bits (tests/test_kv_codec.py). Nothing
clips either way (the largest number takes the outer level, at most half a step off); zero is not a mid-rise
level, so a zero vector decodes to half its scale (fp16's smallest normal). Per token, not per channel: a
token's codes and scale are final when it is written, so a cache filled one step at a time holds exactly what
a prefill of the same tokens would (no group of future tokens to wait for, as KIVI's per-channel keys need),
and decode == recomputation stays exact. Per-channel spread (eigen coordinates fall off in energy) is handled
by the fold instead: an orthogonal rotation folded into the basis spreads every direction over all
coordinates (method/fold.py).

The scale is rounded to fp16 BEFORE the codes are computed, so the stored scale is the one the codes were
made with (int8: re-encoding a decoded vector gives back the same codes and scale; a mid-rise scale is first
raised by half fp16's spacing, so that rounding never shrinks it below absmax / h). Scales are fp16 whatever
the model's dtype: 2 bytes per vector, the difference between meeting and missing 0.37x of the fp16 cache at
rank ratio 0.7 in int8. int4 codes are stored offset by 8 (0..15), two per byte along the last dim, the even
element in the low nibble; an odd rank pads one stored 8.

`mixed` gives each coordinate of a vector its own width, 8, 4 or 2 bits (transform coding: the fold puts the
high-variance eigen coordinates first and gives them more bits, by water-filling on the calibrated spectrum,
method/fold.py), with ONE scale per vector: scale = fp16(max_j |x_j| / h_j), so every stored coordinate is
coded with the same step. The fold has scaled each run of equal widths (decompose.group_transform) so that
this one step is, in the model's latent coordinates, a step in proportion to the run's spread, as a scale per
run would give without storing one. `counts` (n8, n4, n2) says how many coordinates take each width, widest
first; each width's codes are stored offset by h_w (0 .. 2^w - 1) and packed 8 / w to a byte, lowest bits
first, each width starting a fresh byte (a partial last byte is padded with stored h_w). int4 is exactly
`mixed` with counts (0, r, 0); int8 keeps its codes signed (int8 storage, no offset).

Everything here is plain torch arithmetic (div, round, floor, clamp, casts, integer ops, a constant table
lookup), so the exporter turns it into standard ONNX ops that make the same codes from the same inputs.
(Inputs computed by another backend differ in the last float bits, and a value on a rounding boundary then
takes the neighbouring code: validate's parity allows for that.) Attention need not decode: a token's scale
multiplies its score and its probability.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KV_DTYPES = ("int8", "int4", "mixed")
BITS = {"int8": 8, "int4": 4}
MIXED_WIDTHS = (8, 4, 2)             # the widths `mixed` chooses from, in the order its counts list them
SCALE_DTYPE = torch.float16
SCALE_BYTES = 2
# fp16's smallest normal: a zero vector gets this scale (its codes are 0 either way) instead of dividing by 0
_TINY = 2.0 ** -14


def check_kv_dtype(kv_dtype: str) -> None:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv cache dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")


@dataclass(frozen=True)
class CodeFormat:
    """How one side's r-dim latent vectors are stored: the bit width of each coordinate, widest first, and whether
    the codes are kept signed as they are (int8) or packed with an offset (int4, mixed: even an all-8-bit mixed
    layout is uint8, so that a format's storage type follows from its kv_dtype alone)."""
    widths: tuple[int, ...]
    signed: bool = False

    @classmethod
    def of(cls, kv_dtype: str, rank: int, counts=None) -> "CodeFormat":
        """int8 / int4: every coordinate that wide; mixed: counts[i] coordinates of MIXED_WIDTHS[i] bits."""
        check_kv_dtype(kv_dtype)
        if kv_dtype != "mixed":
            return cls((BITS[kv_dtype],) * rank, signed=kv_dtype == "int8")
        if counts is None or len(counts) != len(MIXED_WIDTHS) or sum(counts) != rank or min(counts) < 0:
            raise ValueError(f"a mixed cache of rank {rank} needs counts of its {MIXED_WIDTHS}-bit coordinates "
                             f"that add up to {rank}, got {counts}")
        return cls(tuple(w for w, n in zip(MIXED_WIDTHS, counts) for _ in range(int(n))))

    @property
    def rank(self) -> int:
        return len(self.widths)

    @property
    def runs(self) -> list[tuple[int, int]]:
        """(width, count) of each run of equal widths, widest first."""
        return [(w, len(list(run))) for w, run in itertools.groupby(self.widths)]

    @property
    def nbytes(self) -> int:
        """Last dim of the stored codes."""
        return self.rank if self.signed else sum(-(-n * w // 8) for w, n in self.runs)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.int8 if self.signed else torch.uint8

    def steps(self, device=None) -> torch.Tensor:
        """Per coordinate, absmax / scale: how many steps its code spans each side of zero."""
        return torch.tensor([full_scale(w, self.signed) for w in self.widths], device=device)


def full_scale(width: int, signed: bool = False) -> float:
    """The steps a code of `width` bits spans each side of zero: 2^(w-1) - 1 symmetric (int8), 2^(w-1) mid-rise."""
    return 2.0 ** (width - 1) - (1 if signed else 0)


def code_width(rank: int, kv_dtype: str, counts=None) -> int:
    """Last dim of the stored codes of an r-dim latent: r bytes in int8, ceil(r / 2) in int4, the packed widths of
    a mixed one."""
    return CodeFormat.of(kv_dtype, rank, counts).nbytes


def vector_bytes(rank: int, kv_dtype: str, counts=None) -> int:
    """Bytes one cached latent vector takes: its codes and its scale."""
    return code_width(rank, kv_dtype, counts) + SCALE_BYTES


def encode(x: torch.Tensor, kv_dtype: str, counts=None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., r] (any float dtype) -> (codes [..., code_width], scale [..., 1] fp16)."""
    fmt = CodeFormat.of(kv_dtype, x.shape[-1], counts)
    steps = fmt.steps(x.device)
    xf = x.float()
    need = (xf.abs() / steps).amax(-1, keepdim=True)
    if fmt.signed:
        scale = need.clamp_min(_TINY).to(SCALE_DTYPE)
        return torch.round(xf / scale.float()).clamp(-steps, steps).to(torch.int8), scale
    # raised by half fp16's relative spacing, the scale rounds to `need` or above: never so small that the largest
    # number lands more than half a step past the outer level
    scale = (need * (1 + 2.0 ** -11)).clamp_min(_TINY).to(SCALE_DTYPE)
    codes = torch.floor(xf / scale.float()).clamp(-steps, steps - 1)
    return _pack(codes.to(torch.int32), fmt), scale


def decode(codes: torch.Tensor, scale: torch.Tensor, rank: int, kv_dtype: str, dtype: torch.dtype,
           counts=None) -> torch.Tensor:
    """(codes, scale) -> [..., rank] in `dtype` (the product is taken in fp32, then cast)."""
    return (code_values(codes, rank, kv_dtype, torch.float32, counts) * scale.float()).to(dtype)


def code_values(codes: torch.Tensor, rank: int, kv_dtype: str, dtype: torch.dtype, counts=None) -> torch.Tensor:
    """The levels [..., rank] as numbers in `dtype` (int8 codes, mid-rise code + 1/2: exact in any float dtype),
    before their scale. Attention can take a token's scale on its score and on its probability instead of on each
    of its r numbers."""
    fmt = CodeFormat.of(kv_dtype, rank, counts)
    if fmt.signed:
        return codes.to(dtype)
    return _unpack(codes, fmt, dtype)


def cache_values(layer: tuple[torch.Tensor, ...], r_k: int, r_v: int, kv_dtype: str | None,
                 dtype: torch.dtype = torch.float32, layout=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) in `dtype` of one layer's cache tuple (cache_slots' order), a quantized one decoded;
    layout: a mixed cache's (key counts, value counts)."""
    if kv_dtype is None:
        return layer[0].to(dtype), layer[1].to(dtype)
    key, value, key_scale, value_scale = layer
    k_counts, v_counts = layout or (None, None)
    return (decode(key, key_scale, r_k, kv_dtype, dtype, k_counts),
            decode(value, value_scale, r_v, kv_dtype, dtype, v_counts))


def _pack(codes: torch.Tensor, fmt: CodeFormat) -> torch.Tensor:
    """int32 signed codes [..., r] -> uint8 [..., nbytes]: each width's codes offset by 2^(w-1), 8 / w to a byte,
    the first in the lowest bits; a run's partial last byte padded with code 0."""
    parts, start = [], 0
    for w, n in fmt.runs:
        per_byte, offset = 8 // w, 2 ** (w - 1)
        run = codes[..., start:start + n] + offset
        start += n
        if n % per_byte:
            run = torch.cat([run, torch.full_like(run[..., :1], offset).expand(*run.shape[:-1], -n % per_byte)], -1)
        weights = torch.tensor([2 ** (w * i) for i in range(per_byte)], dtype=torch.int32, device=codes.device)
        parts.append((run.unflatten(-1, (-1, per_byte)) * weights).sum(-1))
    return torch.cat(parts, -1).to(torch.uint8)


def _unpack(packed: torch.Tensor, fmt: CodeFormat, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [..., nbytes] -> the mid-rise levels [..., r] as numbers in `dtype`, by table lookup: each width's
    bytes index a [256, 8 / w] table of the levels a byte holds (one Gather per width in the graph, where shifting
    and masking in int32 arithmetic took ~8 passes over the cache per step and made ONNX Runtime decode 20x
    slower than a float cache). Indices widened to int32 (a Gather index cannot be uint8)."""
    p = packed.to(torch.int32)
    parts, start = [], 0
    for w, n in fmt.runs:
        nb = -(-n * w // 8)
        table = _code_table(w).to(device=packed.device, dtype=dtype)
        parts.append(F.embedding(p[..., start:start + nb], table).flatten(-2)[..., :n])
        start += nb
    return torch.cat(parts, -1) if len(parts) > 1 else parts[0]


def _code_table(width: int) -> torch.Tensor:
    """[256, 8 / width] fp32: the mid-rise levels (code + 1/2) byte b holds, lowest bits first. Made afresh on
    each call (a tensor cached across calls would keep the fake tensor of the export that first asked for it)."""
    return torch.tensor(_code_rows(width), dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _code_rows(width: int) -> tuple:
    # Python numbers, not tensor ops: built inside an export, tensor ops would be traced into the graph
    return tuple(tuple((b >> shift) % 2 ** width - 2 ** (width - 1) + 0.5 for shift in range(0, 8, width))
                 for b in range(256))


def cache_slots(r_k: int, r_v: int, kv_dtype: str | None, float_dtype: torch.dtype,
                layout=None) -> list[tuple[str, int, torch.dtype]]:
    """(name suffix, last dim, element type) of each cached tensor of one layer, in the order the reference
    decoder and the ONNX graph keep them: key, value[, key_scale, value_scale]. Keys and values come first in
    both formats, so cache[i][0] / cache[i][1] are a layer's keys / values either way. layout: a mixed
    cache's (key counts, value counts)."""
    if kv_dtype is None:
        return [("key", r_k, float_dtype), ("value", r_v, float_dtype)]
    k_counts, v_counts = layout or (None, None)
    k, v = CodeFormat.of(kv_dtype, r_k, k_counts), CodeFormat.of(kv_dtype, r_v, v_counts)
    return [("key", k.nbytes, k.torch_dtype), ("value", v.nbytes, v.torch_dtype),
            ("key_scale", 1, SCALE_DTYPE), ("value_scale", 1, SCALE_DTYPE)]


def packed_runs(kv_dtype: str, rank: int, counts=None) -> tuple[int, int]:
    """(n8, n4) of packed codes: how many leading numbers are 8-bit mid-rise codes, then 4-bit ones (the rest are
    2-bit), as the kernels walk a vector; int4 is (0, rank). int8 codes are signed bytes, not packed: (0, 0)."""
    if kv_dtype == "int8":
        return 0, 0
    if kv_dtype == "int4":
        return 0, rank
    CodeFormat.of(kv_dtype, rank, counts)             # a mixed layout that does not fit: its one-line error
    return int(counts[0]), int(counts[1])


def layout_attribute(k_counts=None, v_counts=None) -> str:
    """A mixed cache's layout as the plugin node's string attribute `kv_layout`: "n8,n4,n2;n8,n4,n2" (keys; values),
    "" for a uniform format (int8, int4). A string, because TensorRT plugin fields, ONNX Runtime's Python ops and
    ONNX all take one."""
    if k_counts is None:
        return ""
    return ";".join(",".join(str(int(n)) for n in counts) for counts in (k_counts, v_counts))


def parse_layout(kv_layout: str) -> tuple:
    """(key counts, value counts) of a `kv_layout` attribute, (None, None) for ""; ValueError (one line) if it is not
    two triples of counts."""
    if not kv_layout:
        return None, None
    try:
        sides = tuple(tuple(int(n) for n in side.split(",")) for side in kv_layout.split(";"))
    except ValueError:
        sides = ()
    if len(sides) != 2 or any(len(side) != len(MIXED_WIDTHS) for side in sides):
        raise ValueError(f"kv_layout must be 'n8,n4,n2;n8,n4,n2' (key; value counts of 8/4/2-bit numbers), "
                         f"got {kv_layout!r}")
    return sides


@dataclass(frozen=True)
class Quantized:
    """One side (keys or values) of a quantized cache as the attention op reads it: codes [B, H_kv, T, w],
    scales [B, H_kv, T, 1] fp16, the latent rank (int4 codes cannot tell an odd rank from the next) and, mixed,
    the counts of its 8 / 4 / 2-bit numbers."""
    codes: torch.Tensor
    scale: torch.Tensor
    kv_dtype: str
    rank: int
    counts: tuple | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The shape of the numbers it stands for: [B, H_kv, T, rank]."""
        return (*self.codes.shape[:3], self.rank)

    def values(self, dtype: torch.dtype) -> torch.Tensor:
        return decode(self.codes, self.scale, self.rank, self.kv_dtype, dtype, self.counts)

    @property
    def runs(self) -> tuple[int, int]:
        return packed_runs(self.kv_dtype, self.rank, self.counts)

    def check(self, name: str) -> None:
        """ValueError (one line) unless codes and scales have the format's types and matching shapes."""
        check_kv_dtype(self.kv_dtype)
        fmt = CodeFormat.of(self.kv_dtype, self.rank, self.counts)
        want = (*self.codes.shape[:3], fmt.nbytes)
        if self.codes.dtype != fmt.torch_dtype or tuple(self.codes.shape) != want:
            raise ValueError(f"lowrank_attention: {name} codes must be {fmt.torch_dtype} {list(want)} "
                             f"for {self.kv_dtype} rank {self.rank}, got {self.codes.dtype} {list(self.codes.shape)}")
        if self.scale.dtype != SCALE_DTYPE or tuple(self.scale.shape) != (*self.codes.shape[:3], 1):
            raise ValueError(f"lowrank_attention: {name} scales must be float16 {[*self.codes.shape[:3], 1]}, got "
                             f"{self.scale.dtype} {list(self.scale.shape)}")
