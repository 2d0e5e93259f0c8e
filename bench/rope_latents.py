"""Issue 14 (a) against `pre`, in perplexity: keys compressed by RoPE-commuting latents or by per-head bases.

    .venv/bin/python bench/rope_latents.py --window-step 4          # a look (~4 min a job, 1 core each)
    .venv/bin/python bench/rope_latents.py                          # every window

rope_energy.py ranked the families by key energy; energy is not loss, so this measures perplexity. Both families
are projections of the pre-RoPE keys, k -> P k, folded into W_K (and b_K) of the uncompressed SmolLM2-135M, the
values untouched, so the key treatment is the only difference between rows:
  pre      P block-diagonal per KV head, onto the head's top eigenvectors: what `pre` mode caches and rebuilds
  planes   per frequency plane, complex components mixing that plane across the layer's KV heads: P commutes
           with RoPE, so a cache of these components, turned on the latent, is exact at every position and read
           as it is (candidate (a))
and the statistics the bases are fitted to:
  energy   the Gram of the keys
  query    the keys weighted per head and frequency plane by the energy of the queries that read them
           (E|q.k error|^2 ~ E|q_plane|^2 E|k_plane error|^2 once positions are averaged): whiten, project, unwhiten
  loss     (pre only) the loss bases `eigen-export calibrate` fits today (decompose.loss_basis: key Gram whitened by
           the loss gradient's Gram), with their costs
The key budget (a fraction of the key numbers of all layers) is spread over the layers by the same statistic,
greedily (a complex component holds two numbers). Calibration: the `eigen-export calibrate` text (32 x 512 PTB
train); evaluation: every --window-step-th 512-token window of PTB test and of the Python language reference.
Writes bench/results/rope-latents-<host>.json, rewritten after every finished job.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.kv_accuracy import DEFAULT_TEXTS, TEXTS, token_ids, windows_of  # noqa: E402
from bench.rope_modes import run_jobs, write  # noqa: E402
from eigen_export.machine import git_commit, machine  # noqa: E402

FAMILIES = ("pre", "planes")
STATISTICS = ("energy", "query", "loss")
FRACTIONS = (0.4, 0.5, 0.6)
SEQLEN = 512


def key_statistics(source: str) -> dict:
    """Per layer: the Gram of the pre-RoPE keys across the layer's KV heads [H_kv*d, H_kv*d] and the query energy
    per KV head and frequency plane [H_kv, d/2] (summed over the query heads of its group), float64."""
    import eigen_export
    from eigen_export.data import calibration_batch
    from eigen_export.loading import load_tokenizer
    from eigen_export.method.calibrate import calibrate
    from eigen_export.method.capture import LayerPass
    from eigen_export.settings import CalibrationSettings

    s = CalibrationSettings()
    model = eigen_export.load(source)
    spec = model.spec
    if spec.rope_layout != "half" or spec.rope_dim != spec.head_dim:
        sys.exit("this bench reads planes in the `half` layout with full rotary dims")
    d, heads, half = spec.head_dim, spec.num_kv_heads, spec.head_dim // 2
    data_ids = calibration_batch(load_tokenizer(source), s.dataset, s.nsamples, s.seqlen, s.seed)
    data = LayerPass(model, data_ids, s.batch_size)
    grams, queries = [], []
    with torch.no_grad():
        for block in model.layers:
            gram = torch.zeros(heads * d, heads * d, dtype=torch.float64)
            query = torch.zeros(spec.num_heads, half, dtype=torch.float64)

            def gather(_, raw):
                k = raw["k"].double().reshape(-1, heads * d)
                gram.add_(k.T @ k)
                q2 = raw["q"].double().reshape(-1, spec.num_heads, d).square().sum(0)
                query.add_(q2[:, :half] + q2[:, half:])

            data.advance(data.forward(block, gather))
            grams.append(gram)
            queries.append(query.reshape(heads, spec.group_size, half).sum(1))
    layers = calibrate(eigen_export.load(source), data_ids, "pre", s.basis, s.grad_samples, progress=False)
    return {"grams": grams, "queries": queries, "settings": f"{s.nsamples} x {s.seqlen} {s.dataset} train",
            "loss": [(c.eig_k, c.down_k, c.basis_k) for c in layers]}


def plane_weights(query: torch.Tensor, statistic: str) -> torch.Tensor:
    """[H_kv, d/2] factors each key coordinate of a plane is scaled by before its basis is fitted."""
    return query.sqrt() if statistic == "query" else torch.ones_like(query)


def per_head_candidates(gram: torch.Tensor, weight: torch.Tensor):
    """pre: (eigenvalues [H_kv, d], eigenvectors [H_kv, d, d] descending) of each head's weighted Gram."""
    heads, half = weight.shape
    d = 2 * half
    w = torch.cat([weight, weight], 1)                                             # [H_kv, d] (half layout)
    blocks = torch.stack([gram[h * d:(h + 1) * d, h * d:(h + 1) * d] for h in range(heads)])
    vals, vecs = torch.linalg.eigh(w[:, :, None] * blocks * w[:, None, :])
    return vals.flip(-1), vecs.flip(-1)


def plane_candidates(gram: torch.Tensor, weight: torch.Tensor):
    """planes: (eigenvalues [d/2, H_kv], eigenvectors [d/2, H_kv, H_kv] complex, descending) of the weighted
    E[z z^H] per plane, z_h = k_h[i] + j k_h[i + d/2] (RoPE turns every head's z of plane i by one phase)."""
    heads, half = weight.shape
    d = 2 * half
    g = gram.reshape(heads, d, heads, d)
    first, second = slice(0, half), slice(half, d)
    real = g[:, first, :, first] + g[:, second, :, second]
    imag = g[:, second, :, first] - g[:, first, :, second]
    per_plane = torch.complex(real, imag).diagonal(dim1=1, dim2=3).permute(2, 0, 1)   # [d/2, H_kv, H_kv]
    w = weight.T                                                                    # [d/2, H_kv]
    vals, vecs = torch.linalg.eigh(w[:, :, None] * per_plane * w[:, None, :])
    return vals.flip(-1), vecs.flip(-1)


def budgets(values: list[torch.Tensor], cost: int, total: int) -> list[int]:
    """How many components each layer keeps: the largest eigenvalues over all layers, `cost` numbers each, until
    `total` numbers are spent."""
    flat = torch.cat([v.flatten() / cost for v in values])
    owner = torch.cat([torch.full((v.numel(),), i) for i, v in enumerate(values)])
    keep = owner[flat.argsort(descending=True)[: total // cost]]
    return [int((keep == i).sum()) for i in range(len(values))]


def projection(family: str, weight: torch.Tensor, keep: int, candidates) -> torch.Tensor:
    """Real P [H_kv*d, H_kv*d] on the stacked pre-RoPE keys: whiten, keep the layer's `keep` largest components,
    unwhiten (loss candidates: (costs, down, up), P = up_r down_r^T per head)."""
    heads, half = weight.shape
    d = 2 * half
    vals, vecs = candidates[:2]
    chosen = torch.zeros_like(vals, dtype=torch.bool).flatten()
    chosen[vals.flatten().argsort(descending=True)[:keep]] = True
    chosen = chosen.view_as(vals)
    p = torch.zeros(heads * d, heads * d, dtype=torch.float64)
    if len(candidates) == 3:
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            p[sl, sl] = candidates[2][h][:, chosen[h]].double() @ vecs[h][:, chosen[h]].double().T
        return p
    if family == "pre":
        w = torch.cat([weight, weight], 1)
        for h in range(heads):
            u = vecs[h][:, chosen[h]]
            sl = slice(h * d, (h + 1) * d)
            p[sl, sl] = (u @ u.T) / w[h][:, None] * w[h][None, :]
        return p
    for i in range(half):
        e = vecs[i][:, chosen[i]]
        m = (e @ e.conj().T) / weight[:, i][:, None] * weight[:, i][None, :]       # complex [H_kv, H_kv]
        x = torch.arange(heads) * d + i                                             # each head's x and y rows
        y = x + half
        p[x[:, None], x[None, :]] = m.real
        p[x[:, None], y[None, :]] = -m.imag
        p[y[:, None], x[None, :]] = m.imag
        p[y[:, None], y[None, :]] = m.real
    return p


def run_job(job: str, source: str, work: str, step: int, names: list[str]) -> dict:
    from transformers import AutoTokenizer

    import eigen_export
    from eigen_export.backends import TorchBackend, perplexity

    torch.set_num_threads(1)
    model = eigen_export.load(source).eval()
    row = {"job": job}
    if job != "baseline":
        family, statistic, fraction = job.split(":")
        stats = torch.load(Path(work) / "key-statistics.pt")
        weights = [plane_weights(q, statistic) for q in stats["queries"]]
        if statistic == "loss":
            if family != "pre":
                raise ValueError("loss bases exist for the pre family only")
            candidates = [tuple(t.double() for t in c) for c in stats["loss"]]
        else:
            candidates = [(per_head_candidates if family == "pre" else plane_candidates)(g, w)
                          for g, w in zip(stats["grams"], weights)]
        spec = model.spec
        per_layer = spec.num_kv_heads * spec.head_dim
        cost = 1 if family == "pre" else 2
        keep = budgets([c[0] for c in candidates], cost, int(float(fraction) * per_layer * len(candidates)))
        with torch.no_grad():
            for block, w, k, c in zip(model.layers, weights, keep, candidates):
                p = projection(family, w, k, c)
                lin = block.attn.k
                lin.weight.copy_((p @ lin.weight.double()).float())
                if lin.bias is not None:
                    lin.bias.copy_((p @ lin.bias.double()).float())
        row |= {"family": family, "statistic": statistic, "key_fraction": float(fraction),
                "key_numbers_per_layer": [k * cost for k in keep]}
    started = time.perf_counter()
    for name, ids in token_ids(AutoTokenizer.from_pretrained(source), names).items():
        windows = windows_of(ids, step, SEQLEN)
        row[f"ppl_{name}_{SEQLEN}"] = perplexity(TorchBackend(model), windows, batch_size=4)
        row[f"windows_{name}_{SEQLEN}"] = int(windows.shape[0])
    row["eval_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps({k: v for k, v in row.items() if k != "key_numbers_per_layer"}), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", default=["baseline"] + [f"{f}:{s}:{r}" for r in FRACTIONS for f in FAMILIES
                                                                      for s in STATISTICS if f == "pre" or s != "loss"],
                        help="baseline and/or family:statistic:key_fraction")
    parser.add_argument("--texts", nargs="+", default=list(DEFAULT_TEXTS), choices=list(TEXTS))
    parser.add_argument("--window-step", type=int, default=1, help="every n-th window (default 1: all of them)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default=str(ROOT / "build" / "bench-rope-latents"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from eigen_export.assets import smollm2_dir

    torch.set_num_threads(1)
    source, work = str(smollm2_dir()), Path(args.work)
    out = Path(args.out or ROOT / "bench" / "results" / f"rope-latents-{platform.node() or 'host'}.json")
    stats_path = work / "key-statistics.pt"
    if not stats_path.exists():
        work.mkdir(parents=True, exist_ok=True)
        torch.save(key_statistics(source), stats_path.with_suffix(".tmp"))
        stats_path.with_suffix(".tmp").replace(stats_path)
    record = {"command": " ".join([sys.executable, *sys.argv]), "git_commit": git_commit(), "machine": machine(),
              "python": sys.version.split()[0], "settings": vars(args) | {"seqlen": SEQLEN},
              "model": "SmolLM2-135M-Instruct (dequantised Q4_1 GGUF, fp32)",
              "calibration": torch.load(stats_path)["settings"], "rows": []}
    run_jobs(run_job, args, source, work, record, out)


if __name__ == "__main__":
    main()
