"""The CLI end to end on a tiny local model, and each bad input's one-line error."""
import json
import subprocess
import sys

import pytest
import torch
import transformers as tf

from eigen_export import load
from eigen_export.cli import main
from eigen_export.artifacts.layout import MANIFEST
from tests.helpers.tiny_models import tiny_hf_model


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compress_perplexity_generate(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "build"
    code, stdout, _ = _run(capsys, "compress", tiny_llama_dir, "--out", out, "--nsamples", 4, "--seqlen", 32,
                           "--kv-ratio", 0.6, "--rope-mode", "pre")
    assert code == 0, stdout
    manifest = json.loads((out / "folded" / MANIFEST).read_text())
    assert manifest["kv_ratio"] <= 0.6 and manifest["rope_mode"] == "pre"
    assert manifest["calibration"]["nsamples"] == 4 and manifest["calibration"]["allocation"]["rule"] == "kv_ratio"
    code, stdout, _ = _run(capsys, "perplexity", out / "folded", "--seqlen", 32, "--max-windows", 3)
    assert code == 0
    result = json.loads(stdout)
    assert result["windows"] == 3 and result["perplexity"] > 1
    code, stdout, _ = _run(capsys, "generate", out / "folded", "--prompt", "the company said", "--max-new-tokens", 5)
    assert code == 0 and stdout.startswith("the company said")
    code, stdout, _ = _run(capsys, "generate", out / "folded", "--prompt", "the company", "--prompt", "a",
                           "--max-new-tokens", 4, "--temperature", 0.8, "--top-k", 5, "--top-p", 0.9)
    assert code == 0 and len(stdout.strip().splitlines()) == 2


def _error(capsys, *argv):
    code, _, err = _run(capsys, *argv)
    assert code == 2
    # progress bars may precede it; the error itself is exactly one line, and the last
    lines = [line for line in err.strip().splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err
    return lines[0]


def test_bad_inputs_get_one_line_errors(tiny_llama_dir, tmp_path, capsys):
    assert "does not exist" in _error(capsys, "calibrate", tmp_path / "nope", "--out", tmp_path / "c")
    calib = tmp_path / "calib"
    assert _run(capsys, "calibrate", tiny_llama_dir, "--out", calib, "--nsamples", 2, "--seqlen", 16)[0] == 0
    assert "outside (0, 1]" in _error(capsys, "fold", tiny_llama_dir, "--calib", calib, "--out", tmp_path / "f",
                                      "--kv-ratio", 1.5)
    assert "outside (0, 1]" in _error(capsys, "fold", tiny_llama_dir, "--calib", calib, "--out", tmp_path / "f",
                                      "--kv-ratio", 0)
    assert "already exists" in _error(capsys, "calibrate", tiny_llama_dir, "--out", calib)
    assert "run `eigen-export calibrate` first" in _error(capsys, "fold", tiny_llama_dir, "--calib", tmp_path / "none",
                                                          "--out", tmp_path / "f")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty" in _error(capsys, "calibrate", tiny_llama_dir, "--out", tmp_path / "c2", "--dataset", empty)
    short = tmp_path / "short.txt"
    short.write_text("the company said it would sell\n")
    assert "lower --nsamples" in _error(capsys, "calibrate", tiny_llama_dir, "--out", tmp_path / "c3", "--dataset", short)
    assert not (tmp_path / "c2").exists() and not (tmp_path / "c3").exists()


def test_unsupported_architecture_and_missing_weights(tmp_path, capsys):
    bloom = tmp_path / "bloom"
    tf.BloomConfig(n_layer=1, hidden_size=32, n_head=2, vocab_size=50).save_pretrained(bloom)
    assert "unsupported model_type 'bloom'" in _error(capsys, "calibrate", bloom, "--out", tmp_path / "c")
    no_weights = tmp_path / "noweights"
    tiny_hf_model("opt").config.save_pretrained(no_weights)
    assert "model.safetensors" in _error(capsys, "calibrate", no_weights, "--out", tmp_path / "c")


def test_rank_above_head_dim_is_refused():
    from eigen_export.errors import EigenExportError
    from eigen_export.loading import decoder_from_hf_model
    from eigen_export.modeling import Decoder, LayerRanks

    model = decoder_from_hf_model(tiny_hf_model("opt"))
    with pytest.raises(EigenExportError, match=r"must lie in \[1, head_dim=16\]"):
        Decoder(model.spec, [LayerRanks(17, 8)] * 2, None, model.state_dict())


def test_help_imports_no_optional_or_model_library():
    """--help loads the package (torch: its modules import each other at the top, DESIGN 2) but none of the
    optional heavy libraries nor transformers: those load inside the stage that needs them."""
    code = ("import sys; from eigen_export.cli import build_parser; build_parser(); "
            "print(any(m in sys.modules for m in ('transformers', 'onnx', 'onnxruntime', 'onnxscript', "
            "'tensorrt', 'triton', 'matplotlib', 'safetensors')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("argv, message", [
    (["perplexity", "/etc"], "cannot read a model config from '/etc'"),
    (["generate", "/tmp", "--prompt", "hi"], "cannot read a model config from '/tmp'"),
    (["compress", "smollm2-135m", "--kv-ratio", "0", "--out", "x"], r"kv_ratio 0.0 is outside (0, 1]"),
    (["calibrate", "smollm2-135m", "--nsamples", "0", "--out", "x"], "nsamples must be an integer >= 1, got 0"),
    (["merge-heads", "smollm2-135m", "--kv-heads", "1", "--merge-method", "median", "--out", "x"],
     "--merge-method 'median' is unknown"),
    (["export", "smollm2-135m", "--opset", "12"], "opset 12 is below 18"),
    (["build", "smollm2-135m", "--max-batch", "0"], "max_batch must be an integer >= 1, got 0"),
])
def test_bad_input_fails_before_any_model_or_text_is_loaded(argv, message, capsys, monkeypatch, tmp_path):
    """A directory without a model, or a setting out of range, is a one-line error (exit 2) before any weights,
    tokenizer or text load: settings are checked when made, model directories before their weights."""
    import eigen_export.cli as cli

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the bad input was refused")

    for name in ("load_model", "load_tokenizer", "eval_windows", "run_calibrate", "run_fold", "run_merge",
                 "run_export", "run_build", "resolve_model"):
        if message.startswith("cannot read") and name == "resolve_model":
            continue                    # a directory resolves to itself; its config is read before anything else
        monkeypatch.setattr(cli, name, refuse)
    monkeypatch.chdir(tmp_path)
    assert message in _error(capsys, *argv)
    assert not (tmp_path / "x").exists()


def test_fold_with_a_mixed_width_cache(tiny_llama_dir, tmp_path, capsys):
    """`fold --kv-dtype mixed --kv-bits 3`: eigen.json records the widths of every layer's keys and values, at
    most 3 bits per number on average, and the folded model runs with them."""
    calib = tmp_path / "calib"
    assert _run(capsys, "calibrate", tiny_llama_dir, "--out", calib, "--nsamples", 2, "--seqlen", 16)[0] == 0
    folded = tmp_path / "folded"
    code, stdout, _ = _run(capsys, "fold", tiny_llama_dir, "--calib", calib, "--out", folded, "--kv-ratio", 0.6,
                           "--kv-dtype", "mixed", "--kv-bits", 3)
    assert code == 0, stdout
    manifest = json.loads((folded / MANIFEST).read_text())
    assert manifest["kv_dtype"] == "mixed" and manifest["calibration"]["allocation"]["kv_bits"] == 3
    counts = [side for layer in manifest["kv_layout"] for side in layer]
    assert [[sum(c) for c in layer] for layer in manifest["kv_layout"]] == manifest["ranks"]
    assert sum(8 * a + 4 * b + 2 * c for a, b, c in counts) <= 3 * sum(map(sum, counts))
    code, stdout, _ = _run(capsys, "perplexity", folded, "--seqlen", 16, "--max-windows", 2)
    assert code == 0 and json.loads(stdout)["perplexity"] > 1


def test_calibrate_and_fold_with_joint_latents(tiny_llama_dir, tmp_path, capsys):
    """`calibrate --latents joint` then `fold`: one basis per layer side over both KV heads, ranks up to 2 x
    head_dim, recorded in calib.json and eigen.json; the folded model loads with a one-head cache of those widths
    and runs. Combinations it cannot take are refused before anything is written."""
    calib = tmp_path / "calib"
    assert "--latents joint takes the loss basis, --rope-mode pre" in _error(
        capsys, "calibrate", tiny_llama_dir, "--out", calib, "--latents", "joint", "--rope-mode", "post")
    assert not calib.exists()
    assert _run(capsys, "calibrate", tiny_llama_dir, "--out", calib, "--nsamples", 2, "--seqlen", 16,
                "--latents", "joint")[0] == 0
    assert json.loads((calib / "calib.json").read_text())["latents"] == "joint"
    folded = tmp_path / "folded"
    code, stdout, _ = _run(capsys, "fold", tiny_llama_dir, "--calib", calib, "--out", folded, "--kv-ratio", 0.6)
    assert code == 0, stdout
    manifest = json.loads((folded / MANIFEST).read_text())
    d, h_kv = manifest["head_dim"], manifest["num_kv_heads"]
    assert manifest["latents"] == "joint" and h_kv == 2
    cached = sum(map(sum, manifest["ranks"]))
    assert manifest["kv_ratio"] == pytest.approx(cached / (len(manifest["ranks"]) * 2 * h_kv * d), abs=1e-6)
    assert manifest["kv_ratio"] <= 0.6 and all(1 <= r <= h_kv * d for pair in manifest["ranks"] for r in pair)
    model = load(folded)
    with torch.no_grad():
        _, presents = model(torch.ones(1, 5, dtype=torch.long))
    assert [tuple(t.shape) for t in presents[0]] == [(1, 1, 5, r) for r in manifest["ranks"][0]]
    code, stdout, _ = _run(capsys, "perplexity", folded, "--seqlen", 16, "--max-windows", 2)
    assert code == 0 and json.loads(stdout)["perplexity"] > 1


def test_fold_with_a_quantized_cache(tiny_llama_dir, tmp_path, capsys):
    """`fold --kv-dtype int4`: recorded in eigen.json, and the folded model runs with codes; int4 without the
    rotation is refused before anything is written (its mid-rise codes need it), int8 takes --no-kv-rotation."""
    calib = tmp_path / "calib"
    assert _run(capsys, "calibrate", tiny_llama_dir, "--out", calib, "--nsamples", 2, "--seqlen", 16)[0] == 0
    folded = tmp_path / "folded"
    assert "works with --kv-dtype int8 only" in _error(capsys, "fold", tiny_llama_dir, "--calib", calib, "--out",
                                                       folded, "--kv-ratio", 0.6, "--kv-dtype", "int4",
                                                       "--no-kv-rotation")
    assert not folded.exists()
    code, stdout, _ = _run(capsys, "fold", tiny_llama_dir, "--calib", calib, "--out", tmp_path / "int8",
                           "--kv-ratio", 0.6, "--kv-dtype", "int8", "--no-kv-rotation")
    assert code == 0 and json.loads((tmp_path / "int8" / MANIFEST).read_text())["kv_rotation"] is False, stdout
    code, stdout, _ = _run(capsys, "fold", tiny_llama_dir, "--calib", calib, "--out", folded, "--kv-ratio", 0.6,
                           "--kv-dtype", "int4")
    assert code == 0, stdout
    manifest = json.loads((folded / MANIFEST).read_text())
    assert (manifest["kv_dtype"], manifest["kv_rotation"]) == ("int4", True)
    assert manifest["calibration"]["allocation"]["kv_dtype"] == "int4"
    code, stdout, _ = _run(capsys, "perplexity", folded, "--seqlen", 16, "--max-windows", 2)
    assert code == 0 and json.loads(stdout)["perplexity"] > 1
    # the same fold without --kv-dtype is another fold: refused without --force, made with it
    assert "already exists" in _error(capsys, "fold", tiny_llama_dir, "--calib", calib, "--out", folded,
                                      "--kv-ratio", 0.6)
