"""`eigen-export engine` (what `make engine` runs) on a local model directory."""
import json

from eigen_export.cli import main


def test_engine_runs_every_stage_then_skips_current_ones(tiny_llama_dir, tmp_path, capsys):
    build = tmp_path / "build"
    assert main(["engine", str(tiny_llama_dir), "--build-dir", str(build)]) == 0
    out = capsys.readouterr().out
    root = build / "llama"
    summary = json.loads((root / "summary.json").read_text())
    assert summary["kv_ratio"] <= 0.7 and summary["perplexity_folded"] > 1
    assert "not built yet: build (TensorRT engine)" in out       # never pretends later stages exist
    stamps = {p: p.stat().st_mtime_ns for p in (root / "calib" / "calib.json", root / "folded" / "eigen.json",
                                                root / "onnx" / "model.onnx")}
    assert main(["engine", str(tiny_llama_dir), "--build-dir", str(build)]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps       # every stage skipped
    assert main(["engine", str(tiny_llama_dir), "--build-dir", str(build), "--force"]) == 0
    assert all(p.stat().st_mtime_ns > t for p, t in stamps.items())


def test_engine_rejects_unknown_model(tmp_path, capsys):
    assert main(["engine", "no-such-recipe", "--build-dir", str(tmp_path)]) == 2
    assert "neither a recipe" in capsys.readouterr().err
