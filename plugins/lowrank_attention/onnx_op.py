"""The `eigen_export::LowRankAttention` node of `model_plugin.onnx` (DESIGN 5, 6), as torch, ONNX and
ONNX Runtime see it.

- torch: `torch.ops.eigen_export.lowrank_attention`, a custom op whose eager kernel is the reference. The
  plugin export routes every attention core through it, and the exporter turns each call into one node.
- ONNX: the node's schema, registered with onnx so that the checker validates the plugin graph.
- ONNX Runtime: a Python custom op (onnxruntime-extensions) running the reference, so the plugin graph runs
  on CPU: that is how its wiring is tested without a GPU.

How TensorRT finds the plugin for the node: the ONNX parser looks the node's op_type up in the plugin
registry, with the version and namespace read from the string attributes `plugin_version` (default "1")
and `plugin_namespace` (default ""); a node that carries `plugin_namespace` is imported as a plugin before
any built-in importer is tried, and the node's domain is not consulted. The other attributes reach the
plugin creator as its fields. Sources: onnx-tensorrt ModelImporter.cpp (`isNodeInPluginRegistry`,
`parseNode`), docs/faq.md "Custom Layer Support" (the fallback plugin importer); TensorRT's
samples/python/quickly_deployable_plugins/README.md "ONNX model with a plugin"; "Extending TensorRT with
Custom Layers", https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/extending-custom-layers.html

Node contract (the TensorRT plugin is written against exactly this):

| input | shape | dtype |
|---|---|---|
| q | [B, H, S, rank_k] | T (fp32 / fp16 / bf16) |
| k | [B, H_kv, P+S, rank_k] | T |
| v | [B, H_kv, P+S, rank_v] | T |
| attention_mask | [B, P+S] | int64, 1 = real token, 0 = padding |

output [B, H, S, rank_v] of type T; semantics = `reference.lowrank_attention_reference` (causal, offset by
P = k.shape[2] - S; fp32 softmax; a query row with no visible key outputs zeros). Attributes:
plugin_namespace "eigen_export", plugin_version "1", scale (float, 1/sqrt(original head_dim)), num_heads,
num_kv_heads, rank_k (width of q/k at the node: head_dim in rope_mode "pre", which rotates full keys
before the core), rank_v (ints), rope_mode ("none", "pre", "post"; informational, the op is the same).
"""
from __future__ import annotations

import torch

from .reference import NAMESPACE, OP_NAME, ROPE_MODES, VERSION, lowrank_attention_reference

DOMAIN = PLUGIN_NAMESPACE = NAMESPACE
OP_TYPE = OP_NAME
OPSET_VERSION = int(VERSION)
PLUGIN_VERSION = VERSION
# onnxruntime-extensions registers every Python op in this one domain; it cannot be chosen per op
ORT_PYOP_DOMAIN = "ai.onnx.contrib"
FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)")
INT_ATTRIBUTES = ("num_heads", "num_kv_heads", "rank_k", "rank_v")


# -- torch ---------------------------------------------------------------------------------------------
@torch.library.custom_op("eigen_export::lowrank_attention", mutates_args=())
def lowrank_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor,
                         scale: float, num_heads: int, num_kv_heads: int, rank_k: int, rank_v: int,
                         rope_mode: str) -> torch.Tensor:
    """The attention core as one op: [B, H, S, rank_k] x cache -> [B, H, S, rank_v]. The ints and the
    string only travel to the node's attributes; the computation reads the shapes."""
    return lowrank_attention_reference(q, k, v, attention_mask, scale)


@lowrank_attention_op.register_fake
def _lowrank_attention_fake(q, k, v, attention_mask, scale, num_heads, num_kv_heads, rank_k, rank_v, rope_mode):
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])


def onnx_translation() -> dict:
    """torch.onnx's `custom_translation_table`: the custom op becomes one eigen_export::LowRankAttention node."""
    from onnxscript import values

    register_onnx_schema()
    opset = values.Opset(DOMAIN, OPSET_VERSION)

    def lowrank_attention(q, k, v, attention_mask, scale, num_heads, num_kv_heads, rank_k, rank_v, rope_mode):
        if rope_mode not in ROPE_MODES:
            raise ValueError(f"{OP_TYPE}: rope_mode {rope_mode!r} is not one of {ROPE_MODES}")
        return opset.LowRankAttention(
            q, k, v, attention_mask, plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION,
            scale=float(scale), num_heads=int(num_heads), num_kv_heads=int(num_kv_heads), rank_k=int(rank_k),
            rank_v=int(rank_v), rope_mode=str(rope_mode))

    return {torch.ops.eigen_export.lowrank_attention.default: lowrank_attention}


# -- ONNX ----------------------------------------------------------------------------------------------
def register_onnx_schema() -> None:
    """Register the node's schema with onnx (once per process): the checker and shape inference need it."""
    from onnx import defs

    if defs.has(OP_TYPE, DOMAIN):
        return
    tensor = defs.OpSchema.FormalParameter
    attr, kind = defs.OpSchema.Attribute, defs.OpSchema.AttrType
    schema = defs.OpSchema(
        OP_TYPE, DOMAIN, OPSET_VERSION,
        doc="Causal GQA attention in the low-rank space of Eigen Attention (plugins/lowrank_attention).",
        inputs=[tensor("q", "T", "[B, H, S, rank_k]"), tensor("k", "T", "[B, H_kv, P+S, rank_k]"),
                tensor("v", "T", "[B, H_kv, P+S, rank_v]"),
                tensor("attention_mask", "tensor(int64)", "[B, P+S], 1 = real token, 0 = padding")],
        outputs=[tensor("output", "T", "[B, H, S, rank_v]")],
        type_constraints=[("T", list(FLOAT_TYPES), "q, k, v and the output share one float type")],
        attributes=[attr("plugin_namespace", kind.STRING, "TensorRT plugin namespace"),
                    attr("plugin_version", kind.STRING, "TensorRT plugin version"),
                    attr("scale", kind.FLOAT, "softmax scale, 1/sqrt(original head_dim)"),
                    attr("num_heads", kind.INT, "H, query heads"), attr("num_kv_heads", kind.INT, "H_kv, KV heads"),
                    attr("rank_k", kind.INT, "width of q and k at the node"), attr("rank_v", kind.INT, "width of v"),
                    attr("rope_mode", kind.STRING, "none, pre or post")])
    schema.set_type_and_shape_inference_function(_infer_output)
    defs.register_schema(schema)


def _infer_output(ctx) -> None:
    """output: q's element type, shape [B, H, S] of q and rank_v of v (dims copied where known)."""
    import onnx

    q, v = ctx.get_input_type(0), ctx.get_input_type(2)
    out = onnx.TypeProto()
    out.tensor_type.elem_type = q.tensor_type.elem_type
    if q.tensor_type.HasField("shape") and v.tensor_type.HasField("shape"):
        dims = list(q.tensor_type.shape.dim)[:3] + list(v.tensor_type.shape.dim)[3:]
        for dim in dims:
            out.tensor_type.shape.dim.add().CopyFrom(dim)
    ctx.set_output_type(0, out)


# -- ONNX Runtime --------------------------------------------------------------------------------------
_ort_registered = False
# An exception raised inside a Python op aborts the whole process (onnxruntime-extensions does not catch it),
# so the op records what went wrong, returns NaNs, and the caller raises it after the run (take_ort_error).
_ort_errors: list[str] = []


def register_ort_op() -> None:
    """Register the ONNX Runtime Python op (fp32 only: a Python op declares one type per input)."""
    global _ort_registered
    if _ort_registered:
        return
    import numpy as np
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    f32, i64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64
    attrs = {"scale": f32, "rope_mode": PyCustomOpDef.dt_string, **{name: i64 for name in INT_ATTRIBUTES}}

    @onnx_op(op_type=OP_TYPE, inputs=[f32, f32, f32, i64], outputs=[f32], attrs=attrs)
    def lowrank_attention_ort(q, k, v, attention_mask, **attributes):
        try:
            return _ort_kernel(q, k, v, attention_mask, attributes)
        except Exception as e:      # noqa: BLE001 - anything escaping here kills the process
            _ort_errors.append(f"{type(e).__name__}: {e}")
            return np.full((*q.shape[:3], v.shape[-1]), np.nan, dtype=np.float32)

    _ort_registered = True


def _ort_kernel(q, k, v, attention_mask, attributes):
    q, k, v, mask = (torch.from_numpy(a) for a in (q, k, v, attention_mask))
    shapes = {"num_heads": q.shape[1], "num_kv_heads": k.shape[1], "rank_k": q.shape[3], "rank_v": v.shape[3]}
    wrong = {name: (attributes[name], got) for name, got in shapes.items() if attributes[name] != got}
    if wrong:           # the node's attributes must describe its inputs: TensorRT's plugin trusts them
        raise ValueError(f"{OP_TYPE} attributes disagree with the input shapes (attribute, shape): {wrong}")
    with torch.no_grad():
        return lowrank_attention_reference(q, k, v, mask, attributes["scale"]).numpy()


def take_ort_error() -> str | None:
    """The first error the ORT op recorded since the last call (and forget them all), or None."""
    errors = list(_ort_errors)
    _ort_errors.clear()
    return errors[0] if errors else None


def for_onnxruntime(model) -> int:
    """Move the plugin nodes of an onnx ModelProto (in memory) into the domain ORT's Python ops live in."""
    count = 0
    for node in model.graph.node:
        if node.op_type == OP_TYPE and node.domain == DOMAIN:
            node.domain = ORT_PYOP_DOMAIN
            count += 1
    if ORT_PYOP_DOMAIN not in {o.domain for o in model.opset_import}:
        model.opset_import.add(domain=ORT_PYOP_DOMAIN, version=1)
    return count
