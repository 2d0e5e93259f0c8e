"""Folding on random tiny models of every family: exactness, monotone error, cache correctness."""
import pytest
import torch

from eigen_export.backends import TorchBackend, generate
from eigen_export.loading import build_decoder
from eigen_export.method.fold import fold_state
from eigen_export.modeling import LayerRanks, default_position_ids
from eigen_export_plugins.lowrank_attention.kv_codec import code_width
from tests.helpers.folds import ALL_CASES, CASES, tiny_fold
from tests.helpers.tiny_models import ptb_like_ids, tiny_hf_model


@pytest.mark.parametrize("name,mode,latents", ALL_CASES)
def test_full_rank_fold_reproduces_original_logits(name, mode, latents):
    _, model, folded, *_ = tiny_fold(name, mode, 1.0, latents=latents)
    ids = ptb_like_ids(2, 20, seed=7)
    with torch.no_grad():
        assert (model(ids)[0] - folded(ids)[0]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name,mode", CASES)
def test_error_grows_as_rank_shrinks(name, mode):
    hf, model, _, _, _, layers = tiny_fold(name, mode, 1.0)
    ids = ptb_like_ids(2, 20, seed=7)
    d = model.spec.head_dim
    errors = []
    for r in (d, 3 * d // 4, d // 2, d // 4):
        ranks = [LayerRanks(r, r)] * model.spec.num_layers
        folded = build_decoder(hf.config, fold_state(model.state_dict(), [c.projections() for c in layers],
                                                     ranks, model.spec, mode), ranks, mode)
        with torch.no_grad():
            errors.append((model(ids)[0] - folded(ids)[0]).norm().item())
    assert errors[0] < 1e-3 and all(a < b for a, b in zip(errors, errors[1:])), errors
    # the calibration curves record the same trend per layer
    for layer in layers:
        assert layer.curve[0].error < 1e-5 and layer.curve[-1].error > layer.curve[0].error


@pytest.mark.parametrize("name,mode,latents", ALL_CASES)
def test_cached_generation_equals_full_recompute(name, mode, latents):
    """16 greedy steps with the low-rank cache == recomputing the whole sequence each step (DESIGN 3.2)."""
    _, _, folded, _, ranks, _ = tiny_fold(name, mode, 0.5, 0.75, latents=latents)   # r_k != r_v
    backend = TorchBackend(folded)
    prompt = ptb_like_ids(2, 7, seed=3)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0                       # left padding
    steps = []
    tokens = generate(backend, prompt, mask, max_new_tokens=16, on_token=lambda t: steps.append(t))
    assert tokens.shape == (2, 16)
    # replay: logits of each cached step against a fresh forward over prompt + tokens so far
    cached_logits = []
    past = None
    ids, m = prompt, mask
    pos = default_position_ids(m, 0)
    with torch.no_grad():
        logits, past = folded(ids, m, pos, None)
        cached_logits.append(logits[:, -1])
        for t in range(15):
            pos = pos[:, -1:] + 1
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
            logits, past = folded(tokens[:, t:t + 1], m, pos, past)
            cached_logits.append(logits[:, -1])
        for t in range(16):
            full_ids = torch.cat([prompt, tokens[:, :t]], 1)
            full_mask = torch.cat([mask, torch.ones_like(tokens[:, :t])], 1)
            full = folded(full_ids, full_mask)[0][:, -1]
            assert (full - cached_logits[t]).abs().max().item() <= 1e-4, f"step {t}"
            assert torch.equal(full.argmax(-1), tokens[:, t])
    # the cache really is r_k / r_v wide, one head for a joint latent
    heads = 1 if latents == "joint" else folded.spec.num_kv_heads
    for (k, v), r in zip(past, ranks):
        assert k.shape[-1] == r.k and v.shape[-1] == r.v and k.shape[1] == v.shape[1] == heads
        assert k.shape[2] == prompt.shape[1] + 15


@pytest.mark.parametrize("mode,latents", [("pre", "heads"), ("post", "heads"), ("pre", "joint")])
def test_cached_decoding_equals_recompute_past_2048_positions(mode, latents):
    """A tiny Llama with a 4096-token context, decoding at positions 2090..2097: the cached steps equal a full
    recompute there too (the post basis is fitted to every position up to the max context, not to where the
    calibration windows sat)."""
    from eigen_export.loading import decoder_from_hf_model
    from eigen_export.method.calibrate import calibrate

    hf = tiny_hf_model("llama-gqa", max_position_embeddings=4096)
    model = decoder_from_hf_model(hf)
    joint = latents == "joint"
    layers = calibrate(model, ptb_like_ids(4, 24), mode, progress=False, joint_heads=joint)
    ranks = [LayerRanks(8, 12)] * model.spec.num_layers
    spec = model.spec.replace(joint_latents=joint)
    folded = build_decoder(hf.config, fold_state(model.state_dict(), [c.projections() for c in layers], ranks,
                                              spec, mode), ranks, mode, latents=latents)
    ids = ptb_like_ids(1, 2098, seed=5)
    with torch.no_grad():
        full = folded(ids)[0]
        logits, past = folded(ids[:, :2090])
        steps = [logits[:, -1]]
        for t in range(2090, 2097):
            mask = torch.ones(1, t + 1, dtype=torch.long)
            logits, past = folded(ids[:, t:t + 1], mask, torch.tensor([[t]]), past)
            steps.append(logits[:, -1])
    assert past[0][0].shape == (1, 1 if joint else 2, 2097, 8)
    for t, step in zip(range(2089, 2097), steps):
        assert (full[:, t] - step).abs().max().item() <= 1e-4, f"position {t}"


@pytest.mark.parametrize("kv_dtype", ["int8", "int4", "mixed"])
@pytest.mark.parametrize("name,mode,latents", [("llama-gqa", "pre", "heads"), ("llama-gqa", "post", "heads"),
                                               ("opt", None, "heads"), ("gpt_neox", "pre", "heads"),
                                               ("mpt", None, "heads"), ("llama-gqa", "pre", "joint"),
                                               ("opt", None, "joint")])
def test_quantized_cache_decoding_equals_recompute(name, mode, latents, kv_dtype):
    """Prefill + cached steps == recomputing everything, with the cache stored as codes + scales: every key and
    value is read through the quantized cache, the prefill's own chunk too, and a token's codes do not depend
    on its neighbours. In float64, so that no rounding boundary can sit between the two computations of a
    projection (in fp32 a code flips by one step once in ~10^5 values: the rule holds, the arithmetic wobbles)."""
    _, _, folded, _, ranks, _ = tiny_fold(name, mode, 0.5, 0.75, kv_dtype=kv_dtype, rotate=True, latents=latents)
    folded = folded.double()
    ids = ptb_like_ids(2, 14, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        full = folded(ids, mask)[0]
        logits, past = folded(ids[:, :9], mask[:, :9])
        steps = [logits[:, -1]]
        for t in range(9, 13):
            logits, past = folded(ids[:, t:t + 1], mask[:, :t + 1], default_position_ids(mask[:, :t + 1], t), past)
            steps.append(logits[:, -1])
    for t, step in zip(range(8, 13), steps):
        assert (full[:, t] - step).abs().max().item() <= 1e-9, f"position {t}"
    key, value, key_scale, value_scale = past[0]
    width = code_width(ranks[0].k, kv_dtype, folded.layers[0].attn.counts[0])
    assert width == {"int8": ranks[0].k, "int4": (ranks[0].k + 1) // 2}.get(kv_dtype, width)
    assert key.shape == (2, folded.spec.cache_heads, 13, width) and key_scale.shape == (2, key.shape[1], 13, 1)
    assert key.dtype == (torch.int8 if kv_dtype == "int8" else torch.uint8) and value_scale.dtype == torch.float16
    if kv_dtype == "mixed":         # the tiny spectra give more than one width somewhere
        assert any(sum(n > 0 for n in side) > 1 for layer in folded.kv_layout for side in layer), folded.kv_layout


@pytest.mark.parametrize("name,mode", [("llama-gqa", "pre"), ("llama-gqa", "post"), ("opt", None)])
@pytest.mark.parametrize("kv_dtype", [None, "mixed"])
def test_the_folded_rotation_leaves_the_model_unchanged(name, mode, kv_dtype):
    """U -> U R, A -> R^T A: a float cache holds rotated latents and the logits do not move; nor do they with
    a mixed cache's transform (rotated and scaled run by run, decompose.group_transform) in front of a float
    cache."""
    _, _, plain, *_ = tiny_fold(name, mode, 0.5, 0.75)
    _, _, rotated, _, ranks, _ = tiny_fold(name, mode, 0.5, 0.75, rotate=True, kv_dtype=kv_dtype)
    ids = ptb_like_ids(2, 12)
    with torch.no_grad(), rotated.cache_format(None):
        a, past_a = plain(ids)
        b, past_b = rotated(ids)
    assert (a - b).abs().max().item() <= 1e-4
    assert not torch.allclose(past_a[0][1], past_b[0][1], atol=1e-3)       # the cached latents did turn


@pytest.mark.parametrize("name,mode", [("llama-gqa", "pre"), ("opt", None)])
def test_loss_basis_latents_are_balanced_to_the_size_of_their_vectors(name, mode):
    """The loss bases make latents W^T G^1/2 x, as small as the loss gradient; the fold rescales each head's latent
    map and its inverse (decompose.balance) so that a cached latent is about as large as the vector it encodes
    (an fp16 cache or an int8 scale would otherwise sit among fp16's subnormals). Same model function."""
    from eigen_export.method.decompose import balance

    _, model, folded, _, ranks, layers = tiny_fold(name, mode, 0.75)
    ids = ptb_like_ids(2, 16)
    with torch.no_grad():
        full = model(ids)[1]
        cached = folded(ids)[1]
    for (k, v), (k_lat, v_lat) in zip(full, cached):
        for x, lat in ((k, k_lat), (v, v_lat)):
            ratio = (lat.pow(2).mean() / x.pow(2).mean()).sqrt().item()
            assert 0.3 < ratio < 3, ratio
    up, down = layers[0].basis_v[..., :4], layers[0].down_v[..., :4]
    b_up, b_down = balance(up, down)
    assert torch.allclose(b_up @ b_down.transpose(-1, -2), up.double() @ down.double().transpose(-1, -2))
    assert torch.allclose(b_up.flatten(-2).norm(dim=-1), b_down.flatten(-2).norm(dim=-1))
