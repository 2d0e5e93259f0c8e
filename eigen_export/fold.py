"""Fold: write the chosen bases into the weights and produce the folded artifact (DESIGN 3.1-3.2).

Per head h of KV group g(h), with U = basis_k[g] (d x r_k) and P = basis_v[g] (d x r_v):
  non-RoPE:  W_Q'[h] = U^T W_Q[h],  W_K'[g] = U^T W_K[g]   (biases likewise)
  RoPE post: W_Q, W_K unchanged; U is kept and applied after rotation (cache = U^T rope(k))
  RoPE pre:  W_K'[g] = U^T W_K[g] (pre-RoPE keys); W_Q unchanged; U kept to rebuild keys
  all:       W_V'[g] = P^T W_V[g],  W_O'[:, h] = W_O[:, h] P
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from .artifacts import atomic_dir
from .decompose import choose_by_budget, choose_by_energy, choose_by_kv_ratio, kv_ratio
from .errors import EigenExportError
from .families import ModelSpec, spec_from_config
from .manifest import Manifest
from .modeling import Decoder, LayerRanks

log = logging.getLogger("eigen_export")

MANIFEST = "eigen.json"
WEIGHTS = "model.safetensors"


def _per_query_head(basis: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    return basis.repeat_interleave(spec.group_size, dim=0)          # [H, d, r]


def _rows(weight, basis, heads):
    """U^T W per head: weight [heads*d, ...] -> [heads*r, ...]; basis [heads, d, r]."""
    w = weight.double().reshape(heads, basis.shape[1], *weight.shape[1:])
    return torch.einsum("hdr,hd...->hr...", basis.double(), w).reshape(-1, *weight.shape[1:])


def fold_layer(weights: dict[str, torch.Tensor], basis_k: torch.Tensor, basis_v: torch.Tensor,
               spec: ModelSpec, rope_mode: str | None) -> dict[str, torch.Tensor]:
    """Fold one layer. `weights` uses in-layer canonical names ("attn.q.weight", ...); returns a new dict."""
    out = dict(weights)
    h, h_kv = spec.num_heads, spec.num_kv_heads
    rope = spec.positions == "rope"
    for part in ("weight", "bias"):
        if f"attn.v.{part}" in weights:
            out[f"attn.v.{part}"] = _rows(weights[f"attn.v.{part}"], basis_v, h_kv)
        if f"attn.k.{part}" in weights and (not rope or rope_mode == "pre"):
            out[f"attn.k.{part}"] = _rows(weights[f"attn.k.{part}"], basis_k, h_kv)
        if f"attn.q.{part}" in weights and not rope:
            out[f"attn.q.{part}"] = _rows(weights[f"attn.q.{part}"], _per_query_head(basis_k, spec), h)
    o = weights["attn.o.weight"].double()
    p = _per_query_head(basis_v, spec).double()                      # [H, d, r_v]
    out["attn.o.weight"] = torch.einsum("Dhd,hdr->Dhr", o.reshape(o.shape[0], h, -1), p).reshape(o.shape[0], -1)
    if rope:
        out["attn.basis_k"] = basis_k.double()
    dtype = weights["attn.o.weight"].dtype
    return {k: v.to(dtype) for k, v in out.items()}


def fold_state(state: dict[str, torch.Tensor], bases: list[tuple[torch.Tensor, torch.Tensor]],
               ranks: list[LayerRanks], spec: ModelSpec, rope_mode: str | None) -> dict[str, torch.Tensor]:
    """Fold every layer of a canonical state dict; bases[i] = (full U_k, full U_v), each [H_kv, d, d]."""
    folded = {k: v for k, v in state.items() if not k.startswith("layers.")}
    for i, (r, (u_k, u_v)) in enumerate(zip(ranks, bases)):
        prefix = f"layers.{i}."
        layer = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        layer = fold_layer(layer, u_k[..., : r.k], u_v[..., : r.v], spec, rope_mode)
        folded |= {prefix + k: v for k, v in layer.items()}
    return folded


ALLOCATIONS = ("energy", "error", "update_error")


def decide_ranks(layers, head_dim: int, kv_ratio_target: float | None, error_budget: float | None,
                 allocation: str = "energy", rank_multiple: int = 1):
    """(ranks, per-layer calibrated error or None, allocation record) from exactly one user rule (DESIGN 3.3).

    --kv-ratio: `energy` (default) takes one energy threshold for all layers; `error` / `update_error`
    take the smallest worst-layer calibrated block error that fits (decompose.CurvePoint). --error-budget
    is the paper's per-layer rule on the block error.
    """
    if (kv_ratio_target is None) == (error_budget is None):
        raise EigenExportError("give exactly one of --kv-ratio or --error-budget")
    if allocation not in ALLOCATIONS:
        raise EigenExportError(f"--allocation {allocation!r} is unknown: use one of {', '.join(ALLOCATIONS)}")
    if error_budget is not None:
        if error_budget <= 0:
            raise EigenExportError(f"--error-budget {error_budget} must be positive (e.g. 0.02)")
        chosen = choose_by_budget([layer.curve for layer in layers], error_budget)
        return _ranks_errors(chosen), {"rule": "error_budget", "error_budget": error_budget}
    if not 0 < kv_ratio_target <= 1:
        raise EigenExportError(f"--kv-ratio {kv_ratio_target} is outside (0, 1]: it is the fraction of the "
                               "original KV cache to keep, e.g. 0.7")
    record = {"rule": "kv_ratio", "target": kv_ratio_target, "allocation": allocation}
    try:
        if allocation == "energy":
            pairs, eps = choose_by_energy([(layer.eig_k, layer.eig_v) for layer in layers], kv_ratio_target,
                                          head_dim, rank_multiple)
            measured = [{(p.rank_k, p.rank_v): p.error for p in layer.curve} for layer in layers]
            ranks = [LayerRanks(k, v) for k, v in pairs]
            return (ranks, [m.get(pair) for m, pair in zip(measured, pairs)]), record | {"energy_threshold": eps}
        chosen, budget = choose_by_kv_ratio([layer.curve for layer in layers], kv_ratio_target, head_dim,
                                            allocation)
    except ValueError as e:
        raise EigenExportError(str(e)) from None
    return _ranks_errors(chosen), record | {"error_budget_found": budget}


def _ranks_errors(points):
    return [LayerRanks(p.rank_k, p.rank_v) for p in points], [p.error for p in points]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_folded(out_dir: Path, hf_config, state: dict[str, torch.Tensor], manifest_fields: dict,
                 tokenizer_source: str | Path | None = None, force: bool = False) -> Manifest:
    """config.json + model.safetensors + tokenizer + eigen.json (written last), atomically."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir, force=force) as tmp:
        hf_config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if tokenizer_source is not None:
            _copy_tokenizer(tokenizer_source, tmp)
        manifest = Manifest(weights_sha256=sha256_file(tmp / WEIGHTS), **manifest_fields)
        (tmp / MANIFEST).write_text(manifest.to_json())
    return manifest


def _copy_tokenizer(source, dest: Path) -> None:
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(dest))
    except (OSError, ValueError) as e:
        log.warning("no tokenizer saved with the folded model (%s)", str(e).splitlines()[0])


def load_folded(path: str | Path, dtype="float32", device="cpu", verify: bool = True) -> Decoder:
    """Rebuild the low-rank reference model of a folded directory; refuse weights that do not match."""
    from safetensors.torch import load_file

    from .loading import build_decoder, load_hf_config

    path = Path(path)
    manifest = Manifest.read(path / MANIFEST)
    config = load_hf_config(path)
    if config.model_type != manifest.model_type:
        raise EigenExportError(f"{path}: config.json is {config.model_type!r} but eigen.json says "
                               f"{manifest.model_type!r}: the artifact was mixed up; re-run the fold")
    weights = path / WEIGHTS
    if not weights.exists():
        raise EigenExportError(f"{weights} is missing: re-run `eigen-export fold`")
    if verify and sha256_file(weights) != manifest.weights_sha256:
        raise EigenExportError(f"{weights} does not match the sha256 in eigen.json: the weights were changed "
                               "or belong to another fold; re-run `eigen-export fold`")
    spec = spec_from_config(config)
    # A KV-head merge in a family whose config has no num_key_value_heads: the manifest holds the count.
    merged = manifest.extra.get("merge", {}).get("kv_heads") == manifest.num_kv_heads
    if (spec.num_layers, spec.head_dim) != (manifest.num_layers, manifest.head_dim) or \
            (spec.num_kv_heads != manifest.num_kv_heads and not merged):
        raise EigenExportError(f"{path}: config.json and eigen.json disagree on layers/KV heads/head_dim")
    ranks = [LayerRanks(k, v) for k, v in manifest.ranks]
    state = load_file(str(weights))
    return build_decoder(config, state, ranks, manifest.rope_mode, dtype=dtype, device=device,
                         num_kv_heads=manifest.num_kv_heads)


def fold_to_target(model: Decoder, layers, settings: dict, kv_ratio_target: float | None,
                   error_budget: float | None = None, allocation: str = "energy"):
    """(ranks, layer errors, allocation record, folded canonical state) for one target, in memory."""
    (ranks, layer_errors), allocation_record = decide_ranks(layers, model.spec.head_dim, kv_ratio_target,
                                                            error_budget, allocation, settings.get("rank_multiple", 1))
    state = fold_state(model.state_dict(), [(layer.basis_k, layer.basis_v) for layer in layers], ranks, model.spec,
                       settings.get("rope_mode"))
    return ranks, layer_errors, allocation_record, state


def run_fold(source: str, calib_dir: str | Path, out_dir: str | Path, kv_ratio_target: float | None = None,
             error_budget: float | None = None, dtype: str = "float32", force: bool = False,
             allocation: str = "energy") -> Manifest:
    """CLI `fold`: decide ranks from the calibration curves, fold the bases, write the folded artifact."""
    from .calibrate import load_calibration
    from .loading import load_hf
    from .merge import read_merge_record

    if kv_ratio_target is not None and not 0 < kv_ratio_target <= 1:   # fail before loading any weights
        decide_ranks([], 1, kv_ratio_target, None, allocation)
    layers, settings = load_calibration(Path(calib_dir))
    config, model = load_hf(source, dtype="float32")
    spec = model.spec
    if settings.get("model_type") != config.model_type or len(layers) != spec.num_layers or \
            layers[0].basis_k.shape[-1] != spec.head_dim:
        raise EigenExportError(f"calibration in {calib_dir} was made for {settings.get('source')!r}, not {source!r}: "
                               "re-run `eigen-export calibrate` for this model")
    ranks, layer_errors, allocation_record, state = fold_to_target(model, layers, settings, kv_ratio_target,
                                                                   error_budget, allocation)
    rope_mode = settings.get("rope_mode")
    from .loading import resolve_dtype

    state = {k: v.to(resolve_dtype(dtype)) for k, v in state.items()}
    pairs = [(r.k, r.v) for r in ranks]
    merge = read_merge_record(source)     # KV heads merged before this fold: one manifest records both
    fields = dict(
        model_type=config.model_type, family=spec.family, source=str(source), rope_mode=rope_mode,
        num_layers=spec.num_layers, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, softmax_scale=spec.softmax_scale, ranks=[list(p) for p in pairs],
        kv_ratio=round(kv_ratio(pairs, spec.head_dim), 6), layer_errors=layer_errors,
        calibration={**{k: v for k, v in settings.items() if k not in ("format", "version")},
                     "allocation": allocation_record},
        dtype=dtype,
        extra={"merge": merge} if merge else {},
    )
    manifest = write_folded(Path(out_dir), config, state, fields, tokenizer_source=source, force=force)
    log.info("folded %s: KV ratio %.3f, ranks %s", source, manifest.kv_ratio, pairs)
    return manifest
