import pytest
import torch

from eigen_export.method.decompose import (CurvePoint, choose_by_budget, choose_by_cost, choose_by_energy,
                                           choose_by_kv_ratio, direction_costs, eigenbasis, energy_rank, kv_ratio,
                                           layer_rank, loss_basis, rotation_average)
from eigen_export.modeling import rotate


def test_bases_are_orthonormal_and_sorted():
    x = torch.randn(500, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    values, vectors = eigenbasis((x.T @ x)[None].repeat(3, 1, 1))
    eye = torch.eye(16, dtype=torch.float64)
    assert torch.allclose(vectors.transpose(-1, -2) @ vectors, eye.expand(3, 16, 16), atol=1e-10)
    assert (values[:, :-1] >= values[:, 1:]).all()
    # the eigenvalues of X^T X are the squared singular values of X
    assert torch.allclose(values[0], torch.linalg.svdvals(x) ** 2, rtol=1e-8)


def test_energy_rank_by_hand():
    # energies 4, 3, 2, 1 of 10: cumulative shares 0.4, 0.7, 0.9, 1.0
    e = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    assert [energy_rank(e, eps) for eps in (0.4, 0.41, 0.7, 0.71, 0.9, 0.95, 1.0)] == [1, 2, 2, 3, 3, 4, 4]
    heads = torch.stack([e, torch.tensor([9.0, 0.5, 0.4, 0.1], dtype=torch.float64)])
    assert layer_rank(heads, 0.9) == 3                 # max over heads: 3 and 1
    assert layer_rank(heads, 0.9, multiple=8) == 4     # rounded up, capped at head_dim
    with pytest.raises(ValueError):
        energy_rank(e, 0.0)


def test_kv_ratio_counts_both_caches():
    assert kv_ratio([(64, 64), (32, 32)], head_dim=64) == pytest.approx(0.75)
    assert kv_ratio([(40, 24)], head_dim=64) == pytest.approx(0.5)


def _curves():
    # two layers; layer 0 degrades fast, layer 1 slowly
    return [
        [CurvePoint(1.0, 8, 8, 0.0), CurvePoint(0.9, 6, 6, 0.10), CurvePoint(0.8, 4, 4, 0.30)],
        [CurvePoint(1.0, 8, 8, 0.0), CurvePoint(0.9, 6, 6, 0.02), CurvePoint(0.8, 4, 4, 0.05)],
    ]


def test_budget_rule_takes_cheapest_passing_point():
    chosen = choose_by_budget(_curves(), 0.05)
    assert [(p.rank_k, p.rank_v) for p in chosen] == [(8, 8), (4, 4)]


def test_kv_ratio_allocation_meets_target_with_least_worst_error():
    chosen, budget = choose_by_kv_ratio(_curves(), 0.75, head_dim=8, metric="error")   # 24 of 32 dims
    assert sum(p.cost for p in chosen) <= 24
    assert budget == pytest.approx(0.05)            # (8,8)+(4,4) = 24 dims at worst error 0.05 beats 0.10
    assert [(p.rank_k, p.rank_v) for p in chosen] == [(8, 8), (4, 4)]
    with pytest.raises(ValueError, match="below the smallest ratio"):
        choose_by_kv_ratio(_curves(), 0.4, head_dim=8)


def test_allocation_metric_is_selectable():
    # the update-relative errors rank the layers the other way round: layer 1 is now the fragile one
    curves = [[CurvePoint(p.eps, p.rank_k, p.rank_v, p.error, update_error=u) for p, u in zip(curve, errs)]
              for curve, errs in zip(_curves(), ([0.0, 0.02, 0.05], [0.0, 0.10, 0.30]))]
    chosen, budget = choose_by_kv_ratio(curves, 0.75, head_dim=8, metric="update_error")
    assert [(p.rank_k, p.rank_v) for p in chosen] == [(4, 4), (8, 8)] and budget == pytest.approx(0.05)
    chosen, _ = choose_by_kv_ratio(curves, 0.75, head_dim=8, metric="error")
    assert [(p.rank_k, p.rank_v) for p in chosen] == [(8, 8), (4, 4)]


def test_energy_allocation_takes_one_threshold_for_all_layers():
    flat = torch.ones(1, 8, dtype=torch.float64)                       # every dim holds 1/8 of the energy
    steep = torch.tensor([[64.0, 32, 16, 8, 4, 2, 1, 1]], dtype=torch.float64)
    pairs, eps = choose_by_energy([(flat, steep), (steep, flat)], target=0.75, head_dim=8)
    assert kv_ratio(pairs, 8) <= 0.75
    # one threshold: the flat spectrum needs many more dims than the steep one for the same share
    assert pairs[0][0] > pairs[0][1] and pairs[1][1] > pairs[1][0]
    assert [energy_rank(flat[0], eps), energy_rank(steep[0], eps)] == list(pairs[0])
    assert choose_by_energy([(flat, flat)], 1.0, 8)[0] == [(8, 8)]
    with pytest.raises(ValueError, match="below what rank 1"):
        choose_by_energy([(flat, flat)], 0.05, 8)


def _random_gram(d, rank, generator):
    x = torch.randn(rank, d, generator=generator, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    return x.T @ x


def _projection_cost(gram, grad_gram, up, down):
    """tr(G (I - B A) C (I - B A)^T): the loss measure loss_basis minimises, computed directly."""
    residual = torch.eye(gram.shape[-1], dtype=torch.float64) - up @ down.T
    return torch.trace(grad_gram @ residual @ gram @ residual.T).item()


def test_loss_basis_drops_exactly_its_spectrum_and_beats_the_eigenbasis():
    """Truncating the loss basis to r costs the spectrum's tail, the minimum over rank-r projections: no worse
    than the energy eigenbasis (whose cost direction_costs gives exactly) or a random rank-r projection."""
    generator = torch.Generator().manual_seed(0)
    d = 8
    gram, grad_gram = _random_gram(d, 40, generator), _random_gram(d, 40, generator)
    spectrum, down, up = loss_basis(gram, grad_gram, ridge=0.0)
    assert torch.all(spectrum[:-1] >= spectrum[1:])
    assert torch.allclose(down.T @ up, torch.eye(d, dtype=torch.float64), atol=1e-9)     # A B = I: exact at full rank
    _, eigvecs = eigenbasis(gram)
    energy_costs = direction_costs(gram, grad_gram, eigvecs)
    for r in range(d):
        cost = _projection_cost(gram, grad_gram, up[:, :r], down[:, :r])
        assert cost == pytest.approx(spectrum[r:].sum().item(), rel=1e-8, abs=1e-12)
        energy = _projection_cost(gram, grad_gram, eigvecs[:, :r], eigvecs[:, :r])
        assert energy == pytest.approx(energy_costs[r:].sum().item(), rel=1e-8, abs=1e-12)
        assert cost <= energy * (1 + 1e-9)
        q, _ = torch.linalg.qr(torch.randn(d, max(r, 1), generator=generator, dtype=torch.float64))
        assert cost <= _projection_cost(gram, grad_gram, q[:, :r], q[:, :r]) * (1 + 1e-9)
    # an isotropic gradient makes it the eigenbasis (up to signs) with the energy spectrum
    spectrum, down, up = loss_basis(gram, torch.eye(d, dtype=torch.float64), ridge=0.0)
    assert torch.allclose(spectrum, eigenbasis(gram)[0], rtol=1e-9)
    assert torch.allclose((up.T @ eigvecs).abs(), torch.eye(d, dtype=torch.float64), atol=1e-6)


def test_cost_allocation_drops_the_cheapest_directions_first():
    """With descending costs, the price rule keeps exactly the directions costing more than one threshold: the
    kept count of every (layer, K/V) equals a brute-force sort of all directions by cost (every cache keeps its
    first direction: rank 0 is no cache)."""
    generator = torch.Generator().manual_seed(1)
    d, h = 6, 2
    costs = [tuple(torch.rand(h, d, generator=generator, dtype=torch.float64).sort(-1, descending=True)[0] * scale
                   for scale in (1.0, 10.0)) for _ in range(3)]
    target = 0.5
    ranks, price = choose_by_cost(costs, target, d)
    assert kv_ratio(ranks, d) <= target + 1e-12
    summed = sorted(((c.sum(0)[j].item() if j else float("inf"), l, kind, j) for l, pair in enumerate(costs)
                     for kind, c in enumerate(pair) for j in range(d)), reverse=True)
    kept = summed[: int(target * 3 * 2 * d)]
    for l, (rk, rv) in enumerate(ranks):
        assert rk == sum(1 for _, ll, kind, _ in kept if ll == l and kind == 0)
        assert rv == sum(1 for _, ll, kind, _ in kept if ll == l and kind == 1)
    # values cost 10x more here: the rule keeps more of them
    assert sum(v for _, v in ranks) > sum(k for k, _ in ranks)


def test_cost_allocation_rounds_to_the_rank_multiple_and_rejects_unreachable_targets():
    costs = [(torch.ones(1, 8, dtype=torch.float64), torch.ones(1, 8, dtype=torch.float64))] * 2
    ranks, _ = choose_by_cost(costs, 0.5, 8, multiple=4)
    assert all(k % 4 == 0 and v % 4 == 0 for k, v in ranks) and kv_ratio(ranks, 8) <= 0.5
    assert choose_by_cost(costs, 1.0, 8)[0] == [(8, 8), (8, 8)]
    with pytest.raises(ValueError, match="below what rank 4 per layer reaches"):
        choose_by_cost(costs, 0.3, 8, multiple=4)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rotation_average_equals_the_mean_over_positions_of_rotated_grams(layout):
    """The closed form against rotating every vector to every position (partial rotary: 6 of 8 features turn;
    an attention factor of 0.9 scales the turned ones)."""
    torch.manual_seed(0)
    d, rope_dim, positions, factor = 8, 6, 37, 0.9
    inv_freq = 1.0 / 50 ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
    x = torch.randn(200, d, dtype=torch.float64) @ torch.randn(d, d, dtype=torch.float64)
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq
    angles = torch.cat((angles, angles), -1) if layout == "half" else angles.repeat_interleave(2, -1)
    want = torch.zeros(d, d, dtype=torch.float64)
    for cos, sin in zip(angles.cos() * factor, angles.sin() * factor):
        turned = rotate(x[None, None], cos, sin, rope_dim, layout)[0, 0]
        want += turned.T @ turned / positions
    got = rotation_average(x.T @ x, inv_freq, rope_dim, layout, positions, factor)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-9)
    assert not torch.allclose(got, x.T @ x, rtol=0.05)                  # the rotation does change the Gram
