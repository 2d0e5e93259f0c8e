"""Folding on random tiny models of every family: exactness, monotone error, cache correctness, artifacts."""
import json

import pytest
import torch

from eigen_export.calibrate import calibrate
from eigen_export.errors import EigenExportError
from eigen_export.fold import MANIFEST, WEIGHTS, fold_state, load_folded, write_folded
from eigen_export.loading import build_decoder, decoder_from_hf_model
from eigen_export.modeling import LayerRanks
from eigen_export.runtime import TorchBackend, generate
from tiny_models import TINY, ptb_like_ids, tiny_hf_model


CASES = [(name, mode) for name in TINY for mode in (("pre", "post") if name not in ("opt", "opt-postnorm", "mpt")
                                                     else (None,))]


def _folded(name, mode, k_fraction, v_fraction=None):
    """(hf model, original Decoder, folded Decoder, folded state, ranks, calibration) of a tiny model."""
    hf = tiny_hf_model(name)
    model = decoder_from_hf_model(hf)
    layers = calibrate(model, ptb_like_ids(4, 24), mode, progress=False)
    d = model.spec.head_dim
    v_fraction = k_fraction if v_fraction is None else v_fraction
    ranks = [LayerRanks(max(1, int(d * k_fraction)), max(1, int(d * v_fraction)))] * model.spec.num_layers
    state = fold_state(model.state_dict(), [(c.basis_k, c.basis_v) for c in layers], ranks, model.spec, mode)
    return hf, model, build_decoder(hf.config, state, ranks, mode), state, ranks, layers


@pytest.mark.parametrize("name,mode", CASES)
def test_full_rank_fold_reproduces_original_logits(name, mode):
    _, model, folded, *_ = _folded(name, mode, 1.0)
    ids = ptb_like_ids(2, 20, seed=7)
    with torch.no_grad():
        assert (model(ids)[0] - folded(ids)[0]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name,mode", CASES)
def test_error_grows_as_rank_shrinks(name, mode):
    hf, model, _, _, _, layers = _folded(name, mode, 1.0)
    ids = ptb_like_ids(2, 20, seed=7)
    d = model.spec.head_dim
    errors = []
    for r in (d, 3 * d // 4, d // 2, d // 4):
        ranks = [LayerRanks(r, r)] * model.spec.num_layers
        folded = build_decoder(hf.config, fold_state(model.state_dict(), [(c.basis_k, c.basis_v) for c in layers],
                                                     ranks, model.spec, mode), ranks, mode)
        with torch.no_grad():
            errors.append((model(ids)[0] - folded(ids)[0]).norm().item())
    assert errors[0] < 1e-3 and all(a < b for a, b in zip(errors, errors[1:])), errors
    # the calibration curves record the same trend per layer
    for layer in layers:
        assert layer.curve[0].error < 1e-5 and layer.curve[-1].error > layer.curve[0].error


@pytest.mark.parametrize("name,mode", CASES)
def test_cached_generation_equals_full_recompute(name, mode):
    """16 greedy steps with the low-rank cache == recomputing the whole sequence each step (DESIGN 3.2)."""
    _, _, folded, _, ranks, _ = _folded(name, mode, 0.5, 0.75)   # r_k != r_v
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
    from eigen_export.modeling import default_position_ids
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
    # the cache really is r_k / r_v wide
    for (k, v), r in zip(past, ranks):
        assert k.shape[-1] == r.k and v.shape[-1] == r.v
        assert k.shape[2] == prompt.shape[1] + 15


def _write(tmp_path, name="llama-gqa", mode="post"):
    hf, model, folded, state, ranks, _ = _folded(name, mode, 0.5, 0.75)
    fields = dict(model_type=hf.config.model_type, family=model.spec.family, source="tiny", rope_mode=mode,
                  num_layers=model.spec.num_layers, num_heads=model.spec.num_heads,
                  num_kv_heads=model.spec.num_kv_heads, head_dim=model.spec.head_dim,
                  softmax_scale=model.spec.softmax_scale, ranks=[[r.k, r.v] for r in ranks], kv_ratio=0.5,
                  layer_errors=[0.0] * len(ranks), calibration={"dataset": "random"})
    out = tmp_path / "folded"
    write_folded(out, hf.config, state, fields)
    return out, folded


def test_folded_artifact_round_trips(tmp_path):
    out, folded = _write(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", MANIFEST, WEIGHTS]
    loaded = load_folded(out)
    ids = ptb_like_ids(2, 9)
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], folded(ids)[0])
    assert not list(tmp_path.glob(".folded.tmp-*"))


def test_manifest_rejects_unknown_keys_and_other_versions(tmp_path):
    out, _ = _write(tmp_path)
    data = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**data, "colour": "red"}))
    with pytest.raises(EigenExportError, match=r"unknown keys \['colour'\]"):
        load_folded(out)
    (out / MANIFEST).write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(EigenExportError, match="version 99"):
        load_folded(out)
    (out / MANIFEST).write_text(json.dumps({**data, "ranks": [[65, 8]] * data["num_layers"]}))
    with pytest.raises(EigenExportError, match="outside"):
        load_folded(out)


def test_weights_that_do_not_match_the_manifest_are_refused(tmp_path):
    out, _ = _write(tmp_path)
    raw = bytearray((out / WEIGHTS).read_bytes())
    raw[-1] ^= 0xFF
    (out / WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(EigenExportError, match="does not match the sha256"):
        load_folded(out)
    # a manifest claiming other ranks than the tensors have is named precisely (hash check off)
    out2, _ = _write(tmp_path / "b")
    data = json.loads((out2 / MANIFEST).read_text())
    data["ranks"][0] = [data["ranks"][0][0] - 1, data["ranks"][0][1]]
    (out2 / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(EigenExportError, match="do not match their manifest"):
        load_folded(out2, verify=False)


def test_existing_output_is_kept_without_force(tmp_path):
    out, _ = _write(tmp_path)
    before = (out / MANIFEST).read_text()
    with pytest.raises(EigenExportError, match="already exists"):
        _write(tmp_path)
    assert (out / MANIFEST).read_text() == before


def test_calibration_is_deterministic():
    model = decoder_from_hf_model(tiny_hf_model("qwen2"))
    ids = ptb_like_ids(4, 24)
    first, second = (calibrate(model, ids, "post", progress=False) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a.basis_k, b.basis_k) and torch.equal(a.eig_v, b.eig_v) and a.curve == b.curve
