"""Probe for issue 15's int4 target: bit allocation inside each cached vector (transform coding on the eigen
coordinates), fake-quantized in the reference decoder, on SmolLM2-135M at KV 0.7.

    .venv/bin/python bench/kv_bit_allocation.py --configs 4@4 2,4,8@4 2,4,8@3.5 --window-step 16

A config BITS@AVG: each kept latent coordinate gets one of BITS, by reverse water-filling on the calibrated loss
spectrum (the loss-basis latents are loss-whitened, so one threshold serves every head, layer, key and value),
with AVG bits per kept coordinate on average; `4@4` is uniform int4. The coordinates of a vector that share a
width form a group: rotated within itself (decompose.incoherent_rotation), one fp16 absmax scale per token and
group, symmetric codes. Bytes per token count the codes and one 2-byte scale per group. This is a probe of the
accuracy a layout with several code widths per vector would reach; no such cache format exists yet (kv_codec
has one width per vector). Calibration: bench/kv_quant.py's (build/bench-kv-quant/calib, the defaults).
Writes bench/results/kv-bit-allocation-<host>.json.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.kv_accuracy import evaluate, folded_model, texts  # noqa: E402
from eigen_export.machine import git_commit, machine  # noqa: E402

FP16_UNCOMPRESSED = 30 * 3 * 2 * 64 * 2          # SmolLM2: layers x KV heads x (K, V) x head_dim x 2 bytes


def allocate(spectra: list, widths: list[int], average: float):
    """Per (layer, side) [H_kv, r] bit widths from `widths`, the water level set so the mean is <= average."""
    import torch

    allowed = torch.tensor(widths, dtype=torch.float64)

    def at(level):
        return [allowed[((0.5 * torch.log2(e / level)).clamp(min=0)[..., None] - allowed).abs().argmin(-1)]
                for e in spectra]

    lo, hi = 1e-20, 1e5
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        bits = at(mid)
        mean = sum(b.sum() for b in bits) / sum(b.numel() for b in bits)
        lo, hi = (mid, hi) if mean > average else (lo, mid)
    return at(hi)


def fake_quantize(x, bits):
    """x [B, H_kv, T, r] through per-group rotated absmax codes; bits [H_kv, r]."""
    import torch

    from eigen_export.method.decompose import incoherent_rotation

    out = torch.empty_like(x)
    for h in range(x.shape[1]):
        for b in sorted(set(bits[h].tolist())):
            idx = (bits[h] == b).nonzero().flatten()
            rot = incoherent_rotation(len(idx), seed=len(idx)).float()
            z = x[:, h][..., idx].float() @ rot
            qmax = 2 ** (int(b) - 1) - 1
            scale = (z.abs().amax(-1, keepdim=True) / qmax).clamp_min(2 ** -14).half().float()
            out[:, h][..., idx] = ((torch.round(z / scale).clamp(-qmax, qmax) * scale) @ rot.T).to(x.dtype)
    return out


def run(config: str, source: str, calib: Path, step: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    import eigen_export
    from eigen_export.artifacts.calib import read_calibration

    torch.set_num_threads(1)
    widths, average = config.split("@")
    widths, average = [int(b) for b in widths.split(",")], float(average)
    layers, record = read_calibration(calib)
    model, fields = folded_model(eigen_export.load(source), layers, record.rope_mode, 0.7)
    keys = [(i, side) for i in range(len(layers)) for side in ("k", "v")]
    spectra = [(layers[i].eig_k if side == "k" else layers[i].eig_v)[:, :r].double().clamp_min(1e-30)
               for (i, side), r in zip(keys, [r for pair in fields["ranks"] for r in pair])]
    bits = dict(zip(keys, allocate(spectra, widths, average)))
    for i, layer in enumerate(model.layers):
        layer.attn._cached = lambda k, v, i=i: (fake_quantize(k, bits[(i, "k")]), fake_quantize(v, bits[(i, "v")]))
    code_bits = sum(b.sum().item() for b in bits.values())
    groups = sum(len(set(b[h].tolist())) for b in bits.values() for h in range(b.shape[0]))
    row = {"config": config, "widths": widths, "average_bits": round(code_bits / sum(b.numel() for b in bits.values()), 3),
           "coordinates_per_width": {w: int(sum((b == w).sum().item() for b in bits.values())) for w in widths},
           "groups_per_vector": round(groups / sum(b.shape[0] for b in bits.values()), 2),
           "bytes_per_token": math.ceil(code_bits / 8) + 2 * groups, "kv_ratio": fields["kv_ratio"]}
    row["bytes_vs_fp16_uncompressed"] = round(row["bytes_per_token"] / FP16_UNCOMPRESSED, 4)
    windows = texts(AutoTokenizer.from_pretrained(source), step)
    return evaluate(row, model, windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["4@4", "2,4,8@4", "2,4,8@3.5"])
    parser.add_argument("--window-step", type=int, default=16)
    parser.add_argument("--calib", default=str(ROOT / "build" / "bench-kv-quant" / "calib"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from eigen_export.assets import smollm2_dir

    record = {"command": " ".join([sys.executable, *sys.argv]), "git_commit": git_commit(), "machine": machine(),
              "python": sys.version.split()[0], "settings": vars(args),
              "model": "SmolLM2-135M-Instruct (dequantised Q4_1 GGUF weights, fp32)", "kv_ratio": 0.7,
              "rows": [run(c, str(smollm2_dir()), Path(args.calib), args.window_step) for c in args.configs]}
    out = Path(args.out or ROOT / "bench" / "results" / f"kv-bit-allocation-{platform.node() or 'host'}.json")
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(out)
    print(f"written {out}")


if __name__ == "__main__":
    main()
