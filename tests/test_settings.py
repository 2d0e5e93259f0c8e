"""Settings (DESIGN 1, STYLE): recipes load into one frozen settings object per stage; every setting has one
default and one validation, done when the object is made; --set overrides; the CLI maps flags onto them."""
import json

import pytest

from eigen_export.errors import EigenExportError
from eigen_export.settings import (BuildSettings, CalibrationSettings, ExportSettings, FoldSettings, MergeSettings,
                                   ValidationSettings, find_recipe, load_recipe, override)


@pytest.mark.parametrize("text, message", [
    ("[validate]\nmax_pl_ratio = 1.2\n", r"unknown key\(s\) \['max_pl_ratio'\] in \[validate\]"),
    ("[validate]\nmin_top1 = 1.5\n", r"min_top1 must lie in \[0, 1\]"),
    ("[validate]\nlatency_contexts = []\n", "latency_contexts must be a non-empty list"),
    ("[validate]\nsweep = [1.2]\n", r"sweep ratios must lie in \(0, 1\)"),
    ("[engine]\nbackend = \"tensorrtt\"\n", "backend 'tensorrtt' is not one of auto, tensorrt, onnxruntime"),
    ("[calibration]\nnsamples = 0\n", "nsamples must be an integer >= 1, got 0"),
    ("[compress]\nkv_ratio = 0\n", r"kv_ratio 0 is outside \(0, 1\]"),
    ("[compress]\nrope_mode = \"mid\"\n", "rope_mode 'mid' is not one of pre, post"),
    ("[compress]\nlatents = \"shared\"\n", "latents 'shared' is not one of auto, heads, joint"),
    ("[compress]\nlatents = \"joint\"\nrope_mode = \"post\"\n", "--latents joint takes the loss basis, --rope-mode pre"),
    ("[compress]\nkv_dtype = \"int3\"\n", "kv_dtype 'int3' is not one of None, int8, int4, mixed"),
    ("[compress]\nkv_dtype = \"mixed\"\nkv_bits = 9\n", r"kv_bits 9 is outside \[2, 8\]"),
    ("[compress]\nkv_dtype = \"int8\"\nkv_bits = 4\n", "kv_bits applies to a mixed cache only"),
    ("[compress]\nkv_dtype = \"mixed\"\nkv_rotation = false\n", "--no-kv-rotation works with --kv-dtype int8 only"),
    ("[valdate]\nwindows = 2\n", r"unknown table \[valdate\]"),
])
def test_recipe_typos_and_ranges_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text('[model]\nsource = "x"\nfamily = "llama"\n' + text)
    with pytest.raises(EigenExportError, match=message) as info:
        load_recipe(path)
    assert "\n" not in str(info.value) and "bad.toml" in str(info.value)


def test_set_rejects_unknown_keys_and_bad_values():
    s = override(ValidationSettings(), ["max_kl=0.25", "latency_contexts=32,64"])
    assert s.max_kl == 0.25 and s.latency_contexts == (32, 64)
    with pytest.raises(EigenExportError, match="KEY one of"):
        override(ValidationSettings(), ["max_kll=1"])
    with pytest.raises(EigenExportError, match="is not a float"):
        override(ValidationSettings(), ["max_kl=high"])


# -- recipes --------------------------------------------------------------------------------------------------
BIG = ["opt-125m", "opt-1.3b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b", "llama-2-7b", "llama-2-13b",
       "llama-3-8b", "mistral-7b", "mpt-7b", "qwen2.5-7b"]


@pytest.mark.parametrize("name", BIG + ["smollm2-135m", "ptb-opt-mini", "ptb-llama-mini"])
def test_every_recipe_loads_and_is_complete(name):
    recipe = find_recipe(name)
    assert recipe.name == name and recipe.family in ("opt", "llama", "mpt")
    assert recipe.fold.kv_ratio is not None or recipe.fold.error_budget is not None
    if name in BIG:      # GPU recipes: hub ids, fp16 engines with fp16 parity limits
        assert "/" in recipe.source and recipe.export.dtype == "fp16" and recipe.calibration.dtype == "float16"
        assert recipe.fold.dtype == "float16" and recipe.calibration.rank_multiple == 16   # aligned cache rows
        assert recipe.validation.backend_max_abs > ValidationSettings().backend_max_abs


def test_hub_id_recipe_loads_through_the_hub_cache(tmp_path, monkeypatch, word_tokenizer):
    """`make engine MODEL=opt-125m` resolves facebook/opt-125m through huggingface_hub: a tiny OPT stored in
    a hub cache under that id stands in for the download (offline mode: nothing is fetched)."""
    from eigen_export.loading import load_hf
    from eigen_export.pipeline import check_family
    from tests.helpers.stages import calibrate
    from tests.helpers.tiny_models import tiny_hf_model

    recipe = find_recipe("opt-125m")
    snapshot = tmp_path / "hub" / "models--facebook--opt-125m" / "snapshots" / ("a" * 40)
    model = tiny_hf_model("opt")
    model.resize_token_embeddings(len(word_tokenizer), mean_resizing=False)
    model.save_pretrained(snapshot)
    word_tokenizer.save_pretrained(snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    source = recipe.resolved_source()
    assert source == "facebook/opt-125m"
    check_family(recipe, source)
    _, decoder = load_hf(source)
    assert decoder.spec.family == "opt" and decoder.spec.num_layers == 2
    out = calibrate(source, tmp_path / "calib", nsamples=2, seqlen=32)
    assert json.loads((out / "calib.json").read_text())["source"] == "facebook/opt-125m"
