"""The quantized cache format (plugins/lowrank_attention/kv_codec.py) and the rotation folded in front of it."""
import pytest
import torch

from eigen_export.method.decompose import incoherent_rotation, kv_bytes_per_token
from eigen_export_plugins.lowrank_attention.kv_codec import QMAX, Quantized, cache_slots, code_width, decode, encode


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
    # the scale is the fp16 rounding of absmax / qmax: the largest element uses (almost) the whole range; a
    # vector so small that its scale would be subnormal in fp16 gets the smallest normal one instead
    want = (x.abs().amax(-1, keepdim=True) / QMAX[kv_dtype]).clamp_min(2 ** -14)
    assert torch.allclose(step, want, rtol=1e-3)


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_re_encoding_a_decoded_cache_is_the_identity(kv_dtype):
    """Codes are made with the stored (fp16) scale, so a decoded vector encodes to the same codes and scale: a
    backend that re-quantizes what it read cannot drift from the reference."""
    x = torch.randn(4, 3, 9, 13) * 5
    codes, scale = encode(x, kv_dtype)
    again = encode(decode(codes, scale, 13, kv_dtype, torch.float32), kv_dtype)
    assert torch.equal(again[0], codes) and torch.equal(again[1], scale)


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    x = torch.tensor([[7.0, -7.0, 0.0, 1.0, -3.0]])                 # absmax 7: scale 1, codes = x
    codes, scale = encode(x, "int4")
    assert scale.item() == 1.0 and codes.dtype == torch.uint8
    # stored offset by 8: [15, 1, 8, 9, 5, (pad) 8] -> bytes 15 + 16*1, 8 + 16*9, 5 + 16*8
    assert codes.tolist() == [[15 + 16 * 1, 8 + 16 * 9, 5 + 16 * 8]]
    assert decode(codes, scale, 5, "int4", torch.float32).tolist() == x.tolist()


def test_a_zero_vector_stays_zero():
    for kv_dtype in ("int8", "int4"):
        codes, scale = encode(torch.zeros(2, 6), kv_dtype)
        assert torch.isfinite(scale.float()).all()
        assert torch.equal(decode(codes, scale, 6, kv_dtype, torch.float32), torch.zeros(2, 6))


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
    """One fp16 scale per vector, the same step for every coordinate; a coordinate of width w holds at most
    qmax_w steps, so the scale is the largest |x_j| / qmax_j and nothing clips."""
    rank = sum(counts)
    qmax = torch.tensor([127.0] * counts[0] + [7.0] * counts[1] + [1.0] * counts[2])
    x = torch.randn(5, 2, 7, rank) * qmax.sqrt()                     # spreads roughly as the fold makes them
    codes, scale = encode(x, "mixed", counts)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == code_width(rank, "mixed", counts)
    assert code_width(rank, "mixed", counts) == counts[0] + -(-counts[1] // 2) + -(-counts[2] // 4)
    back = decode(codes, scale, rank, "mixed", torch.float32, counts)
    assert ((back - x).abs() <= scale.float() / 2 + 1e-6 * x.abs()).all()
    assert torch.allclose(scale.float(), (x.abs() / qmax).amax(-1, keepdim=True), rtol=1e-3)
    again = encode(back, "mixed", counts)
    assert torch.equal(again[0], codes) and torch.equal(again[1], scale)
    zeros = encode(torch.zeros(2, rank), "mixed", counts)
    assert torch.equal(decode(*zeros, rank, "mixed", torch.float32, counts), torch.zeros(2, rank))


def test_mixed_packs_each_width_from_a_fresh_byte_lowest_bits_first():
    counts = (1, 3, 2)                                  # one 8-bit, three 4-bit, two 2-bit coordinates
    x = torch.tensor([[-127.0, 7.0, -1.0, 0.0, 1.0, -1.0]])   # scale 1: codes = x
    codes, scale = encode(x, "mixed", counts)
    assert scale.item() == 1.0
    # 8 bits: -127 + 128; 4 bits: (7 + 8) | (-1 + 8) << 4, (0 + 8) | pad 8 << 4; 2 bits: (1 + 2) | (-1 + 2) << 2
    # | pad (0 + 2) << 4 | pad 2 << 6
    assert codes.tolist() == [[1, 15 + 16 * 7, 8 + 16 * 8, 3 + 4 * 1 + 16 * 2 + 64 * 2]]
    assert decode(codes, scale, 6, "mixed", torch.float32, counts).tolist() == x.tolist()
    # int4 is the mixed format with every coordinate 4 bits wide: the same bytes
    y = torch.randn(3, 9)
    assert torch.equal(encode(y, "int4")[0], encode(y, "mixed", (0, 9, 0))[0])


def test_mixed_layouts_that_do_not_fit_are_one_line_errors():
    with pytest.raises(ValueError, match="add up to 6"):
        encode(torch.zeros(1, 6), "mixed", (1, 2, 2))
    with pytest.raises(ValueError, match="needs counts"):
        code_width(6, "mixed")
    with pytest.raises(ValueError, match="int8 or int4"):
        Quantized(torch.zeros(1, 1, 1, 2, dtype=torch.uint8), torch.zeros(1, 1, 1, 1).half(), "mixed", 4).check("k")
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
