#!/usr/bin/env python3
"""KV-head merging (DESIGN 3.4): PTB-test perplexity of the SVD merge vs mean pooling vs the original.

    python bench/merge_heads.py                                   # every model below, 40 x 512 test windows
    python bench/merge_heads.py --models llama-mini --windows 8    # a quick look

Per model and target head count: the original, the SVD merge (RoPE-commuting key fold on RoPE models) and the
mean-pool baseline (Ainslie et al.), all from the same calibration Grams (PTB train windows), evaluated on the
same PTB test windows. Then one composition: llama mini 4 -> 2 KV heads (SVD), then Eigen Attention at KV ratio
0.7 of the merged cache, through the CLI stages (merge-heads -> calibrate -> fold), with Eigen Attention alone at
the same fraction of the original cache next to it. Target: the SVD merge beats mean pooling at every setting.
Writes bench/results/merge-heads-<host>.json (per run: command, git commit, CPU, settings; every number), rewritten
after each row so that an interrupted run keeps what finished.
"""
from __future__ import annotations

import argparse
import json
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# name -> (recipe in models/, KV head targets)
MODELS = {
    "smollm2-135m": ("smollm2-135m", (1,)),
    "opt-mini": ("ptb-opt-mini", (2, 1)),
    "llama-mini": ("ptb-llama-mini", (2, 1)),
}
COMPOSE = ("llama-mini", 2, 0.7)     # model, KV heads after the merge, Eigen Attention KV ratio on top


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--windows", type=int, default=40, help="PTB test windows of --eval-seqlen tokens")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (PTB train)")
    p.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compose", action="store_true", help="skip the merge + Eigen Attention composition")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def _meta(args, argv) -> dict:
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "eigen_export", "bench"], cwd=REPO,
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = None, None
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"command": " ".join([sys.executable, "bench/merge_heads.py", *argv]), "git_commit": commit,
            "git_dirty": dirty, "host": socket.gethostname(), "cpu": cpu, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "settings": {"eval": {"dataset": "ptb", "split": "test", "seqlen": args.eval_seqlen,
                                  "windows": args.windows},
                         "calibration": {"dataset": "ptb", "split": "train", "nsamples": args.nsamples,
                                         "seqlen": args.seqlen, "seed": args.seed},
                         "dtype": "float32", "device": "cpu"}}


def _ppl(model, windows) -> float:
    from eigen_export.backends import TorchBackend, perplexity

    return round(perplexity(TorchBackend(model), windows, batch_size=4), 4)


def bench_model(name, args, record):
    from transformers import AutoTokenizer

    from eigen_export.data import calibration_batch, eval_windows
    from eigen_export.loading import build_decoder, load_hf
    from eigen_export.method.merge import group_grams, merge_state
    from eigen_export.settings import resolve_model

    source, targets = MODELS[name]
    source = resolve_model(source)
    if not (Path(source) / "config.json").is_file():
        print(f"[{name}] skipped: {source} has no config.json yet", flush=True)
        return
    config, model = load_hf(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    windows = eval_windows(tokenizer, "ptb", args.eval_seqlen, split="test", max_windows=args.windows)
    calib = calibration_batch(tokenizer, "ptb", args.nsamples, args.seqlen, args.seed)
    spec = model.spec
    started = time.perf_counter()
    base = {"model": name, "source": source, "num_heads": spec.num_heads, "kv_heads_before": spec.num_kv_heads}
    record({**base, "kv_heads": spec.num_kv_heads, "method": "original", "kv_fraction": 1.0,
            "perplexity": _ppl(model, windows)})
    for n in targets:
        t0 = time.perf_counter()
        grams = group_grams(model, calib, n, progress=False)
        calib_s = time.perf_counter() - t0
        for method in ("svd", "mean"):
            state, errors = merge_state(model.state_dict(), grams, spec, n, method)
            merged = build_decoder(config, state, None, None, num_kv_heads=n)
            mean_err = {p: round(sum(e[p] for e in errors) / len(errors), 4) for p in ("key", "value")}
            record({**base, "kv_heads": n, "method": method, "kv_fraction": round(n / spec.num_kv_heads, 4),
                    "perplexity": _ppl(merged, windows), "cache_error_mean": mean_err,
                    "cache_error_per_layer": errors, "calibration_s": round(calib_s, 1)})
    print(f"[{name}] done in {time.perf_counter() - started:.0f} s", flush=True)


def bench_compose(args, record):
    """merge-heads -> calibrate -> fold, as a user runs it; and Eigen Attention alone at the same total cache."""
    from transformers import AutoTokenizer

    from eigen_export import load
    from eigen_export.data import eval_windows
    from eigen_export.settings import CalibrationSettings, FoldSettings, MergeSettings, resolve_model
    from eigen_export.stages.calibrate import run_calibrate
    from eigen_export.stages.fold import run_fold
    from eigen_export.stages.merge import run_merge

    name, n, ratio = COMPOSE
    source = resolve_model(MODELS[name][0])
    if not (Path(source) / "config.json").is_file():
        return
    windows = eval_windows(AutoTokenizer.from_pretrained(source), "ptb", args.eval_seqlen, split="test",
                           max_windows=args.windows)
    calib = dict(nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        merge = run_merge(source, tmp / "merged", MergeSettings(kv_heads=n, **calib), progress=False)
        run_calibrate(str(tmp / "merged"), tmp / "calib-merged", CalibrationSettings(**calib), progress=False)
        manifest = run_fold(str(tmp / "merged"), tmp / "calib-merged", tmp / "folded-merged",
                            FoldSettings(kv_ratio=ratio))
        total = merge["kv_heads"] / merge["kv_heads_before"] * manifest.kv_ratio
        record({"model": name, "source": source, "method": f"svd merge {merge['kv_heads_before']}->{n} "
                f"+ eigen attention kv_ratio {ratio}", "kv_heads": n, "kv_fraction": round(total, 4),
                "ranks": manifest.ranks, "manifest_has_merge": "merge" in manifest.extra,
                "perplexity": _ppl(load(tmp / "folded-merged"), windows)})
        run_calibrate(source, tmp / "calib", CalibrationSettings(**calib), progress=False)
        alone = run_fold(source, tmp / "calib", tmp / "folded", FoldSettings(kv_ratio=total))
        record({"model": name, "source": source, "method": f"eigen attention alone, kv_ratio {total:.3f}",
                "kv_heads": merge["kv_heads_before"], "kv_fraction": alone.kv_ratio, "ranks": alone.ranks,
                "perplexity": _ppl(load(tmp / "folded"), windows)})


def verdict(rows) -> dict:
    """SVD merge vs mean pool at every (model, kv_heads) measured."""
    settings = {}
    for r in rows:
        if r["method"] in ("svd", "mean"):
            settings.setdefault((r["model"], r["kv_heads"]), {})[r["method"]] = r["perplexity"]
    checks = [{"model": m, "kv_heads": n, "svd": p["svd"], "mean": p["mean"], "pass": p["svd"] < p["mean"]}
              for (m, n), p in settings.items() if {"svd", "mean"} <= set(p)]
    return {"target": "SVD merge perplexity < mean-pool perplexity at every setting", "checks": checks,
            "pass": bool(checks) and all(c["pass"] for c in checks)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    out = args.out or REPO / "bench" / "results" / f"merge-heads-{socket.gethostname()}.json"
    # Models not re-run keep their rows from earlier runs (SmolLM2 alone takes ~30 min on a shared CPU); each
    # row names the run that measured it.
    result = json.loads(out.read_text()) if out.is_file() else {"runs": [], "rows": []}
    result["rows"] = [r for r in result["rows"] if r["model"] not in args.models]
    result["runs"].append({"models": args.models, **_meta(args, argv)})
    run = len(result["runs"]) - 1

    def save():
        result["verdict"] = verdict(result["rows"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")

    def record(row):
        result["rows"].append({**row, "run": run})
        print(json.dumps({k: v for k, v in row.items() if k != "cache_error_per_layer"}), flush=True)
        save()

    started = time.perf_counter()
    for name in args.models:
        bench_model(name, args, record)
    if not args.no_compose and COMPOSE[0] in args.models:
        bench_compose(args, record)
    result["runs"][run]["wall_time_s"] = round(time.perf_counter() - started, 1)
    save()
    print(json.dumps(result["verdict"], indent=1))
    print(f"written to {out}")
    return 0 if result["verdict"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
