"""Peak memory and disk of `make engine` for every GPU recipe, estimated from the per-layer figures that
bench/stream_memory.py measured (issue 17).

    .venv/bin/python bench/memory_estimates.py [--measured bench/results/stream-memory-vm.json]

Model shapes are those of each model's config.json on the hub (not reachable here: written below). What the
estimate assumes, per stage (B: the process before any weight, 0.3 GB measured; layer / embeddings: bytes in
the stage's dtype):
- calibrate (GPU, recipe dtype): input embeddings and LM head (the loss of the backward pass needs it) + a
  working set of `w_cal` layers (the measured one, fp32 on the CPU: the layer, its fp16 read, its recompute
  under autograd) + the calibration activations (input and output
  of a layer for every sample) + every layer's input on the grad_samples rows that the backward pass
  recomputes from (16-bit) + one batch's attention scores and probabilities in fp32, twice for autograd; host:
  B + one layer read in the checkpoint's dtype + the embeddings on their way to the GPU.
- fold (CPU, fp32): B + embeddings and head + `w_fold` layers (measured, shard buffer included).
- export (CPU): B + `w_exp` layers of the export dtype (measured).
- validate (GPU): original and folded model together (fp16) for the per-token comparison; then one engine:
  weights + the KV cache at max_batch x max_context (KV ratio applied) + 2 GB workspace.
- disk: checkpoint + folded + ONNX and engine of both the compressed and the original model.
A 141 GB GPU (H200) is the largest single device this project has used. Writes bench/results/memory-estimates.json
and prints the README table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eigen_export.machine import git_commit
from eigen_export.settings import find_recipe

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9
BASE_GB = 0.3                     # eigen-export's RSS before any weight (run_calibrate's start, SmolLM2 probe)
GPU_GB = 141.0
# layers, hidden, MLP, vocab, heads, KV heads, gated MLP, tied head
SHAPES = {
    "opt-125m": (12, 768, 3072, 50272, 12, 12, False, True),
    "opt-1.3b": (24, 2048, 8192, 50272, 32, 32, False, True),
    "opt-6.7b": (32, 4096, 16384, 50272, 32, 32, False, True),
    "opt-13b": (40, 5120, 20480, 50272, 40, 40, False, True),
    "opt-30b": (48, 7168, 28672, 50272, 56, 56, False, True),
    "opt-66b": (64, 9216, 36864, 50272, 72, 72, False, True),
    "llama-2-7b": (32, 4096, 11008, 32000, 32, 32, True, False),
    "llama-2-13b": (40, 5120, 13824, 32000, 40, 40, True, False),
    "llama-3-8b": (32, 4096, 14336, 128256, 32, 8, True, False),
    "mistral-7b": (32, 4096, 14336, 32000, 32, 8, True, False),
    "qwen2.5-7b": (28, 3584, 18944, 152064, 28, 4, True, False),
    "mpt-7b": (32, 4096, 16384, 50432, 32, 32, False, True),
}


def layer_params(hidden, mlp, heads, kv_heads, gated) -> int:
    d = hidden // heads
    return 2 * hidden * heads * d + 2 * hidden * kv_heads * d + (3 if gated else 2) * hidden * mlp


def working_sets(measured: dict) -> dict:
    """Per-layer working sets (in layers) of each stage, from the deepest measured run of bench/stream_memory.py."""
    shapes, row = measured["settings"]["shapes"], measured["rows"][-1]
    h, v = shapes["hidden_size"], shapes["vocab_size"]
    layer32 = layer_params(h, shapes["intermediate_size"], shapes["num_attention_heads"],
                           shapes["num_key_value_heads"], True) * 4 / GB
    embed32 = v * h * 4 / GB
    sets = {"w_cal": (row["calibrate"]["peak_rss_mb"] / 1e3 - BASE_GB - 2 * embed32) / layer32,   # untied head
            "w_fold": (row["fold"]["peak_rss_mb"] / 1e3 - BASE_GB - 2 * embed32) / layer32}
    if "export_folded" in row:           # fp16 export: its working set in fp16 layers
        sets["w_exp"] = (max(row["export_folded"]["peak_rss_mb"], row["export_original"]["peak_rss_mb"]) / 1e3
                         - BASE_GB) / (layer32 / 2)
    return {k: round(x, 2) for k, x in sets.items()}


def estimate(name: str, w: dict) -> dict:
    layers, hidden, mlp, vocab, heads, kv_heads, gated, tied = SHAPES[name]
    recipe = find_recipe(name)
    cal, build = recipe.calibration, recipe.build
    d = hidden // heads
    layer16 = layer_params(hidden, mlp, heads, kv_heads, gated) * 2 / GB
    embed16 = vocab * hidden * 2 / GB
    weights16 = layers * layer16 + embed16 * (1 if tied else 2)
    activations = 2 * cal.nsamples * cal.seqlen * hidden * 2 / GB
    kept_inputs = layers * min(cal.grad_samples, cal.nsamples) * cal.seqlen * hidden * 2 / GB
    scores = 2 * cal.batch_size * heads * cal.seqlen ** 2 * 4 / GB
    kv = layers * 2 * kv_heads * d * 2 * build.max_batch * build.max_context * recipe.fold.kv_ratio / GB
    embed_and_head16 = embed16 * (1 if tied else 2)
    gpu = {"calibrate": embed_and_head16 + w["w_cal"] * layer16 + activations + kept_inputs + 2 * scores,
           "validate (two models)": 2 * weights16 + scores / cal.batch_size,
           "engine": weights16 + kv + 2.0}
    host = {"calibrate": BASE_GB + layer16 + embed16,
            "fold": BASE_GB + (2 if tied else 4) * embed16 + 2 * w["w_fold"] * layer16}
    if "w_exp" in w:
        host["export"] = BASE_GB + w["w_exp"] * layer16
    fits = max(gpu.values()) <= GPU_GB
    need = "" if fits else ("; ".join(f"{k} needs {v:.0f} GB" for k, v in gpu.items() if v > GPU_GB))
    return {"recipe": name, "weights_gb": round(weights16, 1), "kv_cache_gb": round(kv, 1),
            "gpu_peak_gb": {k: round(v, 1) for k, v in gpu.items()},
            "host_peak_gb": {k: round(v, 1) for k, v in host.items()},
            "disk_gb": round(6 * weights16, 0), "fits_one_141gb_gpu": fits, "what_it_needs": need}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured", default=str(ROOT / "bench" / "results" / "stream-memory-vm.json"))
    args = parser.parse_args()
    measured = json.loads(Path(args.measured).read_text())
    w = working_sets(measured)
    rows = [estimate(name, w) for name in SHAPES]
    result = {"command": " ".join([sys.executable, *sys.argv]), "git_commit": git_commit(),
              "measured_from": args.measured, "measured_commit": measured["git_commit"], "working_sets_layers": w,
              "base_gb": BASE_GB, "gpu_gb": GPU_GB, "rows": rows}
    (ROOT / "bench" / "results" / "memory-estimates.json").write_text(json.dumps(result, indent=1) + "\n")
    print("| recipe | fp16 weights | GPU peak: calibrate / validate / engine | host peak: calibrate / fold"
          + (" / export" if "w_exp" in w else "") + " | disk | one 141 GB GPU |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        g, h = r["gpu_peak_gb"], r["host_peak_gb"]
        print(f"| {r['recipe']} | {r['weights_gb']} GB | {' / '.join(f'{v:.0f}' for v in g.values())} GB | "
              f"{' / '.join(f'{v:.1f}' for v in h.values())} GB | {r['disk_gb']:.0f} GB | "
              f"{'yes' if r['fits_one_141gb_gpu'] else 'no: ' + r['what_it_needs']} |")


if __name__ == "__main__":
    main()
