"""How much key energy each RoPE treatment can keep per cached key number, on SmolLM2-135M (issue 14's candidates).

    .venv/bin/python bench/rope_energy.py          # a forward pass over the default calibration (minutes, 1 core)

A cheap ceiling before building a cache layout: the share of the pre-RoPE key energy (sum over layers, heads,
tokens of |k|^2 of the default calibration text) that the best rank-r projection of each family keeps, with r a
fraction of head_dim per KV head. Energy is not loss (the loss bases weight it by the loss gradient), so read
it as the ordering of the families, not as perplexity:
  pre                 per-head eigenbasis of the pre-RoPE keys (exact at every position: keys rebuilt, then turned)
  post_averaged       per-head eigenbasis of the keys turned to every position below the max context (`post`)
  planes_per_head     whole frequency planes per head (commutes with RoPE: exact, the cache read as it is)
  planes_across_heads per frequency, complex components mixing that plane across the layer's KV heads (candidate
                      (a) of issue 14: exact and read as it is, but the layer's heads share one latent)
Writes bench/results/rope-energy-<host>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from eigen_export.machine import git_commit, machine  # noqa: E402

FRACTIONS = (0.4, 0.5, 0.6, 0.75)


def plane_spectra(joint: torch.Tensor, heads: int, d: int) -> torch.Tensor:
    """[d/2, heads] descending energies of the complex components per frequency plane (`half` layout), from the
    Gram of a layer's keys across its KV heads [heads*d, heads*d]: z_h = k_h[i] + j k_h[i + d/2] turns by one
    phase for every head, so per plane the best components are the eigenvectors of E[z z^H] (heads x heads)."""
    half = d // 2
    g = joint.reshape(heads, d, heads, d)
    first, second = slice(0, half), slice(half, d)
    real = g[:, first, :, first] + g[:, second, :, second]
    imag = g[:, second, :, first] - g[:, first, :, second]
    per_plane = torch.complex(real, imag).diagonal(dim1=1, dim2=3).permute(2, 0, 1)     # [d/2, heads, heads]
    return torch.linalg.eigvalsh(per_plane).flip(-1).clamp(min=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import eigen_export
    from eigen_export.assets import smollm2_dir
    from eigen_export.data import calibration_batch
    from eigen_export.loading import load_tokenizer
    from eigen_export.method.capture import LayerPass
    from eigen_export.method.decompose import eigenbasis, rotation_average
    from eigen_export.settings import CalibrationSettings

    torch.set_num_threads(1)
    source, s = str(smollm2_dir()), CalibrationSettings()
    model = eigen_export.load(source)
    spec = model.spec
    if spec.rope_layout != "half" or spec.rope_dim != spec.head_dim:
        sys.exit("this bench reads planes in the `half` layout with full rotary dims")
    ids = calibration_batch(load_tokenizer(source), s.dataset, s.nsamples, s.seqlen, s.seed)
    data = LayerPass(model, ids, s.batch_size)
    d, heads, half = spec.head_dim, spec.num_kv_heads, spec.head_dim // 2
    kept = {f: dict.fromkeys(("pre", "post_averaged", "planes_per_head", "planes_across_heads"), 0.0)
            for f in FRACTIONS}
    total = 0.0
    with torch.no_grad():
        for block in model.layers:
            joint = torch.zeros(heads * d, heads * d, dtype=torch.float64)

            def gather(_, raw):
                k = raw["k"].double().reshape(-1, heads * d)
                joint.add_(k.T @ k)

            data.advance(data.forward(block, gather))
            per_head = torch.stack([joint[h * d:(h + 1) * d, h * d:(h + 1) * d] for h in range(heads)])
            diag = per_head.diagonal(dim1=-2, dim2=-1)
            total += diag.sum().item()
            spectra = {"pre": eigenbasis(per_head)[0],
                       "post_averaged": eigenbasis(rotation_average(per_head, model.inv_freq, spec.rope_dim,
                                                                    spec.rope_layout, spec.max_positions))[0]}
            planes = (diag[:, :half] + diag[:, half:]).sort(-1, descending=True)[0]
            across = plane_spectra(joint, heads, d).flatten().sort(descending=True)[0]
            for f in FRACTIONS:
                r = round(f * d)
                for name, spectrum in spectra.items():
                    kept[f][name] += spectrum[:, :r].sum().item()
                kept[f]["planes_per_head"] += planes[:, : r // 2].sum().item()
                kept[f]["planes_across_heads"] += across[: heads * r // 2].sum().item()
    record = {"command": " ".join([sys.executable, *sys.argv]), "git_commit": git_commit(), "machine": machine(),
              "model": "SmolLM2-135M-Instruct (dequantised Q4_1 GGUF, fp32)",
              "settings": {"calibration": f"{s.nsamples} x {s.seqlen} {s.dataset} train, seed {s.seed}",
                           "key_fractions": FRACTIONS, "post_positions": spec.max_positions},
              "energy_kept": {str(f): {k: round(v / total, 4) for k, v in row.items()} for f, row in kept.items()}}
    out = Path(args.out or ROOT / "bench" / "results" / f"rope-energy-{platform.node() or 'host'}.json")
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(out)
    print(json.dumps(record["energy_kept"], indent=1))


if __name__ == "__main__":
    main()
