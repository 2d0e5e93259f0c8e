"""Loading models: HF directories and hub ids as the reference Decoder, folded artifacts on top of that, and the
one-line errors a wrong path gives before any weights load."""
import pytest
import torch

from eigen_export import load
from eigen_export.artifacts.folded import load_uncompressed
from eigen_export.dtypes import dtype, resolve_dtype
from eigen_export.errors import EigenExportError
from eigen_export.loading import StreamedModel, decoder_from_hf_model, layer_of, load_hf, load_hf_config, \
    load_tokenizer
from eigen_export.method.calibrate import calibrate
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


# -- streaming from disk: one layer in memory at a time (issue 17) -----------------------------------------
@pytest.mark.parametrize("name", ["opt", "llama-gqa", "qwen2", "mpt", "gpt_neox"])
def test_streamed_layers_equal_the_model_loaded_whole(tmp_path, name):
    """Sharded safetensors (index + several files) read layer by layer give the weights, and the calibration,
    of the model loaded whole; the layers the streamed model holds are placeholders."""
    hf = tiny_hf_model(name)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) >= 2
    _, whole = load_hf(tmp_path / "hf")
    streamed = StreamedModel(tmp_path / "hf")
    assert all(p.is_meta for p in streamed.model.layers.parameters())
    globals_ = {k: v for k, v in whole.state_dict().items() if not k.startswith("layers.")}
    got = streamed.global_state()
    assert got.keys() == globals_.keys() and all(torch.equal(got[k], globals_[k]) for k in got)
    for i, layer in enumerate(whole.layers):
        got, want = streamed.layer_state(i), layer.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), i
    ids = ptb_like_ids(4, 24)
    mode = "pre" if whole.spec.positions == "rope" else None
    streamed.load_head()
    for a, b in zip(calibrate(whole, ids, mode, progress=False, error_samples=2),
                    calibrate(streamed.model, ids, mode, progress=False, error_samples=2, layer=streamed.block)):
        assert torch.equal(a.basis_k, b.basis_k) and torch.equal(a.down_v, b.down_v) and \
            torch.equal(a.cost_k, b.cost_k) and a.curve == b.curve


def test_a_bin_checkpoint_saved_from_the_base_model_streams(tmp_path):
    """facebook/opt-*: pytorch_model.bin whose names lack the `model.` prefix, head tied to the embedding."""
    hf = tiny_hf_model("opt")
    hf.config.save_pretrained(tmp_path)
    torch.save({k.removeprefix("model."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"},
               tmp_path / "pytorch_model.bin")
    whole, streamed = decoder_from_hf_model(hf), StreamedModel(tmp_path)
    assert all(torch.equal(v, whole.state_dict()[k]) for k, v in streamed.global_state().items())
    assert all(torch.equal(v, whole.layers[1].state_dict()[k]) for k, v in streamed.layer_state(1).items())


def test_a_damaged_checkpoint_is_a_one_line_error(tmp_path):
    hf = tiny_hf_model("llama-gqa")
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(EigenExportError, match="lacks the weight file model-00002") as info:
        StreamedModel(tmp_path)
    assert "\n" not in str(info.value)
    for weights in tmp_path.glob("model*"):
        weights.unlink()
    with pytest.raises(EigenExportError, match="no weights in"):
        StreamedModel(tmp_path)


def test_layer_of_names():
    assert [layer_of(n) for n in ("model.layers.12.mlp.up_proj.weight", "transformer.blocks.3.attn.Wqkv.weight",
                                  "model.decoder.embed_positions.weight", "lm_head.weight")] == [12, 3, None, None]

