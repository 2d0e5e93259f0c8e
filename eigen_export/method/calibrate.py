"""Calibration: one sequential pass, layer by layer, with streaming Gram accumulators (DESIGN 4). Tensors only.

Measure, then decide: this stage only measures. Per layer it accumulates float64 d x d Gram matrices per
KV head, takes their eigenbases, and records an error curve: the relative error of the decoder block's
output for each candidate rank pair. `fold` decides the ranks from those curves and applies them.
Layer i always sees the outputs of the ORIGINAL layers 0..i-1 (the paper's rule).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from tqdm.auto import tqdm

from ..errors import EigenExportError
from ..modeling import ROPE_MODES, Decoder, LayerRanks, rotate
from .capture import LayerPass, chunks
from .decompose import EPS_GRID, CurvePoint, eigenbasis, layer_rank
from .fold import fold_layer


@dataclass
class LayerCalibration:
    eig_k: torch.Tensor        # [H_kv, d] descending eigenvalues of the key(+query) Gram
    basis_k: torch.Tensor      # [H_kv, d, d] eigenvectors as columns
    eig_v: torch.Tensor
    basis_v: torch.Tensor
    curve: list[CurvePoint] = field(default_factory=list)


def _gram_update(gram: torch.Tensor, x: torch.Tensor) -> None:
    """gram[g] += sum over batch and tokens of x^T x; x [B, H_kv, (group,) S, d]."""
    x = x.double()
    if x.dim() == 5:
        gram += torch.einsum("bgjsd,bgjse->gde", x, x)
    else:
        gram += torch.einsum("bgsd,bgse->gde", x, x)


def layer_projections(model: Decoder, block, x, ctx, rope_mode):
    """The q, k, v a layer's basis is fitted to: post-RoPE in `post` mode, pre-RoPE keys in `pre`."""
    attn = block.attn
    h_in = block.attn_input(x)
    return fit_targets(model, attn.q(h_in), attn.k(h_in), attn.v(h_in), ctx, rope_mode)


def fit_targets(model: Decoder, q, k, v, ctx, rope_mode):
    """Raw projection outputs [B, S, heads * d] -> per-head q [B, H, S, d], k, v [B, H_kv, S, d]."""
    spec = model.spec
    b, s, _ = q.shape
    q = q.view(b, s, spec.num_heads, -1).transpose(1, 2)
    k = k.view(b, s, spec.num_kv_heads, -1).transpose(1, 2)
    v = v.view(b, s, spec.num_kv_heads, -1).transpose(1, 2)
    if spec.positions == "rope" and rope_mode == "post":
        q = rotate(q, ctx.q_cos, ctx.q_sin, spec.rope_dim, spec.rope_layout)
        k = rotate(k, ctx.q_cos, ctx.q_sin, spec.rope_dim, spec.rope_layout)
    return q, k, v


def _errors(y, ref, x) -> tuple[float, float]:
    """(||y - ref|| / ||ref||, ||y - ref|| / ||ref - x||): see decompose.CurvePoint."""
    diff = torch.linalg.vector_norm((y - ref).double())
    return ((diff / torch.linalg.vector_norm(ref.double())).item(),
            (diff / torch.linalg.vector_norm((ref - x).double())).item())


@torch.no_grad()
def calibrate(model: Decoder, calib_ids: torch.Tensor, rope_mode: str | None = "pre",
              eps_grid=EPS_GRID, error_samples: int = 2, batch_size: int = 4, rank_multiple: int = 1,
              progress: bool = True, blocks: Iterable | None = None) -> list[LayerCalibration]:
    """Bases and error curves for every layer of an uncompressed model on calib_ids [N, L].

    blocks: the layers in order, where the model does not hold them (loading.StreamedModel.blocks(): each
    is read from disk when the previous one is done with); default model.layers."""
    spec = model.spec
    rope = spec.positions == "rope"
    if rope and rope_mode not in ROPE_MODES:
        raise EigenExportError(f"rope_mode must be one of {ROPE_MODES} for a RoPE model, got {rope_mode!r}")
    rope_mode = rope_mode if rope else None
    device = next(model.parameters()).device
    data = LayerPass(model, calib_ids, batch_size, key_tables=rope)
    n_err = max(1, min(error_samples, calib_ids.shape[0]))
    err_slices = chunks(n_err, batch_size)
    d, h_kv = spec.head_dim, spec.num_kv_heads
    results = []
    bar = tqdm(model.layers if blocks is None else blocks, desc="calibrate", unit="layer", total=spec.num_layers,
               disable=not progress)
    for i, block in enumerate(bar):
        g_k = torch.zeros(h_kv, d, d, dtype=torch.float64, device=device)
        g_v = torch.zeros_like(g_k)

        def accumulate(s, raw):
            q, k, v = fit_targets(model, raw["q"], raw["k"], raw["v"], data.ctx(s), rope_mode)
            _gram_update(g_k, k)
            if rope_mode != "pre":   # the joint K+Q basis preserves q.k; pre mode keeps q full
                b, _, length_, _ = q.shape
                _gram_update(g_k, q.reshape(b, h_kv, spec.group_size, length_, d))
            _gram_update(g_v, v)

        x_next = data.forward(block, accumulate)                            # the original layer's output
        eig_k, basis_k = eigenbasis(g_k)
        eig_v, basis_v = eigenbasis(g_v)
        layer = LayerCalibration(eig_k.cpu(), basis_k.cpu(), eig_v.cpu(), basis_v.cpu())

        # error curve on the first samples: the block output with each distinct candidate rank pair
        x = data.x
        reference = x_next[:n_err]
        layer_state = block.state_dict()
        tried = {}
        for eps in eps_grid:
            ranks = LayerRanks(layer_rank(eig_k, eps, rank_multiple), layer_rank(eig_v, eps, rank_multiple))
            if ranks == LayerRanks(d, d):
                tried[ranks] = (0.0, 0.0)   # a full-rank fold is exact up to float error (tests/method/test_fold.py)
            if ranks not in tried:
                folded = fold_layer(layer_state, basis_k[..., : ranks.k].to(x.dtype),
                                    basis_v[..., : ranks.v].to(x.dtype), spec, rope_mode)
                candidate = model.make_block(ranks, rope_mode, folded)
                out = torch.cat([candidate(x[s], data.ctx(s))[0] for s in err_slices])
                tried[ranks] = _errors(out, reference, x[:n_err])
            layer.curve.append(CurvePoint(eps, ranks.k, ranks.v, *tried[ranks]))
        results.append(layer)
        data.advance(x_next)
        bar.set_postfix(layer=i, r99=f"{layer_rank(eig_k, 0.99)}/{layer_rank(eig_v, 0.99)}")
    return results


def energy_summary(eig: torch.Tensor) -> dict:
    """Per layer, the rank (max over heads) holding 90 / 99 / 99.9 % of the energy: the spectra at a glance."""
    return {str(eps): layer_rank(eig, eps) for eps in (0.9, 0.99, 0.999)}
