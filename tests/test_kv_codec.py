"""The quantized cache format (plugins/lowrank_attention/kv_codec.py) and the rotation folded in front of it."""
import pytest
import torch

from eigen_export.method.decompose import incoherent_rotation, kv_bytes_per_token
from eigen_export_plugins.lowrank_attention.kv_codec import (
    Quantized, cache_slots, code_width, decode, encode, layout_attribute, parse_layout,
)


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
@pytest.mark.parametrize("rank", [1, 7, 16, 45])
def test_round_trip_error_is_at_most_half_a_step(kv_dtype, rank):
    torch.manual_seed(rank)
    x = torch.randn(3, 2, 11, rank) * torch.logspace(0, -2, rank)        # falling energy, as eigen latents
    codes, scale = encode(x, kv_dtype)
    assert codes.shape == (3, 2, 11, code_width(rank, kv_dtype)) and scale.shape == (3, 2, 11, 1)
    assert scale.dtype == torch.float16
    back = decode(codes, scale, rank, kv_dtype, torch.float32)
    step = scale.float()
    assert ((back - x).abs() <= step / 2 + 1e-6 * x.abs()).all()
    # the scale is absmax over the steps a code spans (127 symmetric int8, 8 mid-rise int4) in fp16, never
    # rounded below it in int4: the largest element uses (almost) the whole range; a vector so small that its
    # scale would be subnormal in fp16 gets the smallest normal one instead
    need = (x.abs().amax(-1, keepdim=True) / {"int8": 127, "int4": 8}[kv_dtype]).clamp_min(2 ** -14)
    assert torch.allclose(step, need, rtol=1e-3)
    if kv_dtype == "int4":
        assert (step >= need).all()


def test_re_encoding_a_decoded_int8_cache_is_the_identity():
    """Codes are made with the stored (fp16) scale, so a decoded vector encodes to the same codes and scale: a
    backend that re-quantizes what it read cannot drift from the reference. (Mid-rise codes cannot promise
    this: the largest number decodes half a step inside the range; nothing re-encodes a cache.)"""
    x = torch.randn(4, 3, 9, 13) * 5
    codes, scale = encode(x, "int8")
    again = encode(decode(codes, scale, 13, "int8", torch.float32), "int8")
    assert torch.equal(again[0], codes) and torch.equal(again[1], scale)


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    x = torch.tensor([[8.0, -7.5, 0.5, 1.5, -2.5]])                 # absmax 8: scale 1, codes = floor(x)
    codes, scale = encode(x, "int4")
    assert scale.item() == 1.0 and codes.dtype == torch.uint8
    # stored offset by 8 (8 clamps to the top code 7): [15, 0, 8, 9, 5, (pad) 8] -> bytes 15 + 16*0, 8 + 16*9,
    # 5 + 16*8; decoded code + 1/2
    assert codes.tolist() == [[15 + 16 * 0, 8 + 16 * 9, 5 + 16 * 8]]
    assert decode(codes, scale, 5, "int4", torch.float32).tolist() == [[7.5, -7.5, 0.5, 1.5, -2.5]]


def test_a_zero_vector_decodes_to_zero_or_half_the_smallest_step():
    """int8 has a zero level; the mid-rise codes' nearest is half a step, with the smallest normal fp16 scale."""
    codes, scale = encode(torch.zeros(2, 6), "int8")
    assert torch.equal(decode(codes, scale, 6, "int8", torch.float32), torch.zeros(2, 6))
    for kv_dtype, counts in (("int4", None), ("mixed", (1, 3, 2))):
        codes, scale = encode(torch.zeros(2, 6), kv_dtype, counts)
        assert torch.equal(decode(codes, scale, 6, kv_dtype, torch.float32, counts), torch.full((2, 6), 2.0 ** -15))


def test_cache_slots_and_bytes_count_codes_and_scales():
    assert cache_slots(40, 56, None, torch.float16) == [("key", 40, torch.float16), ("value", 56, torch.float16)]
    assert cache_slots(41, 56, "int4", torch.float32) == [("key", 21, torch.uint8), ("value", 28, torch.uint8),
                                                          ("key_scale", 1, torch.float16),
                                                          ("value_scale", 1, torch.float16)]
    ranks = [(41, 56), (64, 64)]
    assert kv_bytes_per_token(ranks, 3, 2) == (41 + 56 + 128) * 3 * 2
    assert kv_bytes_per_token(ranks, 3, 2, "int8") == (41 + 56 + 128 + 4 * 2) * 3
    assert kv_bytes_per_token(ranks, 3, 2, "int4") == (21 + 28 + 64 + 4 * 2) * 3


@pytest.mark.parametrize("r", [1, 2, 16, 45, 64, 77])
def test_incoherent_rotation_is_orthogonal_with_small_entries(r):
    m = incoherent_rotation(r, seed=3)
    assert torch.allclose(m @ m.T, torch.eye(r, dtype=torch.float64), atol=1e-12)
    assert m.abs().max() <= max(1.0, (2 / r) ** 0.5) + 1e-12
    assert torch.equal(m, incoherent_rotation(r, seed=3))
    if r >= 16:                                   # r random signs: two seeds agree with probability 2^-r
        assert not torch.equal(m, incoherent_rotation(r, seed=4))


def test_the_rotation_lowers_int4_error_on_falling_spectra():
    """What it is for: eigen latents put most energy in the first coordinates, so a per-token scale set by them
    leaves the rest a few levels; rotated, every coordinate shares the range."""
    torch.manual_seed(0)
    r = 45
    x = torch.randn(4096, r) * torch.logspace(0, -1.5, r)
    rot = incoherent_rotation(r).float()

    def error(v):
        return (decode(*encode(v, "int4"), r, "int4", torch.float32) - v).pow(2).sum() / v.pow(2).sum()

    plain, rotated = error(x), error(x @ rot)
    assert rotated < 0.6 * plain, (plain, rotated)


MIXED = [(3, 5, 0), (0, 7, 6), (2, 0, 9), (4, 4, 4), (0, 0, 5), (5, 0, 0)]


@pytest.mark.parametrize("counts", MIXED)
def test_mixed_codes_share_one_step_and_round_trip_within_half_of_it(counts):
    """One fp16 scale per vector, the same step for every coordinate; a coordinate of width w spans 2^(w-1) steps
    each side of zero, so the scale is the largest |x_j| / 2^(w-1) and nothing clips."""
    rank = sum(counts)
    steps = torch.tensor([128.0] * counts[0] + [8.0] * counts[1] + [2.0] * counts[2])
    x = torch.randn(5, 2, 7, rank) * steps.sqrt()                    # spreads roughly as the fold makes them
    codes, scale = encode(x, "mixed", counts)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == code_width(rank, "mixed", counts)
    assert code_width(rank, "mixed", counts) == counts[0] + -(-counts[1] // 2) + -(-counts[2] // 4)
    back = decode(codes, scale, rank, "mixed", torch.float32, counts)
    assert ((back - x).abs() <= scale.float() / 2 + 1e-6 * x.abs()).all()
    need = (x.abs() / steps).amax(-1, keepdim=True)
    assert (scale.float() >= need).all() and (scale.float() <= need * (1 + 2 ** -9)).all()
    # mid-rise levels: every decoded number is an odd multiple of half a step, zero included
    halves = back / (scale.float() / 2)
    assert torch.allclose(halves, halves.round(), atol=1e-4) and (halves.round() % 2 == 1).all()


def test_two_bit_mixed_codes_use_all_four_levels():
    """Mid-rise codes make every code a level: at 2 bits four levels instead of a symmetric code's three, which
    cuts a Gaussian coordinate's error 3.5x in the fold's run scaling (0.47 -> 0.14 of its variance; symmetric
    4-bit codes left 0.0104, 8-bit ones 3e-5)."""
    torch.manual_seed(0)
    counts = (4, 20, 20)
    widths = torch.tensor([8] * 4 + [4] * 20 + [2] * 20)
    x = torch.randn(20000, 44) * 2.0 ** (widths - 1)                 # as group_transform scales the runs
    back = decode(*encode(x, "mixed", counts), 44, "mixed", torch.float32, counts)
    rel = ((back - x) ** 2).mean(0) / (x ** 2).mean(0)
    assert rel[24:].mean() < 0.15 and rel[4:24].mean() < 0.0095 and rel[:4].mean() < 4e-5
    two_bit = encode(x[:, 24:], "mixed", (0, 0, 20))[0]
    levels = torch.stack([(two_bit >> s) & 3 for s in (0, 2, 4, 6)]).unique()
    assert levels.tolist() == [0, 1, 2, 3]


def test_mixed_packs_each_width_from_a_fresh_byte_lowest_bits_first():
    counts = (1, 3, 2)                                  # one 8-bit, three 4-bit, two 2-bit coordinates
    x = torch.tensor([[-128.0, 7.5, -0.5, 0.5, 1.5, -1.5]])   # scale 1: codes = floor(x), decoded code + 1/2
    codes, scale = encode(x, "mixed", counts)
    assert scale.item() == 1.0
    # 8 bits: -128 + 128; 4 bits: (7 + 8) | (-1 + 8) << 4, (0 + 8) | pad 8 << 4; 2 bits: (1 + 2) | (-2 + 2) << 2
    # | pad (0 + 2) << 4 | pad 2 << 6
    assert codes.tolist() == [[0, 15 + 16 * 7, 8 + 16 * 8, 3 + 4 * 0 + 16 * 2 + 64 * 2]]
    assert decode(codes, scale, 6, "mixed", torch.float32, counts).tolist() == [[-127.5, 7.5, -0.5, 0.5, 1.5, -1.5]]
    # int4 is the mixed format with every coordinate 4 bits wide: the same bytes
    y = torch.randn(3, 9)
    assert torch.equal(encode(y, "int4")[0], encode(y, "mixed", (0, 9, 0))[0])


def test_mixed_layouts_that_do_not_fit_are_one_line_errors():
    with pytest.raises(ValueError, match="add up to 6"):
        encode(torch.zeros(1, 6), "mixed", (1, 2, 2))
    with pytest.raises(ValueError, match="needs counts"):
        code_width(6, "mixed")
    with pytest.raises(ValueError, match="a mixed cache of rank 4 needs counts"):
        Quantized(torch.zeros(1, 1, 1, 2, dtype=torch.uint8), torch.zeros(1, 1, 1, 1).half(), "mixed", 4).check("k")
    with pytest.raises(ValueError, match=r"k codes must be torch.uint8 \[1, 1, 1, 2\] for mixed rank 4"):
        Quantized(torch.zeros(1, 1, 1, 3, dtype=torch.uint8), torch.zeros(1, 1, 1, 1).half(), "mixed", 4,
                  (0, 4, 0)).check("k")
    assert parse_layout(layout_attribute((1, 3, 2), (0, 5, 0))) == ((1, 3, 2), (0, 5, 0))
    assert layout_attribute() == "" and parse_layout("") == (None, None)
    with pytest.raises(ValueError, match="kv_layout must be 'n8,n4,n2;n8,n4,n2'"):
        parse_layout("1,3,2")
    assert cache_slots(6, 5, "mixed", torch.float32, ((1, 3, 2), (0, 5, 0)))[:2] == [("key", 4, torch.uint8),
                                                                                    ("value", 3, torch.uint8)]
    assert kv_bytes_per_token([(6, 5)], 3, 4, "mixed", [((1, 3, 2), (0, 5, 0))]) == (4 + 3 + 2 * 2) * 3


def test_bit_allocation_fills_the_budget_widest_first():
    """Reverse water-filling: the strongest coordinates get the most bits, never more than the mean allows."""
    from eigen_export.method.decompose import allocate_bits

    spectra = [torch.logspace(2, -3, 20).expand(3, 20), torch.logspace(0, -1, 12).expand(3, 12)]
    for mean in (2.5, 4.0, 6.0):
        counts = allocate_bits(spectra, mean)
        bits = sum(8 * a + 4 * b + 2 * c for a, b, c in counts)
        assert bits <= mean * 32 and bits > (mean - 1) * 32, (mean, counts)
        assert [sum(c) for c in counts] == [20, 12]
    steep, flat = allocate_bits(spectra, 4.0)
    assert steep[0] > 0 and steep[2] > 0 and flat[0] == 0     # a flat spectrum gains nothing from unequal widths


def test_group_transform_is_an_invertible_change_of_latent_coordinates():
    from eigen_export.method.decompose import group_transform

    eig = torch.logspace(1, -2, 10).expand(2, 10) * torch.tensor([[1.0], [3.0]])
    up, down = group_transform(eig, (2, 5, 3), seed=1)
    eye = torch.eye(10, dtype=torch.float64).expand(2, 10, 10)
    assert torch.allclose(up @ down.transpose(-1, -2), eye, atol=1e-12)
    assert not torch.allclose(up, down)                                   # scaled run by run
    up, down = group_transform(eig, (2, 5, 3), seed=1, scale=False)      # RoPE post keys: orthogonal
    assert torch.equal(up, down) and torch.allclose(up @ up.transpose(-1, -2), eye, atol=1e-12)
