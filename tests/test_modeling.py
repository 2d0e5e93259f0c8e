"""The reference Decoder reproduces each family's transformers implementation."""
import pytest
import torch

from eigen_export.errors import EigenExportError
from eigen_export.families import REGISTRY, get_adapter
from eigen_export.loading import decoder_from_hf_model
from tests.helpers.tiny_models import TINY, ptb_like_ids, tiny_hf_model


def test_every_supported_model_type_has_a_tiny_model():
    covered = {tiny_hf_model(name).config.model_type for name in TINY}
    assert set(REGISTRY) <= covered, f"model types without a tiny test model: {set(REGISTRY) - covered}"


@pytest.mark.parametrize("name", TINY)
def test_decoder_matches_transformers_with_left_padding(name):
    hf = tiny_hf_model(name)
    ours = decoder_from_hf_model(hf)
    ids = ptb_like_ids(3, 14)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :1] = 0
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got, presents = ours(ids, mask)
    real = mask.bool()
    assert (expected - got)[real].abs().max().item() < 1e-4
    assert len(presents) == ours.spec.num_layers
    assert presents[0][0].shape == (3, ours.spec.num_kv_heads, 14, ours.spec.head_dim)


def test_unsupported_model_type_lists_supported_ones():
    with pytest.raises(EigenExportError, match="unsupported model_type 'bloom'.*llama.*opt"):
        get_adapter("bloom")


def test_wrong_mask_shape_is_named():
    ours = decoder_from_hf_model(tiny_hf_model("opt"))
    with pytest.raises(EigenExportError, match=r"attention_mask has shape \(1, 3\), expected \(1, 5\)"):
        ours(ptb_like_ids(1, 5), torch.ones(1, 3, dtype=torch.long))
