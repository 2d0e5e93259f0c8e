"""SmolLM2-135M end to end: calibrate 16 x 256 PTB-train tokens, fold at kv-ratio 0.7, evaluate on PTB test."""
import pytest
import torch

import eigen_export
from eigen_export.artifacts.folded import Manifest

pytestmark = pytest.mark.slow

BASELINE_PPL = 66.95          # 8 x 512 PTB-test windows, fp32 (tests/test_assets.py measures it too)
# Measured for this fixture (16 x 256 calibration, rope post, kv-ratio 0.7, default loss bases and allocation):
# 86.45 (the paper's eigenbases and energy threshold gave 102.07). The bound leaves ~5% for platform float
# noise; a wrong fold or rank rule, or a fall back to the paper's method, lands above it.
FOLDED_PPL_BOUND = 91.0
# pre mode, same calibration size, kv-ratio 0.7, 8 windows: the default (loss bases, loss allocation) measured
# 69.54; the bound leaves ~5%.
PRE_DEFAULT_PPL_BOUND = 73.0


@pytest.fixture(scope="module")
def ptb_windows(smollm2_path):
    from transformers import AutoTokenizer

    from eigen_export.data import eval_windows

    return eval_windows(AutoTokenizer.from_pretrained(str(smollm2_path)), "ptb", 512, max_windows=8)


def test_folded_smollm2_keeps_perplexity_within_measured_bound(smollm2_path, smollm2_folded, ptb_windows):
    from eigen_export.backends import TorchBackend, perplexity

    manifest = Manifest.read(smollm2_folded)
    assert 0.68 <= manifest.kv_ratio <= 0.7
    folded = eigen_export.load(smollm2_folded)
    ppl = perplexity(TorchBackend(folded), ptb_windows)
    print(f"folded SmolLM2 at KV ratio {manifest.kv_ratio}: PTB-test perplexity {ppl:.3f}")
    assert ppl > BASELINE_PPL            # compression is not free: the fold really changed the model
    assert ppl <= FOLDED_PPL_BOUND, f"perplexity {ppl:.2f} above the measured bound {FOLDED_PPL_BOUND}"
    # the cache is really r_k / r_v wide, layer by layer
    _, presents = folded(ptb_windows[:1, :16])
    assert [[k.shape[-1], v.shape[-1]] for k, v in presents] == manifest.ranks
    assert all(k.shape[1] == 3 for k, _ in presents)


def test_loss_bases_and_allocation_beat_the_papers_eigenbases_at_equal_cache(smollm2_path, ptb_windows, tmp_path):
    """Issue 13 on the real model: at the same KV ratio (pre mode, the default), the default calibration (bases
    that keep the loss, ranks by loss cost) loses less perplexity than the paper's eigenbases with one energy
    threshold, each calibrated on the same 16 x 256 PTB-train tokens."""
    from eigen_export.backends import TorchBackend, perplexity
    from tests.helpers.stages import calibrate, fold

    ppl = {}
    for name, basis, allocation in (("default", "loss", "loss"), ("paper", "energy", "energy")):
        calibrate(smollm2_path, tmp_path / f"calib-{name}", nsamples=16, seqlen=256, basis=basis)
        manifest = fold(smollm2_path, tmp_path / f"calib-{name}", tmp_path / name, kv_ratio=0.7, allocation=allocation)
        assert 0.68 <= manifest.kv_ratio <= 0.7
        ppl[name] = perplexity(TorchBackend(eigen_export.load(tmp_path / name)), ptb_windows)
    print(f"SmolLM2 pre mode, KV ratio 0.7, 8 PTB-test windows: {ppl}")
    assert BASELINE_PPL < ppl["default"] <= PRE_DEFAULT_PPL_BOUND, ppl
    assert ppl["default"] < ppl["paper"] - 0.1 * (ppl["paper"] - BASELINE_PPL), ppl

