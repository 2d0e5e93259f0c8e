"""Bytes per token against perplexity on SmolLM2-135M: rank cut x cache quantization (issue 15).

    .venv/bin/python bench/kv_quant.py                                  # the whole grid, every window
    .venv/bin/python bench/kv_quant.py --jobs 0.7:fp 0.7:int8 --window-step 4   # a quick look

A job is RATIO:CACHE. RATIO is the KV ratio of the rank cut (1.0 keeps every dimension: the fold is then only
a change of basis, so the quantizer sees the latents a full-rank fold stores); CACHE is
  fp      the cache in the model's dtype (no quantization)
  int8    int8 codes, per-token fp16 scale, incoherent rotation folded into the bases (the --kv-dtype default)
  int8n   int8 without the rotation (--no-kv-rotation)
  int4    int4 codes with the rotation (the --kv-dtype int4 default)
  int4n   int4 without the rotation (made in memory: the pipeline refuses it, its mid-rise codes need the rotation)
  mixedB  8, 4 or 2 bits per number by the calibrated spectrum, B bits on average (e.g. mixed4, mixed4.2;
          --kv-dtype mixed --kv-bits B), one fp16 scale per vector, each width's run rotated
`baseline` is the unfolded model. Calibration: `eigen-export calibrate` defaults (32 x 512 PTB train, pre mode,
loss bases), made once in its own process; ranks by --allocation loss. Evaluation: kv_accuracy's protocol,
every 512-token window of PTB test and of the Python language reference, fp32, no cache: the reference decoder
reads every key and value through the quantized cache (the prefill's own chunk too), so a full forward is
exactly what cached decoding computes. Bytes per token count codes and scales; they are compared with the
uncompressed cache in fp16 (what a GPU deployment stores). Writes bench/results/kv-quant-<host>.json, rewritten
after every finished job.
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

from bench.kv_accuracy import DEFAULT_TEXTS, TEXTS, calibrate_in_child, evaluate, folded_model, texts  # noqa: E402
from bench.rope_modes import run_jobs  # noqa: E402
from eigen_export.machine import git_commit, machine  # noqa: E402

CACHES = {"fp": (None, False), "int8": ("int8", True), "int8n": ("int8", False), "int4": ("int4", True),
          "int4n": ("int4", False)}
DEFAULT_JOBS = ["baseline"] + [f"{r}:{c}" for r in ("1.0", "0.7", "0.5") for c in ("fp", "int8", "int4", "int4n")]
FP16_BYTES = 2


def run_job(job: str, source: str, work: str, step: int, names: list[str]) -> dict:
    """One row: fold in memory (rotated where asked), quantize the cache, perplexity on every window."""
    import torch
    from transformers import AutoTokenizer

    import eigen_export
    from eigen_export.artifacts.calib import read_calibration
    from eigen_export.method.decompose import kv_bytes_per_token

    torch.set_num_threads(1)
    model = eigen_export.load(source)
    spec = model.spec
    windows = texts(AutoTokenizer.from_pretrained(source), step, names=names)
    row = {"job": job}
    ranks = [(spec.head_dim, spec.head_dim)] * spec.num_layers
    kv_dtype = None
    if job != "baseline":
        ratio, cache = job.split(":")
        kv_dtype, rotate = CACHES[cache] if not cache.startswith("mixed") else ("mixed", True)
        kv_bits = float(cache[len("mixed"):] or 4) if kv_dtype == "mixed" else None
        layers, record = read_calibration(Path(work) / "calib")
        model, fields = folded_model(model, layers, record.rope_mode, float(ratio), rotate=rotate, kv_dtype=kv_dtype,
                                     kv_bits=kv_bits)
        ranks = [tuple(r) for r in fields["ranks"]]
        row |= {"cache": cache, "kv_dtype": kv_dtype, "rotation": rotate, "kv_bits": kv_bits, **fields}
    row["kv_bytes_per_token"] = kv_bytes_per_token(ranks, spec.num_kv_heads, FP16_BYTES, kv_dtype,
                                                   row.get("found", {}).get("kv_layout"))
    fp16_full = kv_bytes_per_token([(spec.head_dim, spec.head_dim)] * spec.num_layers, spec.num_kv_heads, FP16_BYTES)
    row["bytes_vs_fp16_uncompressed"] = round(row["kv_bytes_per_token"] / fp16_full, 4)
    return evaluate(row, model, windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", default=DEFAULT_JOBS,
                        help="baseline and/or ratio:cache, cache one of " + ", ".join(CACHES) + " or mixedB")
    parser.add_argument("--texts", nargs="+", default=list(DEFAULT_TEXTS), choices=list(TEXTS))
    parser.add_argument("--window-step", type=int, default=1, help="every n-th window (default 1: all of them)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default=str(ROOT / "build" / "bench-kv-quant"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from eigen_export.assets import smollm2_dir

    source, work = str(smollm2_dir()), Path(args.work)
    out = Path(args.out or ROOT / "bench" / "results" / f"kv-quant-{platform.node() or 'host'}.json")
    record = {"command": " ".join([sys.executable, *sys.argv]), "git_commit": git_commit(), "machine": machine(),
              "python": sys.version.split()[0], "settings": vars(args) | {"caches": CACHES, "seqlen": 512},
              "model": "SmolLM2-135M-Instruct (dequantised Q4_1 GGUF weights, fp32)", "rows": []}
    if (work / "calib" / "calib.json").exists():
        record["calibration"] = {"reused": str(work / "calib"), "calib.json": json.loads((work / "calib" /
                                                                                         "calib.json").read_text())}
    else:
        record["calibration"] = calibrate_in_child(source, work / "calib")
        print(record["calibration"], flush=True)
    run_jobs(run_job, args, source, work, record, out)


if __name__ == "__main__":
    main()
