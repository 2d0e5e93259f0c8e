"""Peak memory of calibrate, fold and export on a model streamed from disk, at two depths (issue 17).

    .venv/bin/python bench/stream_memory.py [--layers 4 8] [--work /tmp/stream-memory]

Writes a random-weight model with Llama-2-7B's layer shapes (hidden 4096, MLP 11008, 32 heads of 128) as fp16
safetensors, one shard per layer plus one for embeddings and head, with transformers' index. Its vocabulary is
SmolLM2's (49152, not Llama-2's 32000) so that the offline SmolLM2 tokenizer, copied beside it, can feed it
PTB text. Then runs `eigen-export calibrate`, `fold` and `export --dtype fp16` (of the fold, and of the
original: make engine's baseline) on it, each in its own process under /usr/bin/time, and records each one's
peak RSS. Memory that grows with depth beyond the per-layer size is
what this catches: the deeper run must stay within 1.25x of the shallower one. Writes
bench/results/stream-memory-<host>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from eigen_export.assets import smollm2_dir
from eigen_export.machine import git_commit, machine, versions

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
          "vocab_size": 49152, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
CALIBRATION = ["--nsamples", "4", "--seqlen", "128", "--error-samples", "2"]


def write_model(out: Path, layers: int) -> int:
    """The random checkpoint, tensor by tensor (never more than one layer in memory); returns its bytes."""
    import transformers as tf

    out.mkdir(parents=True, exist_ok=True)
    tf.LlamaConfig(num_hidden_layers=layers, torch_dtype="float16", **SHAPES).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir() / name, out / name)
    g = torch.Generator().manual_seed(0)
    h, f, v = SHAPES["hidden_size"], SHAPES["intermediate_size"], SHAPES["vocab_size"]

    def randn(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).half()

    shards = [("embed", {"model.embed_tokens.weight": randn(v, h), "model.norm.weight": torch.ones(h).half(),
                         "lm_head.weight": randn(v, h)})]
    weight_map, total = {}, 0
    for i in range(-1, layers):
        if i >= 0:
            p = f"model.layers.{i}."
            shards = [(f"layer{i}", {
                **{f"{p}self_attn.{n}_proj.weight": randn(h, h) for n in "qkvo"},
                f"{p}mlp.gate_proj.weight": randn(f, h), f"{p}mlp.up_proj.weight": randn(f, h),
                f"{p}mlp.down_proj.weight": randn(h, f),
                f"{p}input_layernorm.weight": torch.ones(h).half(),
                f"{p}post_attention_layernorm.weight": torch.ones(h).half()})]
        name, tensors = shards[0]
        file = f"model-{name}.safetensors"
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    return total


def measured(command: list[str]) -> dict:
    """Run one stage alone; its wall time and peak RSS (GNU time's %M, KiB)."""
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", *command], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())})
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return {"peak_rss_mb": round(int(done.stderr.strip().splitlines()[-1]) / 1024, 1),
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--work", default="/tmp/stream-memory")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cli = str(Path(sys.executable).parent / "eigen-export")
    rows = []
    for layers in args.layers:
        work = Path(args.work) / f"{layers}-layers"
        shutil.rmtree(work, ignore_errors=True)
        checkpoint_bytes = write_model(work / "hf", layers)
        row = {"layers": layers, "checkpoint_gb": round(checkpoint_bytes / 1e9, 2),
               "calibrate": measured([cli, "calibrate", str(work / "hf"), "--out", str(work / "calib"),
                                      *CALIBRATION]),
               "fold": measured([cli, "fold", str(work / "hf"), "--calib", str(work / "calib"), "--out",
                                 str(work / "folded"), "--kv-ratio", "0.7"]),
               "export_folded": measured([cli, "export", str(work / "folded"), "--dtype", "fp16", "--out",
                                          str(work / "onnx")]),
               "export_original": measured([cli, "export", str(work / "hf"), "--dtype", "fp16", "--out",
                                            str(work / "onnx-original")])}
        row["onnx_gb"] = round(sum(p.stat().st_size for p in (work / "onnx").iterdir()) / 1e9, 2)
        row["folded_files"] = sorted(p.name for p in (work / "folded").iterdir() if "safetensors" in p.name)
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(work, ignore_errors=True)
    growth = {stage: round(rows[-1][stage]["peak_rss_mb"] / rows[0][stage]["peak_rss_mb"], 3)
              for stage in ("calibrate", "fold", "export_folded", "export_original")}
    result = {"what": "peak RSS of calibrate, fold and export streamed from disk, Llama-2-7B layer shapes, by depth",
              "command": " ".join([sys.executable, *sys.argv]), "git_commit": git_commit(), "machine": machine(),
              "versions": versions(("eigen_export", "torch", "transformers", "safetensors")),
              "settings": {"shapes": SHAPES, "checkpoint_dtype": "float16", "compute_dtype": "float32",
                           "calibration": " ".join(CALIBRATION), "kv_ratio": 0.7, "export": "fp16, opset 18, both graphs"},
              "rows": rows, "deepest_over_shallowest": growth,
              "target": "deepest within 1.25x of the shallowest: "
                        + ", ".join(f"{k} {v}x {'PASS' if v <= 1.25 else 'FAIL'}" for k, v in growth.items())}
    out = Path(args.out or ROOT / "bench" / "results" / f"stream-memory-{platform.node() or 'host'}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(result["target"], "->", out)


if __name__ == "__main__":
    main()
