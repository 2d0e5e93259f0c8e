"""Calibration: one sequential pass, layer by layer, with streaming Gram accumulators (DESIGN 4).

Measure, then decide: this stage only measures. Per layer it accumulates float64 d x d Gram matrices per
KV head, takes their eigenbases, and records an error curve: the relative error of the decoder block's
output for each candidate rank pair. `fold` decides the ranks from those curves and applies them.
Layer i always sees the outputs of the ORIGINAL layers 0..i-1 (the paper's rule).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .artifacts import atomic_dir, read_json_record
from .decompose import EPS_GRID, CurvePoint, eigenbasis, layer_rank
from .errors import EigenExportError
from .fold import fold_layer
from .modeling import ROPE_MODES, Decoder, LayerRanks, rotate

log = logging.getLogger("eigen_export")

CALIB_FORMAT = "eigen_export.calib"
CALIB_VERSION = 1
BASES = "bases.safetensors"
CALIB_JSON = "calib.json"


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


class _Capture:
    """Forward hooks on a layer's q/k/v linears: the propagation pass doubles as the Gram pass."""

    def __init__(self, attn):
        self.outputs = {}
        self.handles = [getattr(attn, name).register_forward_hook(self._hook(name)) for name in "qkv"]

    def _hook(self, name):
        def save(module, inputs, output):
            self.outputs[name] = output
        return save

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _chunks(n: int, size: int):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _errors(y, ref, x) -> tuple[float, float]:
    """(||y - ref|| / ||ref||, ||y - ref|| / ||ref - x||): see decompose.CurvePoint."""
    diff = torch.linalg.vector_norm((y - ref).double())
    return ((diff / torch.linalg.vector_norm(ref.double())).item(),
            (diff / torch.linalg.vector_norm((ref - x).double())).item())


@torch.no_grad()
def calibrate(model: Decoder, calib_ids: torch.Tensor, rope_mode: str | None = "pre",
              eps_grid=EPS_GRID, error_samples: int = 2, batch_size: int = 4, rank_multiple: int = 1,
              progress: bool = True) -> list[LayerCalibration]:
    """Bases and error curves for every layer of an uncompressed model on calib_ids [N, L]."""
    spec = model.spec
    rope = spec.positions == "rope"
    if rope and rope_mode not in ROPE_MODES:
        raise EigenExportError(f"rope_mode must be one of {ROPE_MODES} for a RoPE model, got {rope_mode!r}")
    rope_mode = rope_mode if rope else None
    device = next(model.parameters()).device
    n, length = calib_ids.shape
    calib_ids = calib_ids.to(device)
    positions = torch.arange(length, device=device).expand(n, length)
    mask = torch.ones(n, length, dtype=torch.long, device=device)
    batches = _chunks(n, batch_size)
    x = torch.cat([model.embed_tokens(calib_ids[s], positions[s]) for s in batches])       # [N, L, D]
    ctx_for = {}

    def ctx(s: slice):
        size = s.stop - s.start
        if size not in ctx_for:
            ctx_for[size] = model.context(mask[s], positions[s], x.dtype, key_tables=rope)
        return ctx_for[size]

    n_err = max(1, min(error_samples, n))
    err_slices = _chunks(n_err, batch_size)
    d, h_kv = spec.head_dim, spec.num_kv_heads
    results = []
    bar = tqdm(model.layers, desc="calibrate", unit="layer", disable=not progress)
    for i, block in enumerate(bar):
        g_k = torch.zeros(h_kv, d, d, dtype=torch.float64, device=device)
        g_v = torch.zeros_like(g_k)
        capture = _Capture(block.attn)
        outputs = []
        for s in batches:
            outputs.append(block(x[s], ctx(s))[0])                        # the original layer's output
            q, k, v = fit_targets(model, capture.outputs["q"], capture.outputs["k"], capture.outputs["v"],
                                  ctx(s), rope_mode)
            _gram_update(g_k, k)
            if rope_mode != "pre":   # the joint K+Q basis preserves q.k; pre mode keeps q full
                b, _, length_, _ = q.shape
                _gram_update(g_k, q.reshape(b, h_kv, spec.group_size, length_, d))
            _gram_update(g_v, v)
        capture.remove()
        x_next = torch.cat(outputs)
        eig_k, basis_k = eigenbasis(g_k)
        eig_v, basis_v = eigenbasis(g_v)
        layer = LayerCalibration(eig_k.cpu(), basis_k.cpu(), eig_v.cpu(), basis_v.cpu())

        # error curve on the first samples: the block output with each distinct candidate rank pair
        reference = x_next[:n_err]
        layer_state = block.state_dict()
        tried = {}
        for eps in eps_grid:
            ranks = LayerRanks(layer_rank(eig_k, eps, rank_multiple), layer_rank(eig_v, eps, rank_multiple))
            if ranks == LayerRanks(d, d):
                tried[ranks] = (0.0, 0.0)   # a full-rank fold is exact up to float error (tests/test_fold.py)
            if ranks not in tried:
                folded = fold_layer(layer_state, basis_k[..., : ranks.k].to(x.dtype),
                                    basis_v[..., : ranks.v].to(x.dtype), spec, rope_mode)
                candidate = model.make_block(ranks, rope_mode, folded)
                out = torch.cat([candidate(x[s], ctx(s))[0] for s in err_slices])
                tried[ranks] = _errors(out, reference, x[:n_err])
            layer.curve.append(CurvePoint(eps, ranks.k, ranks.v, *tried[ranks]))
        results.append(layer)
        x = x_next
        bar.set_postfix(layer=i, r99=f"{layer_rank(eig_k, 0.99)}/{layer_rank(eig_v, 0.99)}")
    return results


def save_calibration(out_dir: Path, layers: list[LayerCalibration], settings: dict, force: bool = False) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for i, layer in enumerate(layers):
        for name in ("eig_k", "basis_k", "eig_v", "basis_v"):
            tensors[f"layers.{i}.{name}"] = getattr(layer, name).contiguous()
    record = {
        "format": CALIB_FORMAT, "version": CALIB_VERSION, **settings,
        "layers": [{"curve": [vars(p) for p in layer.curve],
                    "energy_k": _energy_summary(layer.eig_k), "energy_v": _energy_summary(layer.eig_v)}
                   for layer in layers],
    }
    with atomic_dir(out_dir, force=force) as tmp:
        save_file(tensors, str(tmp / BASES))
        (tmp / CALIB_JSON).write_text(json.dumps(record, indent=1) + "\n")   # last: marks completion


def _energy_summary(eig: torch.Tensor) -> dict:
    """Per layer, the rank (max over heads) holding 90 / 99 / 99.9 % of the energy: the spectra at a glance."""
    return {str(eps): layer_rank(eig, eps) for eps in (0.9, 0.99, 0.999)}


def load_calibration(calib_dir: Path) -> tuple[list[LayerCalibration], dict]:
    from safetensors.torch import load_file

    calib_dir = Path(calib_dir)
    path = calib_dir / CALIB_JSON
    record = read_json_record(path, "run `eigen-export calibrate` first", "re-run `eigen-export calibrate --force`")
    if record.get("format") != CALIB_FORMAT or record.get("version") != CALIB_VERSION:
        raise EigenExportError(f"{path} is not a version-{CALIB_VERSION} calibration: re-run `eigen-export calibrate`")
    tensors = load_file(str(calib_dir / BASES))
    layers = []
    for i, entry in enumerate(record["layers"]):
        layers.append(LayerCalibration(
            *(tensors[f"layers.{i}.{name}"] for name in ("eig_k", "basis_k", "eig_v", "basis_v")),
            curve=[CurvePoint(**p) for p in entry["curve"]]))
    settings = {k: v for k, v in record.items() if k != "layers"}
    return layers, settings


def run_calibrate(source: str, out_dir: str | Path, dataset: str = "ptb", nsamples: int = 32, seqlen: int = 512,
                  seed: int = 0, rope_mode: str = "pre", dtype: str = "float32", device: str = "cpu",
                  batch_size: int = 4, error_samples: int = 2, rank_multiple: int = 1, force: bool = False,
                  progress: bool = True) -> Path:
    """CLI `calibrate`: load the model and text, measure, write calib/ (bases + curves)."""
    from transformers import AutoTokenizer

    from .data import calibration_batch
    from .loading import load_hf

    if rank_multiple < 1:
        raise EigenExportError(f"--rank-multiple must be >= 1, got {rank_multiple}")
    started = time.perf_counter()
    config, model = load_hf(source, dtype=dtype, device=device)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    ids = calibration_batch(tokenizer, dataset, nsamples, seqlen, seed)
    layers = calibrate(model, ids, rope_mode, error_samples=error_samples, batch_size=batch_size,
                       rank_multiple=rank_multiple, progress=progress)
    settings = {
        "source": str(source), "model_type": config.model_type,
        "rope_mode": rope_mode if model.spec.positions == "rope" else None,
        "dataset": dataset, "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "dtype": dtype,
        "eps_grid": list(EPS_GRID), "error_samples": error_samples, "rank_multiple": rank_multiple,
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    save_calibration(Path(out_dir), layers, settings, force=force)
    return Path(out_dir)
