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

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import EigenExportError
from ..families import ModelSpec
from .calibrate import fit_targets
from .capture import LayerPass

METHODS = ("svd", "mean")


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
    spec = model.spec
    check_kv_heads(spec, kv_heads)
    device = next(model.parameters()).device
    data = LayerPass(model, calib_ids, batch_size)
    width = spec.num_kv_heads // kv_heads * spec.head_dim
    grams = []
    for block in tqdm(model.layers, desc="merge-heads", unit="layer", disable=not progress):
        gram_k = torch.zeros(kv_heads, width, width, dtype=torch.float64, device=device)
        gram_v = torch.zeros_like(gram_k)

        def accumulate(s, raw):
            _, k, v = fit_targets(model, raw["q"], raw["k"], raw["v"], data.ctx(s), "pre")
            _group_gram_update(gram_k, k)
            _group_gram_update(gram_v, v)

        data.advance(data.forward(block, accumulate))
        grams.append((gram_k.cpu(), gram_v.cpu()))
    return grams


def merge_record(source, model_type: str, spec: ModelSpec, kv_heads: int, method: str, errors: list[dict],
                 **calibration) -> dict:
    """What a merge did, for merge.json (or the artifact's manifest): method, head counts, cache errors."""
    if method == "mean":
        key_fold = "mean-pool"
    else:
        key_fold = "rope-commuting complex PCA" if spec.positions == "rope" else "PCA"
    return {"source": str(source), "model_type": model_type,
            "method": method, "key_fold": key_fold, "num_heads": spec.num_heads,
            "kv_heads_before": spec.num_kv_heads, "kv_heads": kv_heads, **calibration,
            "error": "relative Frobenius error of each layer's group caches on the calibration text",
            "layers": errors}
