"""Node counts of SmolLM2-135M's exported graphs before and after Polygraphy's constant folding (what the
TensorRT build runs before parsing, backends/onnx_sanitize.py), and the folding time.

    .venv/bin/python bench/graph_folding.py [--work /tmp/graph-folding]

Exports the original model and a fold at KV 0.7 (pre, the recipe's mode; calibrated on 8 x 256 PTB-train
tokens, enough for a graph whose shape does not depend on the calibration) with both graphs, then folds each.
Writes bench/results/graph-folding-<host>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import onnx

from eigen_export.assets import smollm2_dir
from eigen_export.backends.onnx_sanitize import FOLD_LIMIT, fold, sanitize
from eigen_export.machine import git_commit, machine, versions
from eigen_export.settings import CalibrationSettings, ExportSettings, FoldSettings
from eigen_export.stages.calibrate import run_calibrate
from eigen_export.stages.export import run_export
from eigen_export.stages.fold import run_fold

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/graph-folding")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = Path(args.work)
    source = str(smollm2_dir())
    calib = CalibrationSettings(nsamples=8, seqlen=256)
    run_calibrate(source, work / "calib", calib, device="cpu", progress=False)
    run_fold(source, work / "calib", work / "folded", FoldSettings(kv_ratio=0.7))
    exports = {"original": run_export(source, ExportSettings(), work / "onnx-original"),
               "kv 0.7 pre": run_export(work / "folded", ExportSettings(), work / "onnx-folded")}
    rows = []
    for model, onnx_dir in exports.items():
        for graph in ("model.onnx", "model_plugin.onnx"):
            started = time.perf_counter()
            folded = fold(onnx.load(str(onnx_dir / graph)))
            seconds = time.perf_counter() - started
            record = sanitize(onnx_dir / graph).record()
            rows.append({"model": model, "graph": graph, "nodes_before": record["before"],
                         "nodes_after_folding": len(folded.graph.node), "kept": record["folded"],
                         "fold_seconds": round(seconds, 2)})
            print(rows[-1], flush=True)
    result = {"command": " ".join([sys.executable, *sys.argv]), "git_commit": git_commit(), "machine": machine(),
              "versions": versions(("polygraphy", "onnx-graphsurgeon", "onnx", "onnxruntime", "torch")),
              "settings": {"calibration": calib.record(), "kv_ratio": 0.7, "export": "fp32, opset 18, both graphs",
                           "fold_limit_bytes": FOLD_LIMIT},
              "rows": rows}
    out = Path(args.out or ROOT / "bench" / "results" / f"graph-folding-{platform.node() or 'host'}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
