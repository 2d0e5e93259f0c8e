"""Loading models: HF directories and hub ids as the reference Decoder, folded artifacts on top of that, and the
one-line errors a wrong path gives before any weights load."""
import pytest
import torch

from eigen_export import load
from eigen_export.artifacts.folded import load_uncompressed
from eigen_export.dtypes import dtype, resolve_dtype
from eigen_export.errors import EigenExportError
from eigen_export.loading import load_hf, load_hf_config, load_tokenizer
from tests.helpers.folds import write_tiny_folded
from tests.helpers.tiny_models import ptb_like_ids, tiny_hf_model


def test_hf_directory_loads_as_the_reference_decoder(tmp_path):
    hf = tiny_hf_model("llama-gqa")
    hf.save_pretrained(tmp_path / "hf")
    config, model = load_hf(tmp_path / "hf")
    d = model.spec.head_dim
    assert config.model_type == "llama" and model.spec.num_kv_heads == 2
    assert all((r.k, r.v) == (d, d) for r in model.ranks)
    ids = ptb_like_ids(2, 9)
    with torch.no_grad():
        assert (model(ids)[0] - hf(ids).logits).abs().max().item() <= 1e-4
    assert load(tmp_path / "hf", dtype="bf16").embed.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("path, message", [
    ("/etc", "cannot read a model config from '/etc'"),
    ("/no/such/model", "does not exist"),
])
def test_a_path_without_a_model_is_a_one_line_error(path, message):
    with pytest.raises(EigenExportError, match=message) as info:
        load_hf_config(path)
    assert "\n" not in str(info.value)


def test_missing_tokenizer_is_a_one_line_error(tmp_path):
    with pytest.raises(EigenExportError, match="no tokenizer in") as info:
        load_tokenizer(tmp_path)
    assert "\n" not in str(info.value)


def test_folded_artifact_loads_folded_and_is_refused_as_a_source(tmp_path):
    out, folded = write_tiny_folded(tmp_path)
    loaded = load(out)
    assert loaded.ranks == folded.ranks and loaded.rope_mode == "post"
    with pytest.raises(EigenExportError, match="already folded to low rank"):
        load_uncompressed(out)


def test_dtype_names():
    assert resolve_dtype("fp16") is resolve_dtype("float16") is torch.float16
    assert dtype(torch.bfloat16).short == "bf16" and dtype("float32").ort == "tensor(float)"
    with pytest.raises(EigenExportError, match="unknown dtype 'fp8'"):
        dtype("fp8")
