"""Perplexity vs KV ratio for SmolLM2-135M in both RoPE modes, plus calibration time and peak memory.

    .venv/bin/python bench/eigen_sweep.py [--nsamples 32 --seqlen 512 --ratios 0.9 0.8 0.7 0.6 0.5]

Each calibration runs in its own process so its wall time and peak RSS are its own. Evaluation: PTB
test in non-overlapping 512-token windows (all of them by default), and at 2048 tokens to check that a
basis calibrated on 512-token windows generalises to longer contexts (DESIGN 3.2's risk for `post`).
Writes bench/results/eigen-sweep-<host>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from eigen_export.machine import git_commit, machine

ROOT = Path(__file__).resolve().parent.parent


def calibrate_in_child(source: str, out: Path, mode: str, args) -> dict:
    cmd = [sys.executable, "-m", "eigen_export", "-q", "calibrate", source, "--out", str(out), "--force",
           "--rope-mode", mode, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"command": " ".join(cmd), "wall_s": round(wall, 1),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
            # ru_maxrss of children is the largest child so far: calibrations run first, so it is theirs
            "peak_rss_gb": round(after.ru_maxrss / 2**20, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    parser.add_argument("--modes", nargs="+", default=["pre", "post"])
    parser.add_argument("--eval-windows", type=int, default=None, help="512-token windows (default: all)")
    parser.add_argument("--long-windows", type=int, default=12, help="2048-token windows for the long check")
    parser.add_argument("--long-ratio", type=float, default=0.7)
    parser.add_argument("--work", default=str(ROOT / "build" / "bench-sweep"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    import eigen_export
    from eigen_export.assets import smollm2_dir
    from eigen_export.data import eval_windows
    from eigen_export.backends import TorchBackend, perplexity
    from eigen_export.settings import FoldSettings
    from eigen_export.stages.fold import run_fold

    source = str(smollm2_dir())
    work = Path(args.work)
    record = {"command": " ".join([sys.executable, *sys.argv]), "git_commit": git_commit(), "machine": machine(),
              "settings": vars(args), "model": "SmolLM2-135M-Instruct (dequantised Q4_1 GGUF, fp32)",
              "calibration": {}, "results": []}
    for mode in args.modes:
        record["calibration"][mode] = calibrate_in_child(source, work / f"calib-{mode}", mode, args)
        print(mode, record["calibration"][mode], flush=True)

    tokenizer = AutoTokenizer.from_pretrained(source)
    windows = eval_windows(tokenizer, "ptb", 512, max_windows=args.eval_windows)
    long_windows = eval_windows(tokenizer, "ptb", 2048, max_windows=args.long_windows)
    record["settings"]["eval_windows_512"] = int(windows.shape[0])
    record["settings"]["eval_windows_2048"] = int(long_windows.shape[0])
    original = TorchBackend(eigen_export.load(source))
    spec = original.model.spec
    record["baseline"] = {"ppl_512": perplexity(original, windows), "ppl_2048": perplexity(original, long_windows),
                          "kv_bytes_per_token_fp16": 2 * spec.num_kv_heads * spec.num_layers * 2 * spec.head_dim}
    print("baseline", record["baseline"], flush=True)
    del original
    for mode in args.modes:
        for ratio in args.ratios:
            folded_dir = work / f"folded-{mode}-{ratio}"
            manifest = run_fold(source, work / f"calib-{mode}", folded_dir, FoldSettings(kv_ratio=ratio), force=True)
            backend = TorchBackend(eigen_export.load(folded_dir))
            row = {"rope_mode": mode, "target": ratio, "kv_ratio": manifest.kv_ratio, "ranks": manifest.ranks,
                   "kv_bytes_per_token_fp16": 2 * manifest.num_kv_heads * sum(k + v for k, v in manifest.ranks),
                   "ppl_512": perplexity(backend, windows)}
            if ratio == args.long_ratio:
                row["ppl_2048"] = perplexity(backend, long_windows)
            record["results"].append(row)
            print({k: v for k, v in row.items() if k != "ranks"}, flush=True)
    out = Path(args.out or ROOT / "bench" / "results" / f"eigen-sweep-{platform.node() or 'host'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
