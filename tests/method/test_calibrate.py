"""The calibration pass on tiny models: deterministic, the shared layer-by-layer pass, and the backward pass."""
import pytest
import torch

from eigen_export.errors import EigenExportError
from eigen_export.loading import decoder_from_hf_model
from eigen_export.method.calibrate import calibrate
from eigen_export.method.decompose import direction_costs, eigenbasis, loss_basis, rotation_average
from eigen_export.method.fold import fold_to_target
from eigen_export.modeling import Decoder
from eigen_export.method.capture import LayerPass
from eigen_export.stages.validate import layer_outputs
from tests.helpers.tiny_models import ptb_like_ids, tiny_hf_model


def test_calibration_is_deterministic():
    model = decoder_from_hf_model(tiny_hf_model("qwen2"))
    ids = ptb_like_ids(4, 24)
    first, second = (calibrate(model, ids, "post", progress=False, error_samples=2) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a.basis_k, b.basis_k) and torch.equal(a.eig_v, b.eig_v) and a.curve == b.curve
        assert torch.equal(a.down_v, b.down_v) and torch.equal(a.cost_k, b.cost_k) and a.curve


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


def _projections(model, ids, names):
    """(logits, {(layer, name): output of that attention projection}) of one forward pass over ids."""
    outputs = {}
    handles = [getattr(block.attn, name).register_forward_hook(
        lambda module, inputs, out, key=(i, name): outputs.__setitem__(key, out))
        for i, block in enumerate(model.layers) for name in names]
    try:
        logits, _ = model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return logits, outputs


def _autograd_grams(model, ids, joint_heads=False):
    """Per layer the Grams of the k and v projections and of the mean next-token loss's gradient at them, from
    one autograd pass through the whole model (what the layer-by-layer backward pass must reproduce); per KV head,
    or over all of a layer's KV heads at once (joint_heads)."""
    spec = model.spec
    logits, outputs = _projections(model, ids, "kv")
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    keys = sorted(outputs)
    grads = dict(zip(keys, torch.autograd.grad(loss, [outputs[k] for k in keys])))

    def gram(x):
        x = x.detach().double().view(*x.shape[:2], *((1, -1) if joint_heads else (spec.num_kv_heads, spec.head_dim)))
        return torch.einsum("bshd,bshe->hde", x, x)
    return [{kind: (gram(outputs[(i, kind)]), gram(grads[(i, kind)])) for kind in "kv"}
            for i in range(spec.num_layers)]


def test_the_backward_pass_measures_the_gradients_of_the_whole_models_loss():
    """The layer-by-layer backward pass (each layer recomputed from its stored input) yields the loss gradients
    that autograd through the whole model gives: the costs of the energy basis and the spectra of the loss
    basis computed from autograd's Grams match calibrate's."""
    model = decoder_from_hf_model(tiny_hf_model("llama-gqa"))
    ids = ptb_like_ids(5, 12)
    reference = _autograd_grams(model, ids)
    energy = calibrate(model, ids, "pre", "energy", batch_size=2, progress=False, stored_dtype=None)
    loss = calibrate(model, ids, "pre", "loss", batch_size=2, progress=False, stored_dtype=None)
    narrow = calibrate(model, ids, "pre", "loss", batch_size=2, progress=False)      # inputs kept in bf16
    for want, e, l, n in zip(reference, energy, loss, narrow):
        for kind in "kv":
            gram, grad_gram = want[kind]
            basis = getattr(e, f"basis_{kind}")
            assert torch.allclose(getattr(e, f"cost_{kind}"), direction_costs(gram, grad_gram, basis),
                                  rtol=1e-4, atol=1e-12)
            spectrum = loss_basis(gram, grad_gram)[0]
            assert torch.allclose(getattr(l, f"eig_{kind}"), spectrum, rtol=1e-4, atol=1e-12)
            # bf16-kept inputs move the gradients by their rounding (2^-8), far less than any use of them
            top = spectrum[..., :4]
            assert torch.allclose(getattr(n, f"eig_{kind}")[..., :4], top, rtol=0.05, atol=1e-6 * top.max().item())
    assert not any(block.attn.k._forward_hooks for block in model.layers)


def test_joint_heads_fits_one_loss_basis_over_all_kv_heads_of_a_layer():
    """Issue 13's joint latents: the spectrum is the loss basis of the Grams of whole [H_kv x d] key / value
    vectors, which hold the per-head Grams on their diagonal blocks and the cross-head terms off them."""
    model = decoder_from_hf_model(tiny_hf_model("llama-gqa"))
    spec = model.spec
    ids = ptb_like_ids(5, 12)
    reference = _autograd_grams(model, ids, joint_heads=True)
    joint = calibrate(model, ids, "pre", "loss", batch_size=2, progress=False, stored_dtype=None, joint_heads=True)
    width = spec.num_kv_heads * spec.head_dim
    for want, layer in zip(reference, joint):
        assert layer.basis_k.shape == layer.down_v.shape == (1, width, width)
        for kind in "kv":
            gram, grad_gram = want[kind]
            assert gram[0, :spec.head_dim, spec.head_dim:2 * spec.head_dim].abs().max() > 0    # heads correlate
            spectrum, down, _ = loss_basis(gram, grad_gram)
            assert torch.allclose(getattr(layer, f"eig_{kind}"), spectrum, rtol=1e-4, atol=1e-12)
            # the features in the raw projection's order (head-major), not just the same spectrum
            got = getattr(layer, f"down_{kind}")[0, :, :3].double()
            assert torch.allclose(torch.nn.functional.cosine_similarity(got, down[0, :, :3], dim=0).abs(),
                                  torch.ones(3, dtype=torch.float64), atol=1e-4)
    for wrong in ({"rope_mode": "post"}, {"basis": "energy"}, {"error_samples": 2}):
        with pytest.raises(EigenExportError, match="joint_heads"):
            calibrate(model, ids, **({"rope_mode": "pre"} | wrong), progress=False, joint_heads=True)


def test_the_loss_basis_folds_exactly_at_full_rank():
    """down != up: the fold writes the latent projection into W_K / W_V and its inverse into W_O / W_Q (or the
    pre-mode key rebuild); at full rank they cancel."""
    for name, mode in (("llama-gqa", "pre"), ("opt", None)):
        model = decoder_from_hf_model(tiny_hf_model(name))
        ids = ptb_like_ids(8, 24)
        layers = calibrate(model, ids, mode, "loss", progress=False)
        assert not torch.allclose(layers[0].down_v, layers[0].basis_v)
        folded = _decoder(model, fold_to_target(model, layers, mode, 1.0), mode)
        with torch.no_grad():
            assert (model(ids)[0] - folded(ids)[0]).abs().max().item() < 1e-4


def _decoder(model, folded, mode):
    ranks, _, _, state = folded
    return Decoder(model.spec, ranks, mode, state, inv_freq=getattr(model, "inv_freq", None))


def test_post_mode_fits_the_rotation_averaged_key_and_query_statistics():
    """Post mode gathers pre-RoPE Grams and turns them to every position below rope_positions: the K+Q spectrum
    it records equals that of decompose.rotation_average applied to Grams taken from the model by hooks, and
    rope_positions=0 (the windows' own positions) gives a different one."""
    model = decoder_from_hf_model(tiny_hf_model("llama-gqa"))
    spec = model.spec
    ids = ptb_like_ids(3, 16)
    with torch.no_grad():
        _, outputs = _projections(model, ids, "kq")
    averaged = calibrate(model, ids, "post", "energy", progress=False, stored_dtype=None, rope_positions=300)
    windows = calibrate(model, ids, "post", "energy", progress=False, stored_dtype=None, rope_positions=0)
    for i, (layer, window_layer) in enumerate(zip(averaged, windows)):
        k = outputs[(i, "k")].double().view(3, 16, spec.num_kv_heads, spec.head_dim)
        q = outputs[(i, "q")].double().view(3, 16, spec.num_kv_heads, spec.group_size, spec.head_dim)
        gram = torch.einsum("bshd,bshe->hde", k, k) + torch.einsum("bshgd,bshge->hde", q, q)
        want = eigenbasis(rotation_average(gram, model.inv_freq, spec.rope_dim, spec.rope_layout, 300))[0]
        assert torch.allclose(layer.eig_k, want, rtol=1e-6, atol=1e-8 * want.max().item())
        assert not torch.allclose(window_layer.eig_k, want, rtol=1e-2)


def test_the_kept_layer_inputs_leave_the_gpu_only_when_they_do_not_fit():
    from eigen_export.method.calibrate import ACTIVATION_SHARE, activation_home

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert activation_home(cpu, 10**12) == cpu                        # host memory is the only home on CPU
    assert activation_home(gpu, 10**9, free_bytes=int(10**9 / ACTIVATION_SHARE)) == gpu
    assert activation_home(gpu, 10**9 + 1, free_bytes=int(10**9 / ACTIVATION_SHARE)) == cpu



def test_auto_latents_are_joint_where_they_fit_and_can_be_fitted():
    """auto: joint for a GQA layer whose H_kv x head_dim fits the plugin (SmolLM2: 3 x 64), per head where the
    settings cannot fit a joint basis, for one KV head (the same thing) and for wide MHA layers (OPT-6.7b: 32 x
    128 = 4096 features per latent would cost every query head 32 times the attention work)."""
    import transformers as tf

    from eigen_export.families import spec_from_config
    from eigen_export.method.calibrate import choose_latents

    smollm2 = spec_from_config(tf.LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                                              num_hidden_layers=2, intermediate_size=64, vocab_size=32))
    opt = spec_from_config(tf.OPTConfig(hidden_size=4096, num_attention_heads=32, num_hidden_layers=2, ffn_dim=64,
                                        vocab_size=32, word_embed_proj_dim=4096))
    mqa = smollm2.replace(num_kv_heads=1)
    small_mha = spec_from_config(tf.OPTConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, ffn_dim=64,
                                              vocab_size=32, word_embed_proj_dim=64))
    assert choose_latents("auto", smollm2, "pre", "loss", 0) == "joint"
    assert choose_latents("auto", small_mha, "pre", "loss", 0) == "joint"      # 4 x 16: no RoPE, fits
    assert choose_latents("auto", smollm2, "post", "loss", 0) == "heads"
    assert choose_latents("auto", smollm2, "pre", "energy", 0) == "heads"
    assert choose_latents("auto", smollm2, "pre", "loss", 2) == "heads"
    assert choose_latents("auto", opt, "pre", "loss", 0) == "heads"
    assert choose_latents("auto", mqa, "pre", "loss", 0) == "heads"
    assert choose_latents("heads", smollm2, "pre", "loss", 0) == "heads"
    assert choose_latents("joint", opt, "pre", "loss", 0) == "joint"           # asked for: the user's call
