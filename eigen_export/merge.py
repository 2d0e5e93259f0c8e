"""KV-head merging: MHA -> GQA from the eigenvectors of calibration caches (DESIGN 3.4; Yu et al. 2024, "SVD-a").

g consecutive KV heads (and the query heads that read them, as HF's repeat_kv maps them) become one KV head.
Per layer and group, a merge is a pair of maps over the group's concatenated cache [k_1; ..; k_g] (g*d wide):
  down [g*d, d]  the merged head caches k' = down^T [k_1; ..; k_g]
  up   [g*d, d]  head j is read back as k_j ~ up_j k'   (up_j = rows j*d:(j+1)*d)
- SVD merge: down = up = Psi, the top-d eigenvectors of the group cache Gram: the best rank-d fit of the cache.
- Mean pool (Ainslie et al. 2023, the baseline): down = [I/g; ..; I/g], up_j = I.
Folded into the weights (query head q reads old KV head j of new group n):
  W_K' = down_k^T W_K[group],  W_Q'[q] = up_k,j^T W_Q[q];  W_V' = down_v^T W_V[group],  W_O'[:, q] = W_O[:, q] up_v,j
Biases follow their rows. Values carry no position scheme, so the value fold is exact whenever the group cache
lies in span(Psi_v). Under RoPE the key fold is valid only if every up_j commutes with every rotation: per
frequency pair a 2x2 block [[a, -b], [b, a]] (a complex scalar), found by a complex PCA per frequency across the
group's heads; non-rotary dims of partial-rotary models get an ordinary real PCA. An unconstrained key fold under
RoPE is worse than mean pooling (DESIGN 3.4) and is never built here.

The result is a plain GQA model with the same head_dim and softmax scale. Families whose transformers config
knows num_key_value_heads (adapter.from_canonical) get a standard HF checkpoint; the others an eigen_export
artifact at full rank whose manifest carries the head count.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .artifacts import atomic_dir
from .errors import EigenExportError
from .families import ModelSpec, get_adapter

log = logging.getLogger("eigen_export")

METHODS = ("svd", "mean")
MERGE_JSON = "merge.json"
MERGE_FORMAT = "eigen_export.merge"
MERGE_VERSION = 1


# -- head counts ---------------------------------------------------------------------------------------------

def valid_kv_heads(spec: ModelSpec) -> list[int]:
    """Targets that merge whole groups of existing KV heads: proper divisors of the current KV head count."""
    return [n for n in range(1, spec.num_kv_heads) if spec.num_kv_heads % n == 0]


def check_kv_heads(spec: ModelSpec, kv_heads: int) -> None:
    valid = valid_kv_heads(spec)
    have = f"{spec.num_heads} query heads / {spec.num_kv_heads} KV heads"
    if not valid:
        raise EigenExportError(f"the model has {have}: a single KV head cannot be merged further")
    if kv_heads == spec.num_kv_heads:
        raise EigenExportError(f"the model already has {kv_heads} KV heads ({have}): choose --kv-heads from {valid}")
    if kv_heads not in valid:
        raise EigenExportError(f"--kv-heads {kv_heads} does not merge whole groups of a model with {have}: "
                               f"choose one of {valid}")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise EigenExportError(f"--merge-method {method!r} is unknown: choose one of {', '.join(METHODS)}")


# -- pure math: group maps ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupMap:
    down: torch.Tensor    # [N, g*d, d] float64: k' = down^T k_group
    up: torch.Tensor      # [N, g*d, d] float64: k_j ~ up[j*d:(j+1)*d] k'

    @property
    def group(self) -> int:
        return self.down.shape[1] // self.down.shape[2]


def _top_eigenvectors(gram: torch.Tensor, r: int) -> torch.Tensor:
    """Top-r eigenvectors (columns) of symmetric/Hermitian [..., n, n] matrices."""
    gram = 0.5 * (gram + gram.transpose(-1, -2).conj())
    _, vectors = torch.linalg.eigh(gram)                               # ascending
    return vectors[..., -r:].flip(-1)


def pca_map(gram: torch.Tensor, head_dim: int) -> GroupMap:
    """SVD merge without position constraints: Psi = top-d eigenvectors of each group Gram [N, g*d, g*d]."""
    psi = _top_eigenvectors(gram.double(), head_dim)
    return GroupMap(psi, psi)


def mean_map(num_groups: int, group: int, head_dim: int) -> GroupMap:
    eye = torch.eye(head_dim, dtype=torch.float64)
    up = eye.repeat(group, 1).expand(num_groups, -1, -1).clone()       # [N, g*d, d]
    return GroupMap(up / group, up)


def rope_pairs(rope_dim: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (x, y) of each frequency pair within a head; RoPE turns x + iy by the pair's angle."""
    if layout == "half":
        first = torch.arange(rope_dim // 2)
        return first, first + rope_dim // 2
    if layout == "interleaved":
        first = torch.arange(0, rope_dim, 2)
        return first, first + 1
    raise ValueError(f"rope layout must be 'half' or 'interleaved', got {layout!r}")


def complex_gram(gram: torch.Tensor, x_idx: torch.Tensor, y_idx: torch.Tensor) -> torch.Tensor:
    """sum z z^H with z_j = k[x_j] + i k[y_j], from the real Gram [..., n, n]; x_idx, y_idx [F, g] -> [..., F, g, g].

    Rotation multiplies every z_j of a frequency by the same unit scalar, so this Gram is the same before and
    after RoPE at any position.
    """
    def block(a, b):
        return gram[..., a[:, :, None], b[:, None, :]]
    return torch.complex(block(x_idx, x_idx) + block(y_idx, y_idx), block(y_idx, x_idx) - block(x_idx, y_idx))


def rope_pca_map(gram: torch.Tensor, head_dim: int, rope_dim: int, layout: str) -> GroupMap:
    """The best rank-d key fold that commutes with RoPE, for group Grams [N, g*d, g*d] of pre-RoPE keys.

    Per frequency pair the merged head keeps one complex component z' = u^H z, u the top eigenvector of the
    group's complex Gram; head j reads back u_j z', i.e. the 2x2 block M(u_j) = [[Re, -Im], [Im, Re]], which
    commutes with the pair's rotation. Non-rotary dims get an ordinary real PCA among themselves.
    """
    gram = gram.double()
    n, width, _ = gram.shape
    g, d = width // head_dim, head_dim
    offsets = torch.arange(g)[None, :] * d                            # head j's dims start at j*d
    x, y = rope_pairs(rope_dim, layout)
    x_idx, y_idx = x[:, None] + offsets, y[:, None] + offsets         # [F, g]
    u = _top_eigenvectors(complex_gram(gram, x_idx, y_idx), 1)[..., 0]   # [N, F, g]
    psi = torch.zeros(n, width, d, dtype=torch.float64)
    a, b = u.real, u.imag
    groups = torch.arange(n)[:, None, None]
    psi[groups, x_idx, x[:, None]] = a                                # M(u_j) rows (x, y), cols (x, y)
    psi[groups, x_idx, y[:, None]] = -b
    psi[groups, y_idx, x[:, None]] = b
    psi[groups, y_idx, y[:, None]] = a
    if rope_dim < d:
        plain = torch.arange(rope_dim, d)
        idx = (plain[None, :] + offsets.T).reshape(-1)                # head-major, as the group cache is laid out
        vectors = _top_eigenvectors(gram[:, idx[:, None], idx[None, :]], d - rope_dim)
        psi[torch.arange(n)[:, None, None], idx[None, :, None], plain[None, None, :]] = vectors
    return GroupMap(psi, psi)


def relative_residual(gram: torch.Tensor, m: GroupMap) -> float:
    """||C - A C|| / ||C|| over all groups of a layer, A = up down^T, from the Grams C^T C [N, g*d, g*d]."""
    gram = gram.double()
    a = m.up @ m.down.transpose(-1, -2)
    rest = torch.eye(a.shape[-1], dtype=torch.float64) - a
    residual = torch.einsum("nij,njk,nik->", rest, gram, rest)        # tr(R G R^T)
    total = torch.diagonal(gram, dim1=-2, dim2=-1).sum()
    return float((residual.clamp(min=0) / total).sqrt()) if total > 0 else 0.0


def group_maps(gram_k: torch.Tensor, gram_v: torch.Tensor, spec: ModelSpec, method: str) -> tuple[GroupMap, GroupMap]:
    """(key map, value map) of one layer; the key fold is chosen by the position scheme."""
    d = spec.head_dim
    if method == "mean":
        m = mean_map(gram_k.shape[0], gram_k.shape[1] // d, d)
        return m, m
    if spec.positions == "rope":
        key = rope_pca_map(gram_k, d, spec.rope_dim, spec.rope_layout)
    else:
        key = pca_map(gram_k, d)
    return key, pca_map(gram_v, d)


# -- pure math: the fold --------------------------------------------------------------------------------------

def _per_query_head(up: torch.Tensor, spec: ModelSpec, kv_heads: int) -> torch.Tensor:
    """up_j for every query head: [H, d, d]; query head q reads old KV head q // s, which is head j of its group."""
    d, g = spec.head_dim, spec.num_kv_heads // kv_heads
    q = torch.arange(spec.num_heads)
    old = q // spec.group_size
    return up.reshape(kv_heads, g, d, d)[old // g, old % g]


def merge_layer(weights: dict[str, torch.Tensor], key: GroupMap, value: GroupMap, spec: ModelSpec,
                kv_heads: int) -> dict[str, torch.Tensor]:
    """Merge one layer's KV heads. `weights` uses in-layer canonical names ("attn.q.weight", ...)."""
    out = dict(weights)
    h, d = spec.num_heads, spec.head_dim
    for part in ("weight", "bias"):
        for name, m in (("k", key), ("v", value)):
            w = weights.get(f"attn.{name}.{part}")
            if w is not None:
                grouped = w.double().reshape(kv_heads, -1, *w.shape[1:])          # [N, g*d, (D)]
                out[f"attn.{name}.{part}"] = torch.einsum("nir,ni...->nr...", m.down, grouped).reshape(
                    kv_heads * d, *w.shape[1:])
        w = weights.get(f"attn.q.{part}")
        if w is not None:
            up = _per_query_head(key.up, spec, kv_heads)                          # [H, d, d]
            heads = w.double().reshape(h, d, *w.shape[1:])
            out[f"attn.q.{part}"] = torch.einsum("hir,hi...->hr...", up, heads).reshape(w.shape)
    o = weights["attn.o.weight"].double()
    up_v = _per_query_head(value.up, spec, kv_heads)
    out["attn.o.weight"] = torch.einsum("Dhi,hir->Dhr", o.reshape(o.shape[0], h, d), up_v).reshape(o.shape)
    dtype = weights["attn.o.weight"].dtype
    return {k: v.to(dtype) for k, v in out.items()}


def merge_state(state: dict[str, torch.Tensor], grams: list[tuple[torch.Tensor, torch.Tensor]], spec: ModelSpec,
                kv_heads: int, method: str) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Merged canonical state dict and per-layer relative errors of the group caches (keys, values)."""
    check_kv_heads(spec, kv_heads)
    check_method(method)
    merged = {k: v for k, v in state.items() if not k.startswith("layers.")}
    errors = []
    for i, (gram_k, gram_v) in enumerate(grams):
        prefix = f"layers.{i}."
        key, value = group_maps(gram_k, gram_v, spec, method)
        layer = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        merged |= {prefix + k: v for k, v in merge_layer(layer, key, value, spec, kv_heads).items()}
        errors.append({"key": round(relative_residual(gram_k, key), 6),
                       "value": round(relative_residual(gram_v, value), 6)})
    return merged, errors


# -- calibration: streaming group Grams -----------------------------------------------------------------------

def _group_gram_update(gram: torch.Tensor, x: torch.Tensor) -> None:
    """gram[n] += C^T C for the group cache C of new head n; x [B, H_kv, S, d]."""
    b, h_kv, s, d = x.shape
    n = gram.shape[0]
    grouped = x.double().reshape(b, n, h_kv // n, s, d).permute(0, 1, 3, 2, 4).reshape(b, n, s, -1)  # [B, N, S, g*d]
    gram += torch.einsum("bnsi,bnsj->nij", grouped, grouped)


@torch.no_grad()
def group_grams(model, calib_ids: torch.Tensor, kv_heads: int, batch_size: int = 4,
                progress: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer the float64 Grams [N, g*d, g*d] of each new group's pre-RoPE key and value caches.

    Layer i sees the outputs of the ORIGINAL layers 0..i-1 (as calibrate does). Pre-RoPE keys suffice: the
    RoPE-commuting fold needs only rotation-invariant statistics of them.
    """
    from .calibrate import layer_projections

    spec = model.spec
    check_kv_heads(spec, kv_heads)
    device = next(model.parameters()).device
    n, length = calib_ids.shape
    calib_ids = calib_ids.to(device)
    positions = torch.arange(length, device=device).expand(n, length)
    mask = torch.ones(n, length, dtype=torch.long, device=device)
    batches = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    x = torch.cat([model.embed_tokens(calib_ids[s], positions[s]) for s in batches])      # [N, L, D]
    contexts = {}

    def ctx(s):
        size = s.stop - s.start
        if size not in contexts:
            contexts[size] = model.context(mask[s], positions[s], x.dtype)
        return contexts[size]

    width = spec.num_kv_heads // kv_heads * spec.head_dim
    grams = []
    for block in tqdm(model.layers, desc="merge-heads", unit="layer", disable=not progress):
        gram_k = torch.zeros(kv_heads, width, width, dtype=torch.float64, device=device)
        gram_v = torch.zeros_like(gram_k)
        for s in batches:
            _, k, v = layer_projections(model, block, x[s], ctx(s), "pre")
            _group_gram_update(gram_k, k)
            _group_gram_update(gram_v, v)
        grams.append((gram_k.cpu(), gram_v.cpu()))
        x = torch.cat([block(x[s], ctx(s))[0] for s in batches])                          # propagate
    return grams


# -- artifacts ------------------------------------------------------------------------------------------------

def read_merge_record(path: str | Path) -> dict | None:
    """The merge record of a merged model directory (merge.json, or eigen.json's extra), None if not merged."""
    from .fold import MANIFEST
    from .manifest import Manifest

    path = Path(str(path))
    if (path / MERGE_JSON).is_file():
        return json.loads((path / MERGE_JSON).read_text())
    if (path / MANIFEST).is_file():
        return Manifest.read(path / MANIFEST).extra.get("merge")
    return None


def write_merged(out_dir: Path, hf_config, spec: ModelSpec, state: dict[str, torch.Tensor], record: dict,
                 source: str | Path | None = None, dtype: str = "float32", force: bool = False) -> Path:
    """A stock GQA checkpoint where the family's HF config can say so, else a full-rank eigen_export artifact."""
    from safetensors.torch import save_file

    from .fold import WEIGHTS, _copy_tokenizer, write_folded
    from .loading import resolve_dtype

    adapter = get_adapter(hf_config.model_type)
    state = {k: v.to(resolve_dtype(dtype)).contiguous() for k, v in state.items()}
    if adapter.from_canonical is None:
        fields = dict(
            model_type=hf_config.model_type, family=spec.family, source=record["source"], rope_mode=None,
            num_layers=spec.num_layers, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim, softmax_scale=spec.softmax_scale,
            ranks=[[spec.head_dim, spec.head_dim]] * spec.num_layers,
            # fraction of the source's cache, as for a fold
            kv_ratio=round(spec.num_kv_heads / record["kv_heads_before"], 6),
            # no block-output error is measured for a merge: the worse of the two cache errors stands in
            layer_errors=[max(e["key"], e["value"]) for e in record["layers"]],
            calibration={k: record.get(k) for k in ("dataset", "nsamples", "seqlen", "seed")},
            dtype=dtype, extra={"merge": record})
        write_folded(Path(out_dir), hf_config, state, fields, tokenizer_source=source, force=force)
        return Path(out_dir)
    config = copy.deepcopy(hf_config)
    config.num_key_value_heads = spec.num_kv_heads
    config.dtype = resolve_dtype(dtype)
    with atomic_dir(out_dir, force=force) as tmp:
        config.save_pretrained(tmp)
        save_file(adapter.from_canonical(state, spec), str(tmp / WEIGHTS), metadata={"format": "pt"})
        if source is not None:
            _copy_tokenizer(source, tmp)
            generation = Path(str(source)) / "generation_config.json"
            if generation.is_file():
                (tmp / generation.name).write_bytes(generation.read_bytes())
        (tmp / MERGE_JSON).write_text(json.dumps(record, indent=1) + "\n")      # last: marks completion
    return Path(out_dir)


def merge_record(source, model_type: str, spec: ModelSpec, kv_heads: int, method: str, errors: list[dict],
                 **calibration) -> dict:
    if method == "mean":
        key_fold = "mean-pool"
    else:
        key_fold = "rope-commuting complex PCA" if spec.positions == "rope" else "PCA"
    return {"format": MERGE_FORMAT, "version": MERGE_VERSION, "source": str(source), "model_type": model_type,
            "method": method, "key_fold": key_fold, "num_heads": spec.num_heads,
            "kv_heads_before": spec.num_kv_heads, "kv_heads": kv_heads, **calibration,
            "error": "relative Frobenius error of each layer's group caches on the calibration text",
            "layers": errors}


def run_merge(source: str | Path, out_dir: str | Path, kv_heads: int, method: str = "svd", dataset: str = "ptb",
              nsamples: int = 32, seqlen: int = 512, seed: int = 0, batch_size: int = 4, dtype: str = "float32",
              device: str = "cpu", force: bool = False, progress: bool = True) -> dict:
    """CLI `merge-heads`: calibrate the group caches, merge KV heads to `kv_heads`, write the merged model.

    Returns the merge record (also written as merge.json, or into the artifact's manifest).
    """
    from transformers import AutoTokenizer

    from .data import calibration_batch
    from .families import spec_from_config
    from .fold import MANIFEST
    from .loading import load_hf, load_hf_config

    check_method(method)
    started = time.perf_counter()
    if not (Path(str(source)) / MANIFEST).is_file():          # fail before loading gigabytes
        check_kv_heads(spec_from_config(load_hf_config(source)), kv_heads)
    config, model = load_hf(source, dtype="float32", device=device)
    spec = model.spec
    check_kv_heads(spec, kv_heads)
    if Path(out_dir).exists() and not force:
        raise EigenExportError(f"{out_dir} already exists: pass --force to replace it or choose another --out")
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    ids = calibration_batch(tokenizer, dataset, nsamples, seqlen, seed)
    grams = group_grams(model, ids, kv_heads, batch_size=batch_size, progress=progress)
    state, errors = merge_state(model.state_dict(), grams, spec, kv_heads, method)
    record = merge_record(source, config.model_type, spec, kv_heads, method, errors, dataset=dataset,
                          nsamples=nsamples, seqlen=seqlen, seed=seed,
                          wall_time_s=round(time.perf_counter() - started, 2))
    write_merged(Path(out_dir), config, spec.replace(num_kv_heads=kv_heads), state, record, source=source,
                 dtype=dtype, force=force)
    log.info("merged %s: %d -> %d KV heads (%s), mean relative cache error K %.4f V %.4f", source,
             spec.num_kv_heads, kv_heads, method, *(sum(e[p] for e in errors) / len(errors) for p in ("key", "value")))
    return record
