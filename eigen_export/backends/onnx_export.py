"""ONNX graphs of the reference Decoder with the reduced-dimension KV-cache signature (DESIGN 5).

One graph serves prefill and decode: the cache inputs may have past length 0, and their last dims are
the per-layer ranks r_k / r_v, not head_dim. The graph is the reference Decoder itself (any model the
loader accepts: an original HF directory or a folded artifact in either RoPE mode), captured by the
dynamo exporter through a wrapper with flat tensors, so no transformers cache object is ever traced.

Two graphs with one signature: `model.onnx` (standard ops only) and `model_plugin.onnx`, where each
layer's attention core is one `eigen_export::LowRankAttention` node that TensorRT maps to our plugin
(plugins/lowrank_attention/onnx_op.py). Both are captured from the same loaded model.

`onnx/io.json` describes the contract (artifacts/onnx_io.py); the runtime checks it against the graph it loads.
The stage that writes them is stages/export.py.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from eigen_export_plugins.lowrank_attention.kv_codec import cache_slots, layout_attribute
from eigen_export_plugins.lowrank_attention.latent_rope import latent_key_tables
from eigen_export_plugins.lowrank_attention.onnx_op import lowrank_attention_op, onnx_translation
from eigen_export_plugins.lowrank_attention.reference import MAX_RANK

from ..artifacts.layout import MODEL_ONNX
from ..dtypes import dtype as dtype_of
from ..errors import EigenExportError
from ..method.decompose import kv_bytes_per_token, kv_ratio
from ..modeling import Decoder, default_position_ids

log = logging.getLogger("eigen_export")

# Example sizes for tracing: >= 2 (0 and 1 would be specialised) and pairwise distinct, so that the
# exporter cannot mistake one dynamic dim for another.
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 5
# the first opset with RotaryEmbedding; below it `pre` mode's key rotation exports decomposed
ROTARY_OPSET = 23


def cache_layout(model: Decoder, dtype: torch.dtype) -> list[list[tuple[str, int, torch.dtype]]]:
    """Per layer, (name suffix, last dim, element type) of each cached tensor (kv_codec.cache_slots)."""
    return [cache_slots(r.k, r.v, model.kv_dtype, dtype, layer.attn.counts)
            for r, layer in zip(model.cache_widths(), model.layers)]


def input_names(layout) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{slot[0]}" for i, slots in enumerate(layout) for slot in slots]


def output_names(layout) -> list[str]:
    return ["logits"] + [f"present.{i}.{slot[0]}" for i, slots in enumerate(layout) for slot in slots]


class FlatDecoder(nn.Module):
    """The Decoder behind flat tensors: (ids, mask, positions, (k0, v0, k1, ...)) -> (logits, k0', v0', ...); a
    quantized cache has four tensors per layer (codes and scales), in cache_layout's order."""

    def __init__(self, model: Decoder, per_layer: int):
        super().__init__()
        self.model, self.per_layer = model, per_layer

    def forward(self, input_ids, attention_mask, position_ids, past):
        # The exporter gives every input dim its own symbol. No-op reshapes state once what the contract
        # says (one past length for every layer, mask width = past + seq), so the model's shape logic
        # sees one symbol per contract dim instead of guards between unrelated ones.
        b, s, p = input_ids.shape[0], input_ids.shape[1], past[0].shape[2]
        attention_mask = attention_mask.reshape(b, p + s)
        past = [t.reshape(b, t.shape[1], p, t.shape[3]) for t in past]
        n = self.per_layer
        layers = [tuple(past[n * i: n * (i + 1)]) for i in range(len(past) // n)]
        logits, presents = self.model(input_ids, attention_mask, position_ids, layers)
        return (logits, *[t for layer in presents for t in layer])


def io_contract(model: Decoder, dtype: torch.dtype) -> tuple[list[dict], list[dict]]:
    """The inputs and outputs DESIGN 5 promises for this model: names, element types, named dims."""
    spec = model.spec
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
              {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total"]},
              {"name": "position_ids", "dtype": "int64", "shape": ["batch", "seq"]}]
    outputs = [{"name": "logits", "dtype": dtype_of(dtype).name, "shape": ["batch", "seq", spec.vocab_size]}]
    for i, slots in enumerate(cache_layout(model, dtype)):
        for name, width, element in slots:
            inputs.append({"name": f"past_key_values.{i}.{name}", "dtype": dtype_of(element).name,
                           "shape": ["batch", spec.cache_heads, "past", width]})
            outputs.append({"name": f"present.{i}.{name}", "dtype": dtype_of(element).name,
                            "shape": ["batch", spec.cache_heads, "past + seq", width]})
    return inputs, outputs


def _example_inputs(model: Decoder, dtype: torch.dtype):
    b, s, p = EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST
    ids = torch.zeros(b, s, dtype=torch.long)
    mask = torch.ones(b, p + s, dtype=torch.long)
    positions = torch.arange(p, p + s).expand(b, s).contiguous()
    past = [torch.zeros(b, model.spec.cache_heads, p, width, dtype=element)
            for slots in cache_layout(model, dtype) for _, width, element in slots]
    # Names become Dim.DYNAMIC: the exporter may then record relations between dims (mask width =
    # past + seq) instead of failing on them. Only the names are ours; FlatDecoder ties the symbols.
    dynamic = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
               "position_ids": {0: "batch", 1: "seq"}, "past": [{0: "batch", 2: "past"}] * len(past)}
    return (ids, mask, positions, past), dynamic


def attach_weights(model, weight_names: set[str], read: Callable[[str], torch.Tensor]) -> None:
    """Point every initializer the capture made of a fake weight ("model.<canonical name>", FlatDecoder's
    naming) at the real one: read by `read` when the graph is saved or folded, one tensor at a time."""
    import onnx_ir as ir
    from torch._subclasses.fake_tensor import FakeTensor

    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(getattr(tensor, "raw", None), FakeTensor):
            continue
        name = value.name.removeprefix("model.")
        if name not in weight_names:
            raise EigenExportError(f"the captured graph has a weight {value.name!r} the model does not: the "
                                   "exporter renamed a parameter (export bug)")
        value.const_value = ir.LazyTensor(functools.partial(_weight, read, name, value.name), dtype=tensor.dtype,
                                          shape=tensor.shape, name=value.name)


def _weight(read, name: str, onnx_name: str):
    from torch.onnx._internal.exporter._core import TorchTensor

    return TorchTensor(read(name).contiguous(), onnx_name)


def fold_weight_transposes(model) -> int:
    """Transpose(weight) with the weight read by that node alone -> the transposed weight as an initializer,
    computed when it is saved: what constant folding does (torch.onnx exports a linear layer as MatMul of the
    transposed weight), without reading the weights now. Returns how many were folded."""
    import numpy as np
    import onnx_ir as ir

    graph, folded = model.graph, 0
    for node in list(graph):
        source = node.inputs[0] if node.inputs else None
        if (node.domain, node.op_type) != ("", "Transpose") or source is None or not source.is_initializer() or \
                not isinstance(source.const_value, ir.LazyTensor) or len(source.consumers()) != 1:
            continue
        lazy = source.const_value
        perm = node.attributes.get_ints("perm", list(reversed(range(len(lazy.shape)))))
        name = f"{source.name}.transposed"
        shape = ir.Shape([lazy.shape[p] for p in perm])
        value = ir.Value(name=name, shape=shape, type=ir.TensorType(lazy.dtype), const_value=ir.LazyTensor(
            lambda lazy=lazy, perm=perm, name=name: ir.Tensor(np.ascontiguousarray(lazy.numpy().transpose(perm)),
                                                              name=name),
            dtype=lazy.dtype, shape=shape, name=name))
        ir.convenience.replace_all_uses_with(node.outputs[0], value)
        graph.remove(node, safe=True)
        graph.initializers.pop(source.name)
        graph.register_initializer(value)
        folded += 1
    return folded


def model_metadata(model: Decoder, dtype_name: str) -> dict:
    """io.json's description of the model behind the graphs."""
    spec = model.spec
    ranks = [(r.k, r.v) for r in model.cache_widths()]
    layout = [[list(c) for c in layer] for layer in model.kv_layout] if model.kv_dtype == "mixed" else None
    return {
        "model_type": spec.model_type, "family": spec.family, "rope_mode": model.rope_mode,
        "positions": spec.positions, "max_positions": spec.max_positions if spec.positions == "learned" else None,
        "num_layers": spec.num_layers, "num_heads": spec.num_heads,
        "num_kv_heads": spec.cache_heads, "head_dim": spec.head_dim, "softmax_scale": spec.softmax_scale,
        "vocab_size": spec.vocab_size, "ranks": [list(r) for r in ranks],
        "kv_ratio": round(kv_ratio(ranks, spec.latent_width), 6),
        "kv_bytes_per_token": kv_bytes_per_token(ranks, spec.cache_heads, dtype_of(dtype_name).torch.itemsize,
                                                 model.kv_dtype, layout),
        "dtype": dtype_name, "kv_dtype": model.kv_dtype, "kv_layout": layout,
    }


def save_graphs(programs: dict, out: Path, external_data: bool | None) -> None:
    """Save model.onnx, then the other graphs; where model.onnx keeps its weights in model.onnx.data, another
    graph's initializers point into that file wherever their bytes are the same, so a 7B fp16 model costs one
    13.5 GB weights file, not one per graph. Matching is by content: constant folding names the transposed
    weights per graph (`transpose_12` in one is `val_40` in the other)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        programs[MODEL_ONNX].save(str(out / MODEL_ONNX), external_data=external_data)
        shared = _external_data_by_content(out / MODEL_ONNX)
        for name, program in programs.items():
            if name == MODEL_ONNX:
                continue
            if shared:
                _save_sharing_data(program.model, out / name, shared)
            else:       # model.onnx holds its weights inline: so does every graph of the same model
                program.save(str(out / name), external_data=external_data)


def _external_data_by_content(path: Path) -> dict[tuple[int, str], tuple[str, int, int]]:
    """(element type, sha256 of the bytes) -> (location, offset, length) of every external initializer of the
    saved graph at `path`, hashed from the data file itself."""
    import onnx

    shared = {}
    for init in onnx.load(str(path), load_external_data=False).graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entry = {e.key: e.value for e in init.external_data}
        data = path.parent / entry["location"]
        offset = int(entry.get("offset", 0))
        length = int(entry["length"]) if "length" in entry else data.stat().st_size - offset
        key = (init.data_type, _sha256_range(data, offset, length))
        shared.setdefault(key, (entry["location"], offset, length))
    return shared


def _sha256_range(path: Path, offset: int, length: int, chunk: int = 1 << 26) -> str:
    """sha256 of `length` bytes at `offset`, read 64 MiB at a time (a 7B model's embedding is 0.5-1 GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while length:
            data = f.read(min(length, chunk))
            if not data:
                raise EigenExportError(f"{path.name} ends before the tensor at offset {offset} does (export bug)")
            digest.update(data)
            length -= len(data)
    return digest.hexdigest()


# onnx_ir.save's default: smaller initializers stay inline in the graph, as torch.onnx saves model.onnx
INLINE_BYTES = 256


def _save_sharing_data(model, path: Path, shared: dict[tuple[int, str], tuple[str, int, int]]) -> None:
    """Save `model` with each initializer whose bytes `shared` knows as a reference into that file; the rest
    above INLINE_BYTES go to `<path>.data` (written only when there are any). The model is unchanged after."""
    import onnx_ir as ir

    values = [v for g in model.graphs() for v in g.initializers.values() if v.const_value is not None]
    originals = [v.const_value for v in values]
    own = []
    try:
        for value in values:
            tensor = value.const_value
            if tensor.nbytes <= INLINE_BYTES:
                continue
            # tobytes(): the bytes onnx_ir would write, one tensor at a time
            match = shared.get((int(tensor.dtype), hashlib.sha256(tensor.tobytes()).hexdigest()))
            if match is None:
                own.append(value)
                continue
            location, offset, length = match
            value.const_value = ir.ExternalTensor(location, offset, length, tensor.dtype, shape=tensor.shape,
                                                  name=tensor.name, base_dir=path.parent)
        if own:
            written = ir.external_data.convert_tensors_to_external(
                [v.const_value for v in own], base_dir=path.parent, relative_path=f"{path.name}.data")
            for value, tensor in zip(own, written):
                value.const_value = tensor
        ir.save(model, path)            # no external_data: external tensors keep their location and offset
    finally:
        for value, tensor in zip(values, originals):
            value.const_value = tensor


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise EigenExportError(f"ONNX export needs the `onnx` extra ({e.name} is missing): "
                               "pip install 'eigen_export[onnx]'") from None


def plugin_unsupported_reason(model: Decoder) -> str | None:
    """Why the plugin graph cannot be written for this model (one line), or None when it can."""
    if model.spec.positions == "alibi":
        return ("ALiBi adds a per-head position bias to the attention scores, and the LowRankAttention plugin "
                "has no bias input: use model.onnx")
    # q/k reach the core at rank_k, except in rope_mode "pre", whose node turns key latents into full rotated keys
    widest = max(max(model.spec.head_dim if a.rope_mode == "pre" else a.ranks.k, a.ranks.v)
                 for a in (layer.attn for layer in model.layers))
    if widest > MAX_RANK:
        return f"q/k/v width {widest} at the attention core exceeds the plugin's limit of {MAX_RANK}: use model.onnx"
    return None


@contextlib.contextmanager
def plugin_cores(model: Decoder):
    """Route every layer's attention core through the custom op that exports as one LowRankAttention node. The node
    reads the cache tensors as they are: codes and scales of an int8 / int4 / mixed cache (a mixed one with its
    layout, the `kv_layout` attribute), and in `pre` mode the key latents, which it turns into rotated
    keys from the layer's latent-key tables (latent_rope.py), computed in the graph from the stored key basis."""
    def core(attn, q, k, v, ctx, present, k_scale=None, v_scale=None):
        kv_dtype = attn.kv_dtype
        if kv_dtype is not None:
            k, v, k_scale, v_scale = present
        latent, spec, heads = [None] * 4, attn.spec, attn.spec.cache_heads
        if attn.rope_mode == "pre":
            tables = latent_key_tables(attn.basis_k.to(q.dtype), model.inv_freq, spec.rope_dim, spec.rope_layout,
                                       model.rope_scaling)
            latent = [default_position_ids(ctx.attention_mask, 0), *tables]
            # the maps' KV heads set the GQA groups; a joint latent reaches the node as its one cache head, which
            # every KV head's maps read (no copy per KV head)
            heads = spec.num_kv_heads
        return lowrank_attention_op(q, k, v, ctx.attention_mask, k_scale, v_scale, *latent, spec.softmax_scale,
                                    spec.num_heads, heads, attn.ranks.k, attn.ranks.v, attn.rope_mode or "none",
                                    kv_dtype or "none", layout_attribute(*attn.counts))

    with _per_layer(model, "core", core):
        yield


def rotary_keys(attn, k, ctx):
    """`pre` mode's key rotation as one RotaryEmbedding node (opset 23): ONNX Runtime turns every cached key in one
    pass where the decomposed rotation (slices, a negation, a concat, two products, a sum) takes six, which cost
    8.5 of 12.8 ms per layer at batch 8 / past 2048 on SmolLM2 (a 1-thread micro-benchmark; 0.9 ms as one node).
    TensorRT's parser reads it from 10.15 on (IRotaryEmbeddingLayer)."""
    spec = attn.spec
    # the op takes one angle per rotated pair: the tables repeat each angle, in halves or interleaved
    pairs = slice(0, spec.rope_dim // 2) if spec.rope_layout == "half" else slice(0, spec.rope_dim, 2)
    cos, sin = ctx.k_cos[:, 0, :, pairs], ctx.k_sin[:, 0, :, pairs]                 # [B, T, rope_dim / 2]
    partial = spec.rope_dim if spec.rope_dim < k.shape[-1] else 0
    return torch.onnx.ops.rotary_embedding(k, cos, sin, interleaved=spec.rope_layout != "half",
                                           rotary_embedding_dim=partial)


@contextlib.contextmanager
def _per_layer(model: Decoder, method: str, fn):
    """Swap one method of every layer's attention for fn(attn, ...) while the graph is captured."""
    attns = [layer.attn for layer in model.layers]
    for attn in attns:
        setattr(attn, method, functools.partial(fn, attn))     # an instance attribute shadows the class's method
    try:
        yield
    finally:
        for attn in attns:
            delattr(attn, method)


def capture(model: Decoder, dtype: torch.dtype, opset: int, plugin: bool = False):
    args, dynamic = _example_inputs(model, dtype)
    layout = cache_layout(model, dtype)
    translation = onnx_translation() if plugin else None
    rope_nodes = _per_layer(model, "rotate_keys", rotary_keys) if opset >= ROTARY_OPSET else contextlib.nullcontext()
    with warnings.catch_warnings(), _quiet_exporter(), rope_nodes:
        # The exporter warns once per input that shares a dim with an earlier one ("batch will not be
        # used, since it shares ..."): that sharing is the contract, not a problem.
        warnings.simplefilter("ignore")
        try:
            return torch.onnx.export(FlatDecoder(model, len(layout[0])), args, dynamo=True, dynamic_shapes=dynamic,
                                     input_names=input_names(layout), output_names=output_names(layout),
                                     opset_version=opset, verbose=False, optimize=False,
                                     custom_translation_table=translation)
        except Exception as e:   # the exporter raises many types; the user needs one line and the cause
            raise EigenExportError(f"the dynamo ONNX export failed ({_exporter_cause(e)}); "
                                   "run with -v for the exporter's full report") from e


def _exporter_cause(error: Exception) -> str:
    """The line of torch.onnx's multi-paragraph error that names the cause ("<class ...>: message")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "## Exception summary" in lines:
        after = lines[lines.index("## Exception summary") + 1:]
        if after:
            return after[0]
    return lines[0] if lines else type(error).__name__


def optimize(model) -> None:
    """Constant folding, dead nodes, shared constants and subexpressions, once. Nothing that reads a weight
    still on disk is folded (fold_weight_transposes did those), so no weight enters memory here.

    torch.onnx's default optimizer adds onnxscript's pattern rewriter and repeats everything twice: 13 s of
    a 60 s SmolLM2 export for 12 fewer nodes out of 1800, the kind of clean-up ORT repeats when it loads
    the graph anyway.
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript import optimizer

    def reads_a_weight(node):
        return False if any(isinstance(getattr(v, "const_value", None), ir.LazyTensor) for v in node.inputs) else None

    with _quiet_exporter():
        optimizer.fold_constants(model, should_fold=reads_a_weight)
        optimizer.remove_unused_nodes(model)
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        common.DeduplicateInitializersPass()(model)
        common.CommonSubexpressionEliminationPass()(model)
        optimizer.remove_unused_nodes(model)


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's per-stage progress lines and its torchvision warnings unless -v."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def name_dims(model, inputs: list[dict], outputs: list[dict]) -> None:
    """Give every graph input/output the contract's dim names (the exporter's own names are sympy
    expressions of its symbols); a static dim that differs from the contract is an export bug."""
    import onnx_ir as ir

    for values, contract in ((model.graph.inputs, inputs), (model.graph.outputs, outputs)):
        by_name = {v.name: v for v in values}
        for entry in contract:
            value = by_name.get(entry["name"])
            if value is None:
                raise EigenExportError(f"the exported graph has no {entry['name']!r}: the wrapper and the "
                                       "contract disagree (export bug)")
            actual = list(value.shape) if value.shape is not None else []
            if len(actual) != len(entry["shape"]):
                raise EigenExportError(f"exported {entry['name']} has rank {len(actual)}, expected {entry['shape']}")
            dims = []
            for want, got in zip(entry["shape"], actual):
                if isinstance(want, int):
                    if got != want:
                        raise EigenExportError(f"exported {entry['name']} has dims {actual}, expected "
                                               f"{entry['shape']} (export bug)")
                    dims.append(want)
                else:
                    if isinstance(got, int):
                        raise EigenExportError(f"exported {entry['name']} has static dims {actual} where "
                                               f"{entry['shape']} must be dynamic: the exporter specialised it")
                    dims.append(ir.SymbolicDim(want))
            value.shape = ir.Shape(dims)


