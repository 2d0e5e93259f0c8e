"""Fold: decide the ranks and write the chosen bases into the weights (DESIGN 3.1-3.3). Tensors only.

Per head h of KV group g(h), with U = basis_k[g] (d x r_k) rebuilding a key from its latent, A = down_k[g]^T
(r_k x d) making the latent, and P, B = basis_v[g], down_v[g]^T likewise for values. The paper's orthonormal
eigenbases have A = U^T; the loss bases (decompose.loss_basis) do not, and nothing below needs them to:
  non-RoPE:  W_Q'[h] = U^T W_Q[h],  W_K'[g] = A W_K[g]   (biases likewise; q'.k' = q^T U A k)
  RoPE post: W_Q, W_K unchanged; U (orthonormal) is kept and applied after rotation (cache = U^T rope(k))
  RoPE pre:  W_K'[g] = A W_K[g] (pre-RoPE keys); W_Q unchanged; U kept to rebuild keys
  all:       W_V'[g] = B W_V[g],  W_O'[:, h] = W_O[:, h] P
A joint latent (spec.joint_latents, issue 13) is the case of one group spanning the H_kv d features of all KV heads:
A and B read the whole key / value row, and U, P split into H_kv blocks of d rows, block g serving g's query heads.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..errors import EigenExportError
from ..families import ModelSpec
from ..modeling import Decoder, LayerRanks
from .decompose import allocate_bits, balance, choose_by_budget, choose_by_cost, choose_by_energy, \
    choose_by_kv_ratio, group_transform, incoherent_rotation


def _per_query_head(basis: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    return basis.repeat_interleave(spec.group_size, dim=0)          # [H, d, r]


def _rows(weight, basis, heads):
    """U^T W per head: weight [heads*d, ...] -> [heads*r, ...]; basis [heads, d, r]."""
    w = weight.double().reshape(heads, basis.shape[1], *weight.shape[1:])
    return torch.einsum("hdr,hd...->hr...", basis.double(), w).reshape(-1, *weight.shape[1:])


def fold_layer(weights: dict[str, torch.Tensor], basis_k: torch.Tensor, basis_v: torch.Tensor,
               spec: ModelSpec, rope_mode: str | None, down_k: torch.Tensor | None = None,
               down_v: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Fold one layer. `weights` uses in-layer canonical names ("attn.q.weight", ...); returns a new dict.

    basis_* [H_kv, d, r] rebuild a head's vector from its cached latent (B); down_* [H_kv, d, r] make the latent
    (A = down^T), default the basis itself (an orthonormal basis projects with its transpose). Only pre mode
    and non-RoPE models can take a separate down projection: post mode applies one matrix to keys and queries.
    Joint latents: every one of them [1, H_kv d, r].
    """
    down_k = basis_k if down_k is None else down_k
    down_v = basis_v if down_v is None else down_v
    if spec.positions == "rope" and rope_mode == "post" and not torch.equal(down_k, basis_k):
        raise EigenExportError("post RoPE mode needs an orthonormal key basis (no separate down projection)")
    out = dict(weights)
    h, h_kv, cached = spec.num_heads, spec.num_kv_heads, spec.cache_heads
    if basis_k.shape[:2] != (cached, spec.latent_width) or basis_v.shape[:2] != (cached, spec.latent_width):
        raise EigenExportError(f"bases of shape {tuple(basis_k.shape)} do not fit {cached} cached heads of "
                               f"{spec.latent_width} features: the calibration's latents differ from the fold's")
    # per KV head: U's blocks of d rows ([H_kv, d, r]), what queries and W_O are folded with
    basis_k, basis_v = (b.reshape(h_kv, spec.head_dim, b.shape[-1]) for b in (basis_k, basis_v))
    rope = spec.positions == "rope"
    for part in ("weight", "bias"):
        if f"attn.v.{part}" in weights:
            out[f"attn.v.{part}"] = _rows(weights[f"attn.v.{part}"], down_v, cached)
        if f"attn.k.{part}" in weights and (not rope or rope_mode == "pre"):
            out[f"attn.k.{part}"] = _rows(weights[f"attn.k.{part}"], down_k, cached)
        if f"attn.q.{part}" in weights and not rope:
            out[f"attn.q.{part}"] = _rows(weights[f"attn.q.{part}"], _per_query_head(basis_k, spec), h)
    o = weights["attn.o.weight"].double()
    p = _per_query_head(basis_v, spec).double()                      # [H, d, r_v]
    out["attn.o.weight"] = torch.einsum("Dhd,hdr->Dhr", o.reshape(o.shape[0], h, -1), p).reshape(o.shape[0], -1)
    if rope:
        out["attn.basis_k"] = basis_k.double()
    dtype = weights["attn.o.weight"].dtype
    return {k: v.to(dtype) for k, v in out.items()}


def fold_state(state: dict[str, torch.Tensor], bases: list[tuple[torch.Tensor, ...]],
               ranks: list[LayerRanks], spec: ModelSpec, rope_mode: str | None,
               rotate: bool = False, mixed=None) -> dict[str, torch.Tensor]:
    """Fold every layer of a canonical state dict; bases[i] = (basis_k, basis_v[, down_k, down_v]), each full
    [H_kv, d, d] (LayerCalibration.projections(); without downs the bases are orthonormal). rotate, mixed: see
    fold_layers."""
    folded = {k: v for k, v in state.items() if not k.startswith("layers.")}

    def layer(i: int) -> dict[str, torch.Tensor]:
        prefix = f"layers.{i}."
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    for part in fold_layers(layer, bases, ranks, spec, rope_mode, rotate, mixed):
        folded |= part
    return folded


def fold_layers(layer_state: Callable[[int], dict[str, torch.Tensor]], bases: list[tuple[torch.Tensor, ...]],
                ranks: list[LayerRanks], spec: ModelSpec, rope_mode: str | None,
                rotate: bool = False, mixed=None) -> Iterator[dict[str, torch.Tensor]]:
    """Each layer's folded weights ("layers.i.*"), layer_state(i) (in-layer names) asked for only when the
    previous layer's are consumed: a fold streamed from disk holds one layer. bases as for fold_state.

    Separate down projections are balanced first (decompose.balance), so cached latents have the size of the
    vectors they encode whatever the basis. rotate: turn each kept latent space by R = incoherent_rotation
    (latent -> R^T latent, i.e. U -> U R and A -> R^T A): the model computes the same function, the r coordinates
    of a cached vector just share its energy evenly, which is what a per-token quantized cache needs (kv_codec).
    mixed = (kv_layout, spectra) for a mixed cache: per layer the (key, value) counts of its 8/4/2-bit coordinates
    and the calibrated (eig_k, eig_v); each side's latents then go through decompose.group_transform instead
    (rotated within each width's run where rotate, and scaled run by run)."""
    for i, (r, layer_bases) in enumerate(zip(ranks, bases)):
        u_k, u_v, a_k, a_v = layer_bases if len(layer_bases) == 4 else (*layer_bases, *layer_bases)
        u_k, a_k, u_v, a_v = u_k[..., : r.k], a_k[..., : r.k], u_v[..., : r.v], a_v[..., : r.v]
        if len(layer_bases) == 4:
            (u_k, a_k), (u_v, a_v) = balance(u_k, a_k), balance(u_v, a_v)
        if mixed is not None:
            (counts_k, counts_v), (eig_k, eig_v) = mixed[0][i], mixed[1][i]
            post = spec.positions == "rope" and rope_mode == "post"       # its key basis projects queries too
            up, down = group_transform(eig_k[:, : r.k], counts_k, seed=2 * i, rotate=rotate, scale=not post)
            u_k, a_k = u_k.double() @ up, a_k.double() @ down
            up, down = group_transform(eig_v[:, : r.v], counts_v, seed=2 * i + 1, rotate=rotate)
            u_v, a_v = u_v.double() @ up, a_v.double() @ down
        elif rotate:
            rot_k, rot_v = incoherent_rotation(r.k, seed=2 * i), incoherent_rotation(r.v, seed=2 * i + 1)
            u_k, a_k = u_k.double() @ rot_k, a_k.double() @ rot_k
            u_v, a_v = u_v.double() @ rot_v, a_v.double() @ rot_v
        layer = fold_layer(layer_state(i), u_k, u_v, spec, rope_mode, a_k, a_v)
        yield {f"layers.{i}.{k}": v for k, v in layer.items()}


ALLOCATIONS = ("loss", "energy", "error", "update_error")
NEEDS_CURVES = ("error", "update_error")


def decide_ranks(layers, head_dim: int, kv_ratio_target: float | None, error_budget: float | None,
                 allocation: str = "loss", rank_multiple: int = 1):
    """(ranks, per-layer calibrated error or None), and what the rule found, for exactly one user rule
    (DESIGN 3.3; the values are checked by settings.FoldSettings).

    --kv-ratio: `loss` (default) drops the directions whose calibrated loss cost is smallest, across layers and
    K/V at once; `energy` takes one energy threshold for all layers (the paper's rule, on the calibrated
    spectra); `error` / `update_error` take the smallest worst-layer calibrated block error that fits
    (decompose.CurvePoint). --error-budget is the paper's per-layer rule on the block error.
    """
    if (error_budget is not None or allocation in NEEDS_CURVES) and not all(layer.curve for layer in layers):
        rule = "--error-budget" if error_budget is not None else f"--allocation {allocation}"
        raise EigenExportError(f"{rule} needs the block-error curves, which this calibration has not measured: "
                               "calibrate with --error-samples 2 (or more)")
    if error_budget is not None:
        return _ranks_errors(choose_by_budget([layer.curve for layer in layers], error_budget)), {}
    measured = [{(p.rank_k, p.rank_v): p.error for p in layer.curve} for layer in layers]
    try:
        if allocation in ("loss", "energy"):
            if allocation == "loss":
                pairs, price = choose_by_cost([(layer.cost_k, layer.cost_v) for layer in layers], kv_ratio_target,
                                              head_dim, rank_multiple)
                found = {"price": price}
            else:
                pairs, eps = choose_by_energy([(layer.eig_k, layer.eig_v) for layer in layers], kv_ratio_target,
                                              head_dim, rank_multiple)
                found = {"energy_threshold": eps}
            ranks = [LayerRanks(k, v) for k, v in pairs]
            return (ranks, [m.get(pair) for m, pair in zip(measured, pairs)]), found
        chosen, budget = choose_by_kv_ratio([layer.curve for layer in layers], kv_ratio_target, head_dim,
                                            allocation)
    except ValueError as e:
        raise EigenExportError(str(e)) from None
    return _ranks_errors(chosen), {"error_budget_found": budget}


def _ranks_errors(points):
    return [LayerRanks(p.rank_k, p.rank_v) for p in points], [p.error for p in points]


def mixed_layout(layers, ranks: list[LayerRanks], kv_bits: float):
    """(kv_layout, spectra): fold_layers' `mixed` for a cache of kv_bits mean bits per number, the widths given
    by the calibrated spectra of the kept coordinates (decompose.allocate_bits)."""
    spectra = [(layer.eig_k, layer.eig_v) for layer in layers]
    kept = [e[:, :rank] for (eig_k, eig_v), r in zip(spectra, ranks) for e, rank in ((eig_k, r.k), (eig_v, r.v))]
    counts = allocate_bits(kept, kv_bits)
    return [[list(counts[2 * i]), list(counts[2 * i + 1])] for i in range(len(ranks))], spectra


def fold_to_target(model: Decoder, layers, rope_mode: str | None, kv_ratio_target: float | None,
                   error_budget: float | None = None, allocation: str = "loss", rank_multiple: int = 1,
                   rotate: bool = False, kv_bits: float | None = None, latents: str = "heads"):
    """(ranks, layer errors, what the rule found, folded canonical state) for one target, in memory. kv_bits: a
    mixed cache of that many mean bits (its kv_layout is then in what the rule found, "kv_layout"). latents: the
    calibration's (joint: layers hold one basis per layer side)."""
    spec = model.spec.replace(joint_latents=latents == "joint")
    (ranks, layer_errors), found = decide_ranks(layers, spec.latent_width, kv_ratio_target,
                                                            error_budget, allocation, rank_multiple)
    mixed = mixed_layout(layers, ranks, kv_bits) if kv_bits is not None else None
    if mixed is not None:
        found = {**found, "kv_layout": mixed[0]}
    state = fold_state(model.state_dict(), [layer.projections() for layer in layers], ranks, spec, rope_mode,
                       rotate, mixed)
    return ranks, layer_errors, found, state


