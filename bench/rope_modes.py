"""RoPE treatments side by side on SmolLM2-135M: perplexity at 512 and 2048 tokens, every window, two texts.

    .venv/bin/python bench/rope_modes.py           # baseline, pre and post at 0.7 and 0.5 (~1 h a job, 1 core)
    .venv/bin/python bench/rope_modes.py --jobs post:0.7 pre:0.7 --window-step 4 --texts ptb_test   # a look

Calibration: `eigen-export calibrate` defaults (32 x 512 PTB train), one per mode, in its own process.
Evaluation: every non-overlapping 512- and 2048-token window of PTB test and of the Python language reference
(kv_accuracy.texts: the same joins), no BOS, fp32, no cache. Modes:
  pre          keys compressed before RoPE, rebuilt full width and rotated at run time (exact at any position)
  pre-joint    pre with one latent per layer side for all KV heads (issue 13; calibrate's default for SmolLM2)
  post         keys compressed after RoPE with a basis fitted to every position of the max context
               (decompose.rotation_average; the cache is read as it is)
  post-2048    post fitted to every position below 2048 (--rope-positions 2048: the context served here)
  post-window  post fitted to the calibration windows' positions only (--rope-positions 0; the old post)
Ranks: --allocation loss (the default) at each KV ratio. Writes bench/results/rope-modes-<host>.json, rewritten
after every finished job.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.kv_accuracy import (DEFAULT_TEXTS, TEXTS, calibrate_in_child, folded_model, token_ids,  # noqa: E402
                               windows_of)
from eigen_export.machine import git_commit, machine  # noqa: E402

# `pre` pinned to a latent per KV head (the rows measured before joint latents became calibrate's default for SmolLM2)
MODES = {"pre": ("--rope-mode", "pre", "--latents", "heads"), "post": ("--rope-mode", "post"),
         "pre-joint": ("--rope-mode", "pre", "--latents", "joint"),
         "post-2048": ("--rope-mode", "post", "--rope-positions", "2048"),
         "post-window": ("--rope-mode", "post", "--rope-positions", "0")}
RATIOS = (0.7, 0.5)
LENGTHS = (512, 2048)
DEFAULT_JOBS = ["baseline"] + [f"{mode}:{r}" for r in RATIOS for mode in ("pre", "post")]


def run_job(job: str, source: str, work: str, step: int, names: list[str]) -> dict:
    """One row: fold in memory from the mode's calibration, perplexity on every window of each text and length."""
    import torch
    from transformers import AutoTokenizer

    import eigen_export
    from eigen_export.artifacts.calib import read_calibration
    from eigen_export.backends import TorchBackend, perplexity

    torch.set_num_threads(1)
    model = eigen_export.load(source)
    ids_of = token_ids(AutoTokenizer.from_pretrained(source), names)
    row = {"job": job}
    if job != "baseline":
        mode, ratio = job.split(":")
        layers, record = read_calibration(Path(work) / f"calib-{mode}")
        model, fields = folded_model(model, layers, record.rope_mode, float(ratio))
        row |= {"mode": mode, "rope_mode": record.rope_mode, "rope_positions": record.rope_positions, **fields}
    started = time.perf_counter()
    for length in LENGTHS:
        for name, ids in ids_of.items():
            windows = windows_of(ids, step, length)
            row[f"ppl_{name}_{length}"] = perplexity(TorchBackend(model), windows, batch_size=max(1, 2048 // length))
            row[f"windows_{name}_{length}"] = int(windows.shape[0])
    row["eval_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), flush=True)
    return row


def write(record: dict, out: Path) -> None:
    base = next((r for r in record["rows"] if r["job"] == "baseline"), None)
    for row in record["rows"]:
        for key in [k for k in row if k.startswith("ppl_")]:
            if base and key in base:
                row["increase" + key[3:]] = round(row[key] / base[key] - 1, 5)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", default=DEFAULT_JOBS,
                        help="baseline and/or mode:kv_ratio, mode one of " + ", ".join(MODES))
    parser.add_argument("--recalibrate", action="store_true", help="calibrate even where work/calib-<mode> exists")
    args = job_arguments(parser, "bench-rope-modes").parse_args()

    from eigen_export.assets import smollm2_dir

    source, work = str(smollm2_dir()), Path(args.work)
    out = Path(args.out or ROOT / "bench" / "results" / f"rope-modes-{platform.node() or 'host'}.json")
    record = new_record(args, lengths=LENGTHS, modes=MODES)
    for mode in sorted({job.split(":")[0] for job in args.jobs if job != "baseline"}):
        if args.recalibrate or not (work / f"calib-{mode}" / "calib.json").exists():
            record["calibration"][mode] = calibrate_in_child(source, work / f"calib-{mode}", *MODES[mode])
            print(mode, record["calibration"][mode], flush=True)
    run_jobs(run_job, args, source, work, record, out)


def job_arguments(parser: argparse.ArgumentParser, work: str) -> argparse.ArgumentParser:
    """The options every job-running accuracy bench takes besides --jobs: texts, window step, workers, the work
    directory (build/<work> by default) and the results file."""
    parser.add_argument("--texts", nargs="+", default=list(DEFAULT_TEXTS), choices=list(TEXTS))
    parser.add_argument("--window-step", type=int, default=1, help="every n-th window (default 1: all of them)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default=str(ROOT / "build" / work))
    parser.add_argument("--out", default=None)
    return parser


def new_record(args, **settings) -> dict:
    """A results record before its rows: the command, commit, machine, every setting (args and `settings`)."""
    return {"command": " ".join([sys.executable, *sys.argv]), "git_commit": git_commit(), "machine": machine(),
            "python": sys.version.split()[0], "settings": vars(args) | settings,
            "model": "SmolLM2-135M-Instruct (dequantised Q4_1 GGUF, fp32)", "calibration": {}, "rows": []}


def run_jobs(run_job, args, source: str, work: Path, record: dict, out: Path) -> None:
    """run_job(job, source, work, window step, texts) for every job of args in --workers one-thread processes;
    record's rows rewritten to `out` after each finished job."""
    os.environ["OMP_NUM_THREADS"] = "1"
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_job, job, source, str(work), args.window_step, args.texts) for job in args.jobs]
        for future in as_completed(futures):
            record["rows"].append(future.result())
            write(record, out)


if __name__ == "__main__":
    main()
