"""The calibration pass on tiny models: deterministic, and the shared layer-by-layer pass."""
import torch

from eigen_export.loading import decoder_from_hf_model
from eigen_export.method.calibrate import calibrate
from eigen_export.method.capture import LayerPass
from eigen_export.stages.validate import layer_outputs
from tests.helpers.tiny_models import ptb_like_ids, tiny_hf_model


def test_calibration_is_deterministic():
    model = decoder_from_hf_model(tiny_hf_model("qwen2"))
    ids = ptb_like_ids(4, 24)
    first, second = (calibrate(model, ids, "post", progress=False) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a.basis_k, b.basis_k) and torch.equal(a.eig_v, b.eig_v) and a.curve == b.curve


def test_the_layer_pass_feeds_each_layer_the_original_outputs_of_the_layers_before():
    """LayerPass (shared by calibrate and merge-heads) reproduces the model's hidden states layer by layer, and
    its hooks see exactly the q/k/v projections of the batch just run."""
    model = decoder_from_hf_model(tiny_hf_model("llama-gqa"))
    ids = ptb_like_ids(5, 12)
    expected = layer_outputs(model, ids)
    data = LayerPass(model, ids, batch_size=2)
    seen = []
    with torch.no_grad():
        for block, want in zip(model.layers, expected):
            out = data.forward(block, lambda s, raw: seen.append((s, raw["k"].shape)))
            assert (out - want).abs().max().item() <= 1e-5
            data.advance(out)
    assert [s for s, _ in seen[:3]] == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert seen[0][1] == (2, 12, model.spec.num_kv_heads * model.spec.head_dim)
    assert not model.layers[0].attn.k._forward_hooks                     # the hooks are removed afterwards
