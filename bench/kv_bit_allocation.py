"""Probe for issue 15's int4 target: bit allocation inside each cached vector (transform coding on the eigen
coordinates), fake-quantized in the reference decoder, on SmolLM2-135M at KV 0.7.

    .venv/bin/python bench/kv_bit_allocation.py --configs 4@4 2,4,8@4 2,4,8@3.5 --window-step 16

A config BITS@AVG: each kept latent coordinate gets one of BITS, by reverse water-filling on the calibrated loss
spectrum (the loss-basis latents are loss-whitened, so one threshold serves every head, layer, key and value),
with AVG bits per kept coordinate on average; `4@4` is uniform int4. The coordinates of a vector that share a
width form a group: rotated within itself (decompose.incoherent_rotation), symmetric codes, absmax scales per
token (--scales: one fp16 or one 8-bit log2 scale per group, or one fp16 scale per vector). Bytes per token count
the codes and the scales. This is a probe of the
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


def fake_quantize(x, bits, spectrum, scales: str):
    """x [B, H_kv, T, r] through per-group rotated absmax codes; bits and spectrum [H_kv, r].

    scales: "group" = one fp16 scale per token and group; "log8" = one 8-bit log2 scale per token and group;
    "shared" = one fp16 step per token for all groups (the largest group's absmax / qmax: equal noise per
    coordinate, as water-filling asks); "spectrum" = one fp16
    scale per token times static per-group ratios sqrt(mean eigenvalue of the group) / qmax, which a cache
    format would fold into the basis."""
    import torch

    from eigen_export.method.decompose import incoherent_rotation

    out = torch.empty_like(x)
    for h in range(x.shape[1]):
        groups = []
        for b in sorted(set(bits[h].tolist())):
            idx = (bits[h] == b).nonzero().flatten()
            rot = incoherent_rotation(len(idx), seed=len(idx)).float()
            qmax = 2 ** (int(b) - 1) - 1
            ratio = 1.0 if scales != "spectrum" else spectrum[h, idx].mean().sqrt().item() / qmax
            groups.append((idx, rot, qmax, ratio, x[:, h][..., idx].float() @ rot))
        need = [z.abs().amax(-1, keepdim=True) / (qmax * ratio) for _, _, qmax, ratio, z in groups]
        shared = torch.stack(need).amax(0) if scales != "group" else None
        for (idx, rot, qmax, ratio, z), own in zip(groups, need):
            unit = (own if shared is None else shared).clamp_min(2 ** -14)
            if scales == "log8":         # 2^(u/8), u an int8 rounded up: the codes never clip, the step is <= 9% long
                scale = torch.exp2(torch.ceil(8 * torch.log2(unit)).clamp(-128, 127) / 8)
            else:
                scale = unit.half().float() * ratio       # the ratio is static: folded into the basis
            out[:, h][..., idx] = ((torch.round(z / scale).clamp(-qmax, qmax) * scale) @ rot.T).to(x.dtype)
    return out


def run(config: str, source: str, calib: Path, step: int, scales: str) -> dict:
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
    spectrum = dict(zip(keys, spectra))

    def cached(k, v, i):
        return tuple(fake_quantize(x, bits[(i, side)], spectrum[(i, side)], scales) for x, side in ((k, "k"), (v, "v")))

    for i, layer in enumerate(model.layers):
        layer.attn._cached = lambda k, v, i=i: cached(k, v, i)
    code_bits = sum(b.sum().item() for b in bits.values())
    groups = sum(len(set(b[h].tolist())) for b in bits.values() for h in range(b.shape[0]))
    scale_bytes = 2 * groups if scales == "group" else groups if scales == "log8" else \
        2 * sum(b.shape[0] for b in bits.values())               # one fp16 scale per vector
    row = {"config": config, "scales": scales, "widths": widths,
           "average_bits": round(code_bits / sum(b.numel() for b in bits.values()), 3),
           "coordinates_per_width": {w: int(sum((b == w).sum().item() for b in bits.values())) for w in widths},
           "groups_per_vector": round(groups / sum(b.shape[0] for b in bits.values()), 2),
           "bytes_per_token": math.ceil(code_bits / 8) + scale_bytes, "kv_ratio": fields["kv_ratio"]}
    row["bytes_vs_fp16_uncompressed"] = round(row["bytes_per_token"] / FP16_UNCOMPRESSED, 4)
    windows = texts(AutoTokenizer.from_pretrained(source), step)
    return evaluate(row, model, windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["4@4", "2,4,8@4", "2,4,8@3.5"])
    parser.add_argument("--window-step", type=int, default=16)
    parser.add_argument("--scales", choices=["group", "log8", "shared", "spectrum"], default="group",
                        help="scales per vector: one fp16 (or 8-bit log2) per width group, or one fp16 shared "
                             "(equal steps, or steps in static ratios from the spectrum)")
    parser.add_argument("--calib", default=str(ROOT / "build" / "bench-kv-quant" / "calib"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from eigen_export.assets import smollm2_dir

    record = {"command": " ".join([sys.executable, *sys.argv]), "git_commit": git_commit(), "machine": machine(),
              "python": sys.version.split()[0], "settings": vars(args),
              "model": "SmolLM2-135M-Instruct (dequantised Q4_1 GGUF weights, fp32)", "kv_ratio": 0.7,
              "rows": [run(c, str(smollm2_dir()), Path(args.calib), args.window_step, args.scales)
                       for c in args.configs]}
    out = Path(args.out or ROOT / "bench" / "results" / f"kv-bit-allocation-{platform.node() or 'host'}.json")
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(out)
    print(f"written {out}")


if __name__ == "__main__":
    main()
