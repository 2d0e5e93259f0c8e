"""`make engine` on the default model from nothing: wall time and peak memory (issue 16: <= 10 min, <= 2.5 GB).

    .venv/bin/python bench/make_engine.py [--build-dir /tmp/make-engine]

Runs `eigen-export engine smollm2-135m` (what `make engine` runs) on an empty build directory under
/usr/bin/time -v, and samples the RSS of its whole process tree every 0.1 s: make engine runs each stage in a
child process, and the peak that counts is the sum of everything alive at once (GNU time's figure is only the
largest single process). Summed as PSS (a page shared by several processes, such as torch's libraries, counted
once) and as RSS (counted once per process), both recorded; the target is judged on PSS. Writes bench/results/make-engine-smollm2-<host>.json with the report's numbers.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from eigen_export.artifacts.report import verdict_line
from eigen_export.machine import git_commit, machine, versions

ROOT = Path(__file__).resolve().parent.parent


def tree_memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) summed over pid and all its descendants, from /proc. RSS counts a shared page (torch's
    libraries, resident in every process of the tree) once per process; PSS splits it among them, so the PSS
    sum is the memory the tree occupies."""
    rss = pss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
            rss += int(re.search(r"^Rss:\s+(\d+)", rollup, re.M).group(1))
            pss += int(re.search(r"^Pss:\s+(\d+)", rollup, re.M).group(1))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, AttributeError):
            continue
    return rss, pss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", default="/tmp/make-engine")
    args = parser.parse_args()
    build = Path(args.build_dir)
    shutil.rmtree(build, ignore_errors=True)
    command = ["/usr/bin/time", "-v", str(Path(sys.executable).parent / "eigen-export"), "engine", "smollm2-135m",
               "--build-dir", str(build)]
    started, peak_rss, peak_pss = time.perf_counter(), 0, 0
    log_path = build.with_name(build.name + ".log")
    with open(log_path, "w") as out, subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT) as proc:
        while proc.poll() is None:
            rss, pss = tree_memory_kb(proc.pid)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            time.sleep(0.1)
    total = time.perf_counter() - started
    log = log_path.read_text()
    lines = log.splitlines()
    if proc.returncode not in (0, 1):
        sys.exit(f"make engine failed:\n{log[-3000:]}")
    largest = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", log).group(1))
    report = json.loads((build / "smollm2-135m" / "report" / "report.json").read_text())
    peak_gb = peak_pss * 1024 / 1e9
    result = {
        "what": "make engine (default model SmolLM2-135M) from nothing on this machine, each stage in its own process",
        "command": " ".join(command[2:]) + " (what make engine runs), under " + " ".join(command[:2]),
        "git_commit": git_commit(), "machine": machine(), "versions": versions(),
        "recipe": "models/smollm2-135m.toml (calibration 32 x 512 PTB train, kv_ratio 0.7, rope pre, fp32 export, "
                  "validate 8 x 512 + 2 x 2048 PTB test, 4 continuations of 64 tokens)",
        "seconds": {"total_wall": round(total, 1), "validate": report["seconds"]},
        "peak_memory_mb": {"process_tree_pss_sum": round(peak_pss / 1024, 1),
                           "process_tree_rss_sum": round(peak_rss / 1024, 1),
                           "largest_single_process_rss_gnu_time": round(largest / 1024, 1),
                           "sampling": "every 0.1 s from /proc/<pid>/smaps_rollup"},
        "stage_lines": [line for line in lines if line.startswith(("[export]", "[build]", "[fold]", "[calibrate]"))],
        "target": f"make engine <= 10 minutes: {'PASS' if total <= 600 else 'FAIL'} ({int(total // 60)} min "
                  f"{int(total % 60)} s). Peak RSS <= 2.5 GB (issue 16): {'PASS' if peak_gb <= 2.5 else 'FAIL'} "
                  f"({peak_pss / 1024:,.0f} MiB = {peak_gb:.2f} GB, PSS summed over the process tree; RSS summed, "
                  f"which counts torch's shared libraries once per process: {peak_rss / 1024:,.0f} MiB; largest "
                  f"single process: {largest / 1024:,.0f} MiB)",
        "report": {k: report[k] for k in ("verdict", "passed", "failed", "accuracy", "latency", "memory",
                                          "sizes_bytes")} | {"verdict_line": verdict_line(report)},
    }
    out = ROOT / "bench" / "results" / f"make-engine-smollm2-{platform.node() or 'host'}.json"
    previous = json.loads(out.read_text()) if out.exists() else None
    if previous:
        result["previous"] = [{k: previous.get(k) for k in ("command", "git_commit", "seconds", "peak_rss_mb",
                                                          "peak_memory_mb", "target") if k in previous}]
        result["previous"] += previous.get("previous", []) if isinstance(previous.get("previous"), list) else \
            [previous["previous"]] if previous.get("previous") else []
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(result["target"], "->", out)


if __name__ == "__main__":
    main()
