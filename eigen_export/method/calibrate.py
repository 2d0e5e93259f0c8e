"""Calibration: a forward pass layer by layer with streaming Gram accumulators, then a backward pass layer by
layer for the loss gradients at the keys and values (DESIGN 4). Tensors only.

Measure, then decide: this stage only measures. Per layer it records the bases of the keys and values and
what dropping each basis direction costs the loss (decompose.loss_basis), optionally with an error curve
(the relative error of the block's output for candidate rank pairs); `fold` decides the ranks from them.
Layer i always sees the outputs of the ORIGINAL layers 0..i-1 (the paper's rule).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from eigen_export_plugins.lowrank_attention.reference import MAX_RANK

from ..errors import EigenExportError
from ..families import ModelSpec
from ..modeling import ROPE_MODES, Decoder, LayerRanks, rotate
from .capture import Capture, LayerPass, chunks
from .decompose import EPS_GRID, CurvePoint, direction_costs, eigenbasis, layer_rank, loss_basis, rotation_average
from .fold import fold_layer
from .metrics import LOGIT_CHUNK

# loss: bases that keep the loss (decompose.loss_basis); energy: the paper's eigenbases of the K(+Q) and V Grams
BASES = ("loss", "energy")
log = logging.getLogger("eigen_export")
# The kept layer inputs may take this share of the GPU memory free when calibration starts; the rest is for one
# layer's weights (streamed), its activations and the backward pass's working set.
ACTIVATION_SHARE = 0.5


@dataclass
class LayerCalibration:
    eig_k: torch.Tensor        # [H_kv, d] descending spectrum the key basis was fitted to
    basis_k: torch.Tensor      # [H_kv, d, d] columns rebuild a key from its latent (orthonormal for `energy`)
    eig_v: torch.Tensor
    basis_v: torch.Tensor
    cost_k: torch.Tensor       # [H_kv, d] what dropping each basis direction costs the calibration loss
    cost_v: torch.Tensor
    down_k: torch.Tensor       # [H_kv, d, d] columns make the latent (latent = down^T x); == basis when orthonormal
    down_v: torch.Tensor
    curve: list[CurvePoint] = field(default_factory=list)

    def projections(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(basis_k, basis_v, down_k, down_v): what fold.fold_layers takes per layer."""
        return self.basis_k, self.basis_v, self.down_k, self.down_v


def joint_fittable(rope_mode: str | None, basis: str, error_samples: int) -> bool:
    """Whether one basis can span all KV heads of a layer: the loss basis, pre-RoPE keys or none (a post-RoPE key
    basis also projects the queries, which rotate per head) and no error curves (their candidates are per head).
    rope_mode: None for a model without RoPE."""
    return basis == "loss" and rope_mode != "post" and not error_samples


def choose_latents(latents: str, spec: ModelSpec, rope_mode: str | None, basis: str, error_samples: int) -> str:
    """heads | joint for a calibration asked for `latents` (auto | heads | joint).

    auto takes joint latents where they can be fitted (loss basis, pre or no RoPE, no error curves) and the
    layer's whole key or value row, H_kv x head_dim, fits the attention plugin (MAX_RANK): on SmolLM2 they halve
    the perplexity cost of per-head latents at the same cache bytes (issue 13), and each query head then attends
    over up to H_kv times more latent dimensions, which a wide MHA layer (OPT-6.7b: 4096) would pay 30-fold. A
    single KV head is the same either way: heads."""
    if latents != "auto":
        return latents
    fits = 1 < spec.num_kv_heads and spec.num_kv_heads * spec.head_dim <= MAX_RANK
    fittable = joint_fittable(rope_mode if spec.positions == "rope" else None, basis, error_samples)
    return "joint" if fits and fittable else "heads"


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
    """Raw projection outputs [B, S, heads * d] -> per-head q [B, H, S, d], k, v [B, H_kv, S, d].

    Rotation is orthogonal, so the same call maps gradients at the raw outputs to gradients at the rotated
    vectors. q may be None (not needed)."""
    spec = model.spec
    b, s, _ = k.shape
    k = k.view(b, s, spec.num_kv_heads, -1).transpose(1, 2)
    v = v.view(b, s, spec.num_kv_heads, -1).transpose(1, 2)
    if q is not None:
        q = q.view(b, s, spec.num_heads, -1).transpose(1, 2)
    if spec.positions == "rope" and rope_mode == "post":
        k = rotate(k, ctx.q_cos, ctx.q_sin, spec.rope_dim, spec.rope_layout)
        if q is not None:
            q = rotate(q, ctx.q_cos, ctx.q_sin, spec.rope_dim, spec.rope_layout)
    return q, k, v


def _errors(y, ref, x) -> tuple[float, float]:
    """(||y - ref|| / ||ref||, ||y - ref|| / ||ref - x||): see decompose.CurvePoint."""
    diff = torch.linalg.vector_norm((y - ref).double())
    return ((diff / torch.linalg.vector_norm(ref.double())).item(),
            (diff / torch.linalg.vector_norm((ref - x).double())).item())


def _bases(grams: dict[str, torch.Tensor], basis: str, rope_mode: str | None) -> dict[str, torch.Tensor]:
    """Spectra, bases and costs of one layer from its Grams ("k", "q", "v") and gradient Grams ("gk", "gv").

    The loss basis needs a separate down projection, which post mode cannot take for keys (one matrix serves
    keys and queries): there the key basis is the K+Q eigenbasis, ordered by cost."""
    out = {}
    joint_kq = rope_mode != "pre"
    for kind in "kv":
        gram, grad = grams[kind], grams["g" + kind]
        if basis == "loss" and not (kind == "k" and rope_mode == "post"):
            spectrum, down, up = loss_basis(gram, grad)
            out |= {f"eig_{kind}": spectrum, f"basis_{kind}": up, f"down_{kind}": down, f"cost_{kind}": spectrum}
            continue
        fitted = gram + grams["q"] if kind == "k" and joint_kq else gram
        spectrum, vectors = eigenbasis(fitted)
        cost = direction_costs(gram, grad, vectors)
        if basis == "loss":                    # post-mode keys: the cheapest directions last
            cost, order = cost.sort(-1, descending=True)
            vectors = torch.gather(vectors, -1, order[..., None, :].expand_as(vectors))
            spectrum = torch.gather(spectrum, -1, order)
        out |= {f"eig_{kind}": spectrum, f"basis_{kind}": vectors, f"down_{kind}": vectors, f"cost_{kind}": cost}
    return out


def _joined(x: torch.Tensor) -> torch.Tensor:
    """[B, H_kv, S, d] -> [B, 1, S, H_kv d]: a token's vectors of all KV heads as one."""
    return x.transpose(1, 2).flatten(2).unsqueeze(1)


def _loss_gradient(model: Decoder, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """d(mean next-token loss over all rows)/d(last hidden states x [N, L, D]), LOGIT_CHUNK positions of one row
    at a time: the head works per position, and a whole batch's logits would be the largest tensor of the pass."""
    n_predicted = ids[:, 1:].numel()
    grad = torch.zeros_like(x)
    for r in range(x.shape[0]):
        for start in range(0, x.shape[1] - 1, LOGIT_CHUNK):
            stop = min(start + LOGIT_CHUNK, x.shape[1] - 1)          # the last position predicts nothing
            with torch.enable_grad():
                part = x[r, start:stop].detach().requires_grad_(True)
                logits = model.head(part).float()
                loss = F.cross_entropy(logits, ids[r, start + 1:stop + 1], reduction="sum") / n_predicted
                grad[r, start:stop] = torch.autograd.grad(loss, part)[0]
    return grad


@torch.no_grad()
def calibrate(model: Decoder, calib_ids: torch.Tensor, rope_mode: str | None = "pre", basis: str = "loss",
              grad_samples: int | None = None, eps_grid=EPS_GRID, error_samples: int = 0, batch_size: int = 4,
              rank_multiple: int = 1, progress: bool = True, layer: Callable[[int], torch.nn.Module] | None = None,
              stored_dtype: torch.dtype | None = torch.bfloat16, rope_positions: int | None = None,
              activations: str | torch.device | None = None, joint_heads: bool = False) -> list[LayerCalibration]:
    """Bases, costs and (error_samples > 0) error curves for every layer of an uncompressed model on calib_ids
    [N, L].

    Two passes: forward, layer by layer, accumulating the Grams and keeping each layer's input; then backward
    from the loss, layer by layer (each layer recomputed from its input), accumulating the gradient Grams.
    grad_samples: the rows the backward pass runs on (default all; the curves use the first error_samples of
    them). Peak memory: every layer's input on those rows + one layer's weights and activations.
    stored_dtype: the layer inputs are kept in it where it is narrower than the activations (None: as they
    are): the gradients only weight the bases, and bf16 halves the largest memory of an fp32 calibration.
    layer(i): layer i, where the model does not hold it (loading.StreamedModel.block: read from disk, twice);
    default model.layers[i]. The model's head must be loaded (the loss needs it).
    rope_positions (post mode): the key and query statistics are averaged over the rotations of positions
    0 .. rope_positions-1 (decompose.rotation_average; default the model's max context), so the basis does not
    depend on the calibration length; 0: fitted to the rotated vectors of the calibration windows as they are.
    activations: where the kept layer inputs live (default: the model's device while they fit in
    ACTIVATION_SHARE of its free memory, else host memory; each layer's comes back to the device for its turn).
    joint_heads: one basis per layer over the H_kv x d features of all its KV heads (results shaped [1, H_kv d,
    ...]): what a fold with joint latents takes (`calibrate --latents joint`). Loss basis, pre or no RoPE, no
    error curves.
    """
    spec = model.spec
    rope = spec.positions == "rope"
    if rope and rope_mode not in ROPE_MODES:
        raise EigenExportError(f"rope_mode must be one of {ROPE_MODES} for a RoPE model, got {rope_mode!r}")
    if basis not in BASES:
        raise EigenExportError(f"basis must be one of {BASES}, got {basis!r}")
    rope_mode = rope_mode if rope else None
    if joint_heads and not joint_fittable(rope_mode, basis, error_samples):
        raise EigenExportError("joint_heads takes the loss basis, pre (or no) RoPE and no error curves")
    span = _rotation_span(model, rope_mode, rope_positions)
    fit_mode = "pre" if span else rope_mode      # averaged post: gather pre-RoPE statistics, rotate them after
    layer = layer or (lambda i: model.layers[i])
    device = next(model.parameters()).device
    calib_ids = calib_ids.to(device)
    data = LayerPass(model, calib_ids, batch_size, key_tables=rope)
    n_grad = calib_ids.shape[0] if grad_samples is None else max(1, min(grad_samples, calib_ids.shape[0]))
    n_err = min(error_samples, n_grad)
    d, h_kv, n_layers = spec.head_dim, spec.num_kv_heads, spec.num_layers
    kept_bytes = n_layers * data.x[:n_grad].numel() * _kept_dtype(data.dtype, stored_dtype).itemsize
    home = torch.device(activations) if activations is not None else activation_home(device, kept_bytes)
    # the paper's K+Q basis preserves q.k where keys and queries share it (the loss basis never reads it)
    joint_kq = rope_mode != "pre" and not joint_heads
    width, groups = (h_kv * d, 1) if joint_heads else (d, h_kv)
    fitted = _joined if joint_heads else (lambda x: x)        # the vectors one basis spans
    grams, inputs = [], []
    bar = tqdm(range(n_layers), desc="calibrate: forward", unit="layer", disable=not progress)
    for i in bar:
        acc = {name: torch.zeros(groups, width, width, dtype=torch.float64, device=device) for name in "kqv"}

        def accumulate(s, raw):
            q, k, v = fit_targets(model, raw["q"], raw["k"], raw["v"], data.ctx(s), fit_mode)
            _gram_update(acc["k"], fitted(k))
            _gram_update(acc["v"], fitted(v))
            if joint_kq:
                b, _, length_, _ = q.shape
                _gram_update(acc["q"], q.reshape(b, h_kv, spec.group_size, length_, d))

        inputs.append(_kept(data.x[:n_grad], stored_dtype).to(home))
        data.advance(data.forward(layer(i), accumulate))
        grams.append(acc)

    final, compute_dtype = data.x, data.dtype
    data.x = None                           # the pass keeps only its contexts (masks, rotary tables) now
    grad = _loss_gradient(model, final[:n_grad], calib_ids[:n_grad])
    del final
    results: list[LayerCalibration | None] = [None] * n_layers
    bar = tqdm(reversed(range(n_layers)), desc="calibrate: backward", unit="layer", total=n_layers,
               disable=not progress)
    for i in bar:
        block, x = layer(i), inputs[i].to(device, compute_dtype)
        acc = grams[i]
        acc["gk"], acc["gv"] = torch.zeros_like(acc["k"]), torch.zeros_like(acc["v"])
        for s in chunks(x.shape[0], batch_size):
            ctx = data.ctx(s)
            with torch.enable_grad():
                capture = Capture(block.attn)
                try:
                    x_in = x[s].detach().requires_grad_(True)
                    out = block(x_in, ctx)[0]
                finally:
                    capture.remove()
                raw = capture.outputs
                g_x, g_k, g_v = torch.autograd.grad(out, [x_in, raw["k"], raw["v"]], grad[s])
            _, g_k, g_v = fit_targets(model, None, g_k, g_v, ctx, fit_mode)
            _gram_update(acc["gk"], fitted(g_k))
            _gram_update(acc["gv"], fitted(g_v))
            grad[s] = g_x
        if span:
            acc |= _rotated_grams(model, acc, span)
        layer_cal = LayerCalibration(**{k: v.cpu() for k, v in _bases(acc, basis, rope_mode).items()})
        if n_err:
            layer_cal.curve = _curve(model, block, x[:n_err], layer_cal, rope_mode, eps_grid, rank_multiple,
                                     batch_size, data.ctx)
        results[i] = layer_cal
        inputs[i] = grams[i] = None                      # freed as the pass goes down
        bar.set_postfix(layer=i)
    return results


def activation_home(device: torch.device, kept_bytes: int, free_bytes: int | None = None) -> torch.device:
    """Where calibration keeps the layer inputs for its backward pass: on a GPU while they fit in ACTIVATION_SHARE
    of its free memory (free_bytes: measured when None), else in host memory (slower: each layer's inputs cross
    the bus once more, but a 66B model's 19 GB of them no longer compete with the weights)."""
    if device.type != "cuda":
        return device
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    if kept_bytes <= ACTIVATION_SHARE * free_bytes:
        return device
    log.info("[calibrate] the kept layer inputs (%.1f GB) exceed %.0f%% of the GPU's free %.1f GB: kept in host "
             "memory", kept_bytes / 1e9, 100 * ACTIVATION_SHARE, free_bytes / 1e9)
    return torch.device("cpu")


def _rotation_span(model: Decoder, rope_mode: str | None, rope_positions: int | None) -> int:
    """The positions post-mode statistics are averaged over (0: none, fit the calibration positions)."""
    if rope_mode != "post" or rope_positions == 0:
        return 0
    if rope_positions is not None and rope_positions < 0:
        raise EigenExportError(f"rope_positions must be >= 0 (0: the calibration positions), got {rope_positions}")
    span = rope_positions or model.spec.max_positions
    if span <= 0:
        raise EigenExportError("the model's config gives no max context: pass rope_positions (--rope-positions)")
    return span


def _rotated_grams(model: Decoder, acc: dict[str, torch.Tensor], span: int) -> dict[str, torch.Tensor]:
    """The pre-RoPE Grams of keys, queries and key gradients as post-RoPE Grams averaged over span positions.
    The attention factor scales rotated vectors, so gradients at them scale by its inverse."""
    spec, scale = model.spec, model.rope_scaling
    def rotated(gram, gain):
        return rotation_average(gram, model.inv_freq, spec.rope_dim, spec.rope_layout, span, gain)
    return {"k": rotated(acc["k"], scale), "q": rotated(acc["q"], scale), "gk": rotated(acc["gk"], 1 / scale)}


def _kept_dtype(dtype: torch.dtype, stored: torch.dtype | None) -> torch.dtype:
    """The dtype layer inputs of dtype are kept in: stored where that is narrower."""
    if stored is not None and dtype.is_floating_point and torch.finfo(stored).bits < torch.finfo(dtype).bits:
        return stored
    return dtype


def _kept(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A copy of x (a slice would keep the whole tensor alive), in dtype where that is narrower."""
    kept = _kept_dtype(x.dtype, dtype)
    return x.to(kept) if kept != x.dtype else x.clone()


def _curve(model: Decoder, block, x, layer: LayerCalibration, rope_mode, eps_grid, rank_multiple, batch_size,
           ctx_of) -> list[CurvePoint]:
    """The error of the block's output on x with each distinct candidate rank pair of the eps grid; ctx_of(batch):
    the attention context of a batch of x's rows (LayerPass.ctx)."""
    d = model.spec.head_dim
    slices = chunks(x.shape[0], batch_size)
    ctxs = [ctx_of(s) for s in slices]
    reference = torch.cat([block(x[s], c)[0] for s, c in zip(slices, ctxs)])
    layer_state = block.state_dict()
    tried, curve = {}, []
    for eps in eps_grid:
        ranks = LayerRanks(layer_rank(layer.eig_k, eps, rank_multiple), layer_rank(layer.eig_v, eps, rank_multiple))
        if ranks == LayerRanks(d, d):
            tried[ranks] = (0.0, 0.0)   # a full-rank fold is exact up to float error (tests/method/test_fold.py)
        if ranks not in tried:
            folded = fold_layer(layer_state, layer.basis_k[..., : ranks.k].to(x.dtype),
                                layer.basis_v[..., : ranks.v].to(x.dtype), model.spec, rope_mode,
                                layer.down_k[..., : ranks.k].to(x.dtype), layer.down_v[..., : ranks.v].to(x.dtype))
            candidate = model.make_block(ranks, rope_mode, folded)
            out = torch.cat([candidate(x[s], c)[0] for s, c in zip(slices, ctxs)])
            tried[ranks] = _errors(out, reference, x)
        curve.append(CurvePoint(eps, ranks.k, ranks.v, *tried[ranks]))
    return curve


def energy_summary(eig: torch.Tensor) -> dict:
    """Per layer, the rank (max over heads) holding 90 / 99 / 99.9 % of the energy: the spectra at a glance."""
    return {str(eps): layer_rank(eig, eps) for eps in (0.9, 0.99, 0.999)}
