"""The parity report's pure metrics (method/metrics.py)."""
import pytest
import torch
import torch.nn.functional as F

from eigen_export.errors import EigenExportError
from eigen_export.method.metrics import chunked_logit_metrics, logit_metrics, next_token_nll, percentiles, \
    present_max_abs


def test_logit_metrics_by_hand():
    ref = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    test = torch.tensor([[[2.0, 0.5, 0.0], [0.0, 0.0, 1.0]]])
    m = logit_metrics(ref, test)
    assert m["max_abs"] == pytest.approx(1.0) and m["mean_abs"] == pytest.approx(2.5 / 6)
    assert m["top1"] == pytest.approx(0.5)                         # second position: argmax 1 vs 2
    assert m["cosine"] == pytest.approx(0.0)                       # [0,1,0] vs [0,0,1]
    p, q = torch.softmax(ref[0, 1], -1), torch.softmax(test[0, 1], -1)
    kl_second = (p * (p / q).log()).sum().item()
    p, q = torch.softmax(ref[0, 0], -1), torch.softmax(test[0, 0], -1)
    assert m["kl"] == pytest.approx(((p * (p / q).log()).sum().item() + kl_second) / 2, rel=1e-5)
    masked = logit_metrics(ref, test, torch.tensor([[True, False]]))
    assert masked["top1"] == 1.0 and masked["positions"] == 1 and masked["max_abs"] == pytest.approx(0.5)


def test_present_error_ignores_padding_positions():
    k = torch.zeros(2, 1, 3, 4)
    noisy = k.clone()
    noisy[0, :, 0] = 5.0                      # a left-padding slot: ignored
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert present_max_abs([(k, k)], [(noisy, k)], mask) == 0.0
    noisy[1, :, 0] = 0.25                     # a real token
    assert present_max_abs([(k, k)], [(noisy, k)], mask) == pytest.approx(0.25)
    with pytest.raises(EigenExportError, match="cache of shape"):
        present_max_abs([(k, k)], [(k[:, :, :2], k)], mask)


def test_percentiles():
    p = percentiles([5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    assert p["p50"] == 5.5 and p["p90"] == 9.0 and p["n"] == 10


def test_chunked_metrics_equal_the_whole():
    """Chunks of 3 over 10 positions (a ragged last chunk) give the numbers of one pass over all of them."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 10, 7, generator=g)
    test = ref + 0.3 * torch.randn(2, 10, 7, generator=g)
    whole, chunked = logit_metrics(ref, test), chunked_logit_metrics(ref, test, chunk=3)
    assert chunked["positions"] == whole["positions"] == 20
    for key in ("max_abs", "mean_abs", "cosine", "top1", "kl"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-5), key


def test_next_token_nll_equals_cross_entropy_of_the_shifted_logits():
    g = torch.Generator().manual_seed(1)
    logits, ids = torch.randn(2, 9, 5, generator=g), torch.randint(5, (2, 9), generator=g)
    nll, correct = next_token_nll(logits, ids, chunk=4)
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
    assert nll == pytest.approx(want, rel=1e-6)
    assert correct == (logits[:, :-1].argmax(-1) == ids[:, 1:]).sum().item()
    # the last position predicts nothing: logits without it give the same numbers
    assert next_token_nll(logits[:, :-1], ids, chunk=3) == (pytest.approx(nll, rel=1e-6), correct)
