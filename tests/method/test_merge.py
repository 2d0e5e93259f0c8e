"""KV-head merging (DESIGN 3.4): exactness where the caches allow it, RoPE commutation, stock loading, baselines."""
import json

import pytest
import torch
import transformers as tf

from eigen_export.cli import main
from eigen_export.errors import EigenExportError
from eigen_export.families import ModelSpec
from eigen_export.artifacts.layout import MANIFEST
from eigen_export.artifacts.folded import load_folded
from eigen_export.loading import decoder_from_hf_model
from eigen_export import load
from eigen_export.artifacts.layout import MERGE_JSON
from eigen_export.method.merge import (check_kv_heads, group_grams, mean_map, merge_state, pca_map, relative_residual,
                                       rope_pairs, rope_pca_map)
from eigen_export.artifacts.merged import read_merge_record, write_merged
from eigen_export.modeling import Decoder, default_position_ids, rotate
from eigen_export.backends import TorchBackend, generate
from tests.helpers.tiny_models import ptb_like_ids, tiny_hf_model

# tiny model, target KV heads: non-RoPE MHA with biases (OPT), ALiBi (MPT), RoPE GQA 4/2 (Llama), RoPE with
# q/k/v biases 6/2 (Qwen2), partial rotary (GPT-NeoX), and interleaved RoPE pairs (Llama weights, other layout)
CASES = [("opt", 2), ("mpt", 1), ("llama-gqa", 1), ("qwen2", 1), ("gpt_neox", 2), ("llama-gqa-interleaved", 1)]


def _decoder(name):
    """An uncompressed reference Decoder of a tiny model; "-interleaved" swaps in interleaved RoPE pairs."""
    model = decoder_from_hf_model(tiny_hf_model(name.removesuffix("-interleaved")))
    if name.endswith("-interleaved"):
        model = _rebuild(model, model.state_dict(), model.spec.replace(rope_layout="interleaved"))
    return model


def _rebuild(model: Decoder, state, spec: ModelSpec) -> Decoder:
    rope = spec.positions == "rope"
    return Decoder(spec, None, None, state, inv_freq=model.inv_freq if rope else None,
                   rope_scaling=model.rope_scaling if rope else 1.0).eval()


def _rope_commuting(spec: ModelSpec, gen) -> torch.Tensor:
    """A d x d map made of one random complex scalar per RoPE pair (+ any map on non-rotary dims)."""
    d, r = spec.head_dim, spec.rope_dim
    m = torch.zeros(d, d)
    x, y = rope_pairs(r, spec.rope_layout)
    a, b = torch.randn(2, r // 2, generator=gen)
    m[x, x], m[x, y], m[y, x], m[y, y] = a, -b, b, a
    m[r:, r:] = torch.randn(d - r, d - r, generator=gen)
    return m


def _structured(model: Decoder, kv_heads: int, noise: float = 0.0, seed: int = 0) -> Decoder:
    """Each merge group's K/V heads (weights and biases) = a map of the group's first head (+ noise).

    The maps are arbitrary for values and non-RoPE keys (group cache rank <= d) and RoPE-commuting for RoPE
    keys (heads differ by per-frequency complex scalars): the two cases where the merge is exact.
    """
    spec, gen = model.spec, torch.Generator().manual_seed(seed)
    d, h_kv = spec.head_dim, spec.num_kv_heads
    group = h_kv // kv_heads
    state = dict(model.state_dict())
    for i in range(spec.num_layers):
        for name in "kv":
            w = state[f"layers.{i}.attn.{name}.weight"]
            bias = state.get(f"layers.{i}.attn.{name}.bias")
            rows = torch.cat([w, bias[:, None]], 1) if bias is not None else w.clone()
            rows = rows.reshape(h_kv, d, -1)                                     # [H_kv, d, D(+1)]
            for head in range(h_kv):
                if head % group:
                    base = rows[head - head % group]
                    m = _rope_commuting(spec, gen) if name == "k" and spec.positions == "rope" else \
                        torch.randn(d, d, generator=gen) / d**0.5
                    rows[head] = m @ base + noise * base.std() * torch.randn(base.shape, generator=gen)
            rows = rows.reshape(h_kv * d, -1)
            state[f"layers.{i}.attn.{name}.weight"] = rows[:, : w.shape[1]].contiguous()
            if bias is not None:
                state[f"layers.{i}.attn.{name}.bias"] = rows[:, -1].contiguous()
    return _rebuild(model, state, spec)


def _merge(model: Decoder, kv_heads: int, method: str = "svd"):
    grams = group_grams(model, ptb_like_ids(4, 24), kv_heads, progress=False)
    state, errors = merge_state(model.state_dict(), grams, model.spec, kv_heads, method)
    return _rebuild(model, state, model.spec.replace(num_kv_heads=kv_heads)), state, errors


def _logit_error(a: Decoder, b: Decoder) -> float:
    ids = ptb_like_ids(2, 20, seed=7)
    with torch.no_grad():
        return (a(ids)[0] - b(ids)[0]).abs().max().item()


def _assert_cache_matches_recompute(model: Decoder, steps: int = 8) -> None:
    """Decoding with the merged cache == a full forward over prompt + tokens so far (as tests/method/test_fold.py)."""
    prompt = ptb_like_ids(2, 7, seed=3)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0                                           # left padding
    tokens = generate(TorchBackend(model), prompt, mask, max_new_tokens=steps)
    with torch.no_grad():
        pos = default_position_ids(mask, 0)
        logits, past = model(prompt, mask, pos, None)
        m = mask
        for t in range(steps):
            full = model(torch.cat([prompt, tokens[:, :t]], 1), torch.cat([mask, torch.ones_like(tokens[:, :t])], 1))
            assert (full[0][:, -1] - logits[:, -1]).abs().max().item() <= 1e-4, f"step {t}"
            assert torch.equal(full[0][:, -1].argmax(-1), tokens[:, t])
            pos, m = pos[:, -1:] + 1, torch.cat([m, torch.ones_like(m[:, :1])], 1)
            logits, past = model(tokens[:, t:t + 1], m, pos, past)
    assert past[0][0].shape[1] == model.spec.num_kv_heads


# -- the math ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout,rope_dim", [("half", 8), ("interleaved", 8), ("half", 4), ("interleaved", 6)])
def test_rope_fold_commutes_with_every_rotation(layout, rope_dim):
    d, g, n = 8, 3, 2
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(500, n, g * d, dtype=torch.float64, generator=gen) @ torch.randn(g * d, g * d, dtype=torch.float64, generator=gen)
    gram = torch.einsum("tni,tnj->nij", keys, keys)
    angles = torch.rand(1, 1, 5, rope_dim // 2, generator=gen, dtype=torch.float64) * 50
    emb = torch.cat([angles, angles], -1) if layout == "half" else angles.repeat_interleave(2, -1)
    cos, sin = emb.cos(), emb.sin()

    def rot(x):                                              # x [n, 5, d]
        return rotate(x[None], cos, sin, rope_dim, layout)[0]

    def commutes(m):
        up = m.up.reshape(n, g, d, d)
        k_new = torch.randn(n, 5, d, dtype=torch.float64, generator=gen)
        k_grp = torch.randn(n, 5, g, d, dtype=torch.float64, generator=gen)
        read_back = all(torch.allclose(rot(k_new @ up[:, j].transpose(-1, -2)), rot(k_new) @ up[:, j].transpose(-1, -2))
                        for j in range(g))
        rotated_grp = torch.stack([rot(k_grp[:, :, j]) for j in range(g)], 2).flatten(-2)
        merged = torch.allclose(rot(k_grp.flatten(-2) @ m.down), rotated_grp @ m.down)
        return read_back and merged

    m = rope_pca_map(gram, d, rope_dim, layout)
    assert torch.allclose(m.down.transpose(-1, -2) @ m.down, torch.eye(d, dtype=torch.float64).expand(n, d, d))
    assert commutes(m)
    assert not commutes(pca_map(gram, d))                    # the unconstrained fold would break RoPE
    # constrained, it still fits the cache better than mean pooling, and worse than the unconstrained optimum
    assert relative_residual(gram, pca_map(gram, d)) < relative_residual(gram, m) < \
        relative_residual(gram, mean_map(n, g, d))


# -- exactness -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kv_heads", CASES)
def test_merge_is_exact_where_the_caches_allow(name, kv_heads):
    model = _structured(_decoder(name), kv_heads)
    merged, _, errors = _merge(model, kv_heads)
    assert merged.spec.num_kv_heads == kv_heads
    assert max(max(e["key"], e["value"]) for e in errors) < 1e-5
    assert _logit_error(model, merged) <= 1e-4
    _assert_cache_matches_recompute(merged)


@pytest.mark.parametrize("name,kv_heads", [("opt", 2), ("llama-gqa", 1), ("gpt_neox", 2)])
def test_svd_merge_beats_mean_pool(name, kv_heads):
    model = _structured(_decoder(name), kv_heads, noise=0.3, seed=1)
    svd, _, svd_errors = _merge(model, kv_heads, "svd")
    mean, _, mean_errors = _merge(model, kv_heads, "mean")
    for s, m in zip(svd_errors, mean_errors):
        assert s["key"] < m["key"] and s["value"] < m["value"]
    assert _logit_error(model, svd) < 0.5 * _logit_error(model, mean)


# -- artifacts -----------------------------------------------------------------------------------------------

def _record(model, kv_heads, errors):
    return {"source": "tiny", "kv_heads_before": model.spec.num_kv_heads, "kv_heads": kv_heads, "layers": errors}


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2"])
def test_merged_llama_like_loads_in_stock_transformers(tmp_path, name):
    hf = tiny_hf_model(name)
    model = decoder_from_hf_model(hf)
    merged, state, errors = _merge(model, 1)
    out = write_merged(tmp_path / "merged", hf.config, merged.spec, state, _record(model, 1, errors))
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 1
    assert read_merge_record(out)["kv_heads"] == 1
    stock = tf.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = ptb_like_ids(3, 14)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask).logits
        ours = merged(ids, mask)[0]
        reloaded = load(out)(ids, mask)[0]
    real = mask.bool()
    assert (expected - ours)[real].abs().max().item() <= 1e-4
    assert (reloaded - ours)[real].abs().max().item() <= 1e-5


def test_non_gqa_family_becomes_a_full_rank_artifact(tmp_path):
    hf = tiny_hf_model("opt")
    model = decoder_from_hf_model(hf)
    merged, state, errors = _merge(model, 2)
    out = write_merged(tmp_path / "merged", hf.config, merged.spec, state, _record(model, 2, errors))
    loaded = load_folded(out)
    assert loaded.spec.num_kv_heads == 2 and read_merge_record(out)["kv_heads"] == 2
    assert _logit_error(loaded, merged) <= 1e-5


# -- end to end: CLI, merge then Eigen Attention -------------------------------------------------------------

def _tiny_checkpoint(path, kind, tokenizer):
    vocab = len(tokenizer)
    config = (tf.OPTConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                           max_position_embeddings=64, word_embed_proj_dim=64) if kind == "opt" else
              tf.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_merge_heads_cli_then_eigen_attention(tmp_path, word_tokenizer, kind, capsys):
    from tests.helpers.stages import calibrate, fold

    source = _tiny_checkpoint(tmp_path / "src", kind, word_tokenizer)
    merged = tmp_path / "merged"
    calib = ["--nsamples", "4", "--seqlen", "32"]
    assert main(["-q", "merge-heads", source, "--out", str(merged), "--kv-heads", "2", *calib]) == 0
    record = read_merge_record(merged)
    assert (record["method"], record["kv_heads"], record["nsamples"], len(record["layers"])) == ("svd", 2, 4, 2)
    assert (merged / (MERGE_JSON if kind == "llama" else MANIFEST)).is_file()
    assert load(merged).spec.num_kv_heads == 2
    calibrate(merged, tmp_path / "calib", nsamples=4, seqlen=32)
    manifest = fold(merged, tmp_path / "calib", tmp_path / "folded", kv_ratio=0.7)
    assert manifest.num_kv_heads == 2 and manifest.extra["merge"]["kv_heads"] == 2
    folded = load(tmp_path / "folded")
    assert folded.spec.num_kv_heads == 2 and folded.ranks[0].k < folded.spec.head_dim
    # bad input: one line naming the valid choices
    assert main(["merge-heads", source, "--out", str(tmp_path / "x"), "--kv-heads", "3", *calib]) == 2
    assert "choose one of [1, 2]" in capsys.readouterr().err


def test_bad_head_counts_name_the_valid_choices():
    opt, gqa = _decoder("opt").spec, _decoder("qwen2").spec       # 4/4 and 6/2
    with pytest.raises(EigenExportError, match=r"--kv-heads 3 .* 4 query heads / 4 KV heads: choose one of \[1, 2\]"):
        check_kv_heads(opt, 3)
    with pytest.raises(EigenExportError, match=r"choose one of \[1, 2\]"):
        check_kv_heads(opt, 8)
    with pytest.raises(EigenExportError, match=r"already has 2 KV heads .* choose --kv-heads from \[1\]"):
        check_kv_heads(gqa, 2)
    with pytest.raises(EigenExportError, match="single KV head"):
        check_kv_heads(_decoder("mistral").spec, 1)
    with pytest.raises(EigenExportError, match="--merge-method 'median' is unknown: choose one of svd, mean"):
        merge_state({}, [], opt, 2, "median")
