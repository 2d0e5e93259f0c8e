"""`eigen-export engine` / `make engine`: every stage, skipped when current, redone when its inputs change."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eigen_export.cli import main
from eigen_export_plugins.lowrank_attention.kv_codec import code_width

REPO = Path(__file__).resolve().parent.parent

# A random model: its accuracy limits are not the point here (tests/stages/test_validate.py covers them on a
# trained mini), so they are opened up; the backend parity limits stay the fp32 defaults.
TINY_RECIPE = """[model]
source = "{source}"
family = "llama"

[calibration]
nsamples = 4
seqlen = 64

[compress]
kv_ratio = {kv_ratio}

[engine]
max_batch = 2
max_context = 128

[validate]
windows = 2
seqlen = 64
generate_steps = 4
latency_contexts = [16]
latency_batches = [1]
latency_repeats = 1
decode_steps = 2
min_top1 = 0.0
max_layer_error = 2.0
max_kl = 5.0
min_continuation_prefix = 0.0
max_top1_drop = 1.0
"""


def stage_records(root):
    return [root / "calib" / "calib.json", root / "folded" / "eigen.json", root / "onnx" / "io.json",
            root / "engine" / "build.json", root / "original" / "onnx" / "io.json",
            root / "original" / "engine" / "build.json", root / "report" / "report.json"]


def test_engine_runs_every_stage_then_skips_current_ones(tiny_llama_dir, tmp_path, capsys):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(source=tiny_llama_dir, kv_ratio=0.7))
    build = tmp_path / "build"
    assert main(["engine", str(recipe), "--build-dir", str(build)]) == 0
    out = capsys.readouterr().out
    root = build / "tiny"
    assert "engine: onnxruntime" in out and "parity report PASS" in out
    assert "TensorRT" not in out or "not" in out               # never claims a TensorRT engine
    stamps = {p: p.stat().st_mtime_ns for p in stage_records(root)}
    assert main(["engine", str(recipe), "--build-dir", str(build)]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps       # every stage skipped
    recipe.write_text(TINY_RECIPE.format(source=tiny_llama_dir, kv_ratio=0.5))
    assert main(["engine", str(recipe), "--build-dir", str(build)]) == 0
    changed = [p.parent.name for p in stamps if p.stat().st_mtime_ns != stamps[p]]
    assert changed == ["folded", "onnx", "engine", "report"]     # the calibration and the baseline were reused
    report = json.loads((root / "report" / "report.json").read_text())
    backends = {r["backend"] for r in report["latency"]}
    assert "onnxruntime original" in backends and "onnxruntime compressed" in backends   # engine against engine
    assert report["sizes_bytes"]["baseline_engine"] > 0 and report["engine"]["baseline_note"] is None
    assert json.loads((root / "report" / "report.json").read_text())["compression"]["kv_ratio"] <= 0.5
    stamps = {p: p.stat().st_mtime_ns for p in stamps}
    assert main(["engine", str(recipe), "--build-dir", str(build), "--force"]) == 0
    assert all(p.stat().st_mtime_ns > t for p, t in stamps.items())


def test_no_baseline_skips_the_uncompressed_engine_and_the_report_says_so(tiny_llama_dir, tmp_path, capsys):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(source=tiny_llama_dir, kv_ratio=0.7))
    assert main(["engine", str(recipe), "--build-dir", str(tmp_path / "build"), "--no-baseline"]) == 0
    root = tmp_path / "build" / "tiny"
    assert not (root / "original").exists()
    report = json.loads((root / "report" / "report.json").read_text())
    assert "no baseline engine" in report["engine"]["baseline_note"]
    assert "onnxruntime original" not in {r["backend"] for r in report["latency"]}
    assert "decode time" not in (root / "report" / "report.md").read_text().splitlines()[2]


def test_engine_rejects_unknown_model(tmp_path, capsys):
    assert main(["engine", "no-such-recipe", "--build-dir", str(tmp_path)]) == 2
    assert "neither a recipe" in capsys.readouterr().err


def test_engine_checks_the_recipe_family(tiny_llama_dir, tmp_path, capsys):
    recipe = tmp_path / "wrong.toml"
    recipe.write_text(TINY_RECIPE.format(source=tiny_llama_dir, kv_ratio=0.7).replace('"llama"', '"opt"'))
    assert main(["engine", str(recipe), "--build-dir", str(tmp_path / "build")]) == 2
    assert "says family 'opt' but" in capsys.readouterr().err
    assert not (tmp_path / "build").exists()                     # failed before writing anything


@pytest.mark.slow
def test_make_engine_on_the_opt_mini_end_to_end(tmp_path):
    """What the README promises, on the project's OPT mini: `make engine MODEL=...` exits 0 with a passing report."""
    env = {**os.environ, "PY": sys.executable}
    proc = subprocess.run(["make", "-s", "engine", "MODEL=ptb-opt-mini", f"ENGINE_ARGS=--build-dir {tmp_path}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "parity report PASS" in proc.stdout
    report = json.loads((tmp_path / "ptb-opt-mini" / "report" / "report.json").read_text())
    assert report["verdict"] == "pass" and report["accuracy"]["kv_ratio"] <= 0.7
    assert len(report["sweep"]) == 4                            # the mini recipe's perplexity-vs-ratio points
    assert report["accuracy"]["perplexity_folded"] < 1.05 * report["accuracy"]["perplexity_original"]


def test_a_stage_in_its_own_process_raises_its_error_here(tmp_path):
    """make engine runs each stage in a fresh process: a one-line error there is the same one-line error here."""
    from eigen_export.errors import EigenExportError
    from eigen_export.pipeline import isolated
    from eigen_export.stages.export import find_onnx_dir, run_export

    with pytest.raises(EigenExportError, match="is not a directory: export needs"):
        isolated(run_export, tmp_path / "nothing-here")
    with pytest.raises(EigenExportError, match="no ONNX export found for"):
        isolated(find_onnx_dir, tmp_path)


@pytest.mark.parametrize("kv_dtype", ["int8", "mixed"])
def test_engine_with_a_quantized_cache_from_the_recipe(tiny_llama_dir, tmp_path, capsys, kv_dtype):
    """[compress] kv_dtype = "int8" (or "mixed"): the fold records it, the graphs carry codes + fp16 scales,
    ONNX Runtime's parity with the quantized reference passes, and the report counts the scales in the cache
    bytes."""
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(source=tiny_llama_dir, kv_ratio=0.7).replace(
        "kv_ratio = 0.7", f'kv_ratio = 0.7\nkv_dtype = "{kv_dtype}"'))
    assert main(["engine", str(recipe), "--build-dir", str(tmp_path / "build"), "--no-baseline"]) == 0, \
        capsys.readouterr().err
    assert "parity report PASS" in capsys.readouterr().out
    root = tmp_path / "build" / "tiny"
    manifest = json.loads((root / "folded" / "eigen.json").read_text())
    assert (manifest["kv_dtype"], manifest["kv_rotation"]) == (kv_dtype, True)
    io = json.loads((root / "onnx" / "io.json").read_text())
    codes = {"int8": "int8", "mixed": "uint8"}[kv_dtype]
    assert io["kv_dtype"] == kv_dtype and {e["dtype"] for e in io["inputs"][3:]} == {codes, "float16"}
    assert io["kv_layout"] == manifest["kv_layout"] and (manifest["kv_layout"] is None) == (kv_dtype == "int8")
    report = json.loads((root / "report" / "report.json").read_text())
    h_kv = 1 if manifest["latents"] == "joint" else manifest["num_kv_heads"]      # the cache's heads
    layout = manifest["kv_layout"] or [[None, None]] * len(manifest["ranks"])
    assert report["memory"]["kv_bytes_per_token_compressed"] == sum(
        h_kv * (code_width(k, kv_dtype, ck) + code_width(v, kv_dtype, cv) + 4)
        for (k, v), (ck, cv) in zip(manifest["ranks"], layout))
    assert report["compression"]["kv_dtype"] == kv_dtype
    assert report["backends"]["onnxruntime"]["present_max_abs"] <= 1e-3
    assert "quantization_effect" in report["backends"]["onnxruntime"]


def test_the_stage_server_holds_no_gpu_runtime():
    """On Linux every stage forks from a server that imported the stage modules: they must not pull in a GPU
    runtime at import (TensorRT, Triton, ONNX Runtime) nor touch CUDA, whose state a fork cannot carry."""
    code = ("import sys, torch; from eigen_export.pipeline import _STAGE_MODULES\n"
            "for m in _STAGE_MODULES: __import__(m)\n"
            "print(sorted({k.split('.')[0] for k in sys.modules} & {'tensorrt', 'triton', 'onnxruntime', 'pycuda'}),"
            " torch.cuda.is_initialized())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["[]", "False"]
