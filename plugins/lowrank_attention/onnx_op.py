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
num_kv_heads, rank_k (width of the cached keys), rank_v (ints), rope_mode ("none", "pre", "post";
informational).

TensorRT plugins have fixed inputs, so each other combination is its own op type:
- `LowRankAttentionQuantized`: a quantized cache (kv_codec: int8, int4 packed two per uint8, or mixed 8 / 4 / 2-bit
  numbers packed by width, with an fp16 scale per token and head) as its codes, dequantized on load by the kernel:
  q, k codes [B, H_kv, P+S, w_k], v codes [B, H_kv, P+S, w_v], attention_mask, k_scale [B, H_kv, P+S, 1],
  v_scale [B, H_kv, P+S, 1], two more string attributes kv_dtype ("int8" | "int4" | "mixed") and kv_layout
  (mixed: "n8,n4,n2;n8,n4,n2", the key and value counts of each width; "" otherwise); w = rank (int8),
  ceil(rank / 2) (int4), the packed bytes of the layout (mixed);
- `LowRankAttentionLatentK` (rope_mode "pre"): the cached keys are pre-RoPE latents, turned into rotated keys in
  the op (latent_rope.py): q [B, H, S, head_dim] (rotated), k [B, H_kv, P+S, rank_k], v, attention_mask, then
  key_positions [B, P+S] int64, basis_cos and basis_sin [H_kv, rank_k, head_dim] (T), freq [head_dim] fp32;
  one more int attribute head_dim. num_kv_heads is the maps' H_kv; k and v (and their scales) may hold one head
  instead, a joint latent that every KV head's maps read (issue 13);
- `LowRankAttentionLatentKQuantized`: both: the quantized op's inputs, then the latent-key inputs.
"""
from __future__ import annotations

import torch

from typing import Optional

from .kv_codec import KV_DTYPES, Quantized, parse_layout
from .latent_rope import LatentKeys
from .reference import NAMESPACE, OP_NAME, ROPE_MODES, VERSION, lowrank_attention_reference

DOMAIN = PLUGIN_NAMESPACE = NAMESPACE
OP_TYPE = OP_NAME
# (latent keys, cache quantized) -> the node's op type
OP_TYPES = {(False, False): OP_NAME, (False, True): f"{OP_NAME}Quantized", (True, False): f"{OP_NAME}LatentK",
            (True, True): f"{OP_NAME}LatentKQuantized"}
OPSET_VERSION = int(VERSION)
PLUGIN_VERSION = VERSION
# onnxruntime-extensions registers every Python op in this one domain; it cannot be chosen per op
ORT_PYOP_DOMAIN = "ai.onnx.contrib"
FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)")
INT_ATTRIBUTES = ("num_heads", "num_kv_heads", "rank_k", "rank_v")


# -- torch ---------------------------------------------------------------------------------------------
@torch.library.custom_op("eigen_export::lowrank_attention", mutates_args=())
def lowrank_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor,
                         k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor],
                         key_positions: Optional[torch.Tensor], basis_cos: Optional[torch.Tensor],
                         basis_sin: Optional[torch.Tensor], freq: Optional[torch.Tensor],
                         scale: float, num_heads: int, num_kv_heads: int, rank_k: int, rank_v: int,
                         rope_mode: str, kv_dtype: str, kv_layout: str) -> torch.Tensor:
    """The attention core as one op: q x cache -> [B, H, S, rank_v]. A side with a scale is a quantized cache
    (kv_dtype's codes); with basis_cos, k holds pre-RoPE key latents (latent_rope.LatentKeys of the four latent
    inputs). The ints and strings travel to the node's attributes; the computation reads the shapes (and the
    ranks, which int4 codes cannot tell)."""
    latent = None if basis_cos is None else LatentKeys(basis_cos, basis_sin, freq, key_positions)
    k_counts, v_counts = parse_layout(kv_layout)
    return lowrank_attention_reference(q, as_side(k, k_scale, kv_dtype, rank_k, k_counts),
                                       as_side(v, v_scale, kv_dtype, rank_v, v_counts), attention_mask, scale, latent)


@lowrank_attention_op.register_fake
def _lowrank_attention_fake(q, k, v, attention_mask, k_scale, v_scale, key_positions, basis_cos, basis_sin, freq,
                            scale, num_heads, num_kv_heads, rank_k, rank_v, rope_mode, kv_dtype, kv_layout):
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], rank_v)


def as_side(t: torch.Tensor, scale: torch.Tensor | None, kv_dtype: str, rank: int,
            counts=None) -> torch.Tensor | Quantized:
    """A cache side as the reference and the kernels take it: the tensor, or codes + scales (+ a mixed layout)."""
    return t if scale is None else Quantized(t, scale, kv_dtype, rank, counts)


def onnx_translation() -> dict:
    """torch.onnx's `custom_translation_table`: the custom op becomes one eigen_export::LowRankAttention node."""
    from onnxscript import values

    register_onnx_schema()
    opset = values.Opset(DOMAIN, OPSET_VERSION)

    def lowrank_attention(q, k, v, attention_mask, k_scale, v_scale, key_positions, basis_cos, basis_sin, freq, scale,
                          num_heads, num_kv_heads, rank_k, rank_v, rope_mode, kv_dtype, kv_layout):
        if rope_mode not in ROPE_MODES:
            raise ValueError(f"{OP_TYPE}: rope_mode {rope_mode!r} is not one of {ROPE_MODES}")
        if (k_scale is None) != (v_scale is None):
            raise ValueError(f"{OP_TYPE}: a quantized cache quantizes both keys and values")
        latent = basis_cos is not None
        op_type = OP_TYPES[(latent, k_scale is not None)]
        extra = {}
        if k_scale is not None:
            if kv_dtype not in KV_DTYPES:
                raise ValueError(f"{OP_TYPE}: kv_dtype {kv_dtype!r} is not one of {KV_DTYPES}")
            extra |= {"kv_dtype": str(kv_dtype), "kv_layout": str(kv_layout)}
        if latent:
            extra["head_dim"] = int(q.shape[-1])
        inputs = [t for t in (k_scale, v_scale) if t is not None]
        inputs += [key_positions, basis_cos, basis_sin, freq] if latent else []
        return getattr(opset, op_type)(
            q, k, v, attention_mask, *inputs, plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION,
            scale=float(scale), num_heads=int(num_heads), num_kv_heads=int(num_kv_heads), rank_k=int(rank_k),
            rank_v=int(rank_v), rope_mode=str(rope_mode), **extra)

    return {torch.ops.eigen_export.lowrank_attention.default: lowrank_attention}


# -- ONNX ----------------------------------------------------------------------------------------------
def register_onnx_schema() -> None:
    """Register the nodes' schemas with onnx (once per process): the checker and shape inference need them."""
    from onnx import defs

    if defs.has(OP_TYPE, DOMAIN):
        return
    tensor = defs.OpSchema.FormalParameter
    attr, kind = defs.OpSchema.Attribute, defs.OpSchema.AttrType
    attributes = [attr("plugin_namespace", kind.STRING, "TensorRT plugin namespace"),
                  attr("plugin_version", kind.STRING, "TensorRT plugin version"),
                  attr("scale", kind.FLOAT, "softmax scale, 1/sqrt(original head_dim)"),
                  attr("num_heads", kind.INT, "H, query heads"), attr("num_kv_heads", kind.INT, "H_kv, KV heads"),
                  attr("rank_k", kind.INT, "width of q and k at the node"), attr("rank_v", kind.INT, "width of v"),
                  attr("rope_mode", kind.STRING, "none, pre or post")]
    mask = tensor("attention_mask", "tensor(int64)", "[B, P+S], 1 = real token, 0 = padding")
    codes = ("C", ["tensor(int8)", "tensor(uint8)"], "int8 codes, or packed int4 / mixed codes")
    floats = ("T", list(FLOAT_TYPES), "q, float k / v, the latent-key maps and the output share one float type")
    scale = "tensor(float16)"
    for (latent, quantized), op_type in OP_TYPES.items():
        cache = "C" if quantized else "T"
        inputs = [tensor("q", "T", "[B, H, S, rank_k], or [B, H, S, head_dim] rotated with latent keys"),
                  tensor("k", cache, "[B, H_kv (latent keys: or 1, joint), P+S, rank_k or its code width]"),
                  tensor("v", cache, "[B, as k, P+S, rank_v or its code width]"), mask]
        inputs += [tensor(f"{side}_scale", scale, "[B, as k, P+S, 1] fp16, one per cached vector")
                   for side in ("k", "v") if quantized]
        if latent:
            inputs += [tensor("key_positions", "tensor(int64)", "[B, P+S] position of each cached key"),
                       tensor("basis_cos", "T", "[H_kv, rank_k, head_dim] latent -> cos part of the rotated key"),
                       tensor("basis_sin", "T", "[H_kv, rank_k, head_dim] latent -> sin part of the rotated key"),
                       tensor("freq", "tensor(float)", "[head_dim] angular frequency of each key feature")]
        extra = [attr("kv_dtype", kind.STRING, "int8, int4 or mixed"),
                 attr("kv_layout", kind.STRING, "mixed: n8,n4,n2;n8,n4,n2 (key; value counts), else empty")
                 ] if quantized else []
        extra += [attr("head_dim", kind.INT, "width of q and of the rotated keys")] if latent else []
        schema = defs.OpSchema(
            op_type, DOMAIN, OPSET_VERSION,
            doc="Causal GQA attention in the low-rank space of Eigen Attention (plugins/lowrank_attention).",
            inputs=inputs, outputs=[tensor("output", "T", "[B, H, S, rank_v]")],
            type_constraints=[floats] + ([codes] if quantized else []), attributes=attributes + extra)
        schema.set_type_and_shape_inference_function(_infer_output)
        defs.register_schema(schema)


def _infer_output(ctx) -> None:
    """output: q's element type, shape [B, H, S] of q and the rank_v attribute (dims copied where known)."""
    import onnx

    q = ctx.get_input_type(0)
    out = onnx.TypeProto()
    out.tensor_type.elem_type = q.tensor_type.elem_type
    rank_v = ctx.get_attribute("rank_v")
    if q.tensor_type.HasField("shape") and rank_v is not None:
        for dim in list(q.tensor_type.shape.dim)[:3]:
            out.tensor_type.shape.dim.add().CopyFrom(dim)
        out.tensor_type.shape.dim.add().dim_value = rank_v.i
    ctx.set_output_type(0, out)


# -- ONNX Runtime --------------------------------------------------------------------------------------
_ort_registered = False
# An exception raised inside a Python op aborts the whole process (onnxruntime-extensions does not catch it),
# so the op records what went wrong, returns NaNs, and the caller raises it after the run (take_ort_error).
_ort_errors: list[str] = []


def register_ort_op() -> None:
    """Register the ONNX Runtime Python ops (fp32 only: a Python op declares one type per input), one per
    op type and code type: `ort_op_type` names them."""
    global _ort_registered
    if _ort_registered:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    f32, i64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64
    attrs = {"scale": f32, "rope_mode": PyCustomOpDef.dt_string, **{name: i64 for name in INT_ATTRIBUTES}}
    latent_inputs, latent_attrs = [i64, f32, f32, f32], {"head_dim": i64}
    for latent in (False, True):
        more, more_attrs = (latent_inputs, latent_attrs) if latent else ([], {})
        _define_ort_op(onnx_op, OP_TYPES[(latent, False)], [f32, f32, f32, i64] + more, attrs | more_attrs,
                       (latent, False))
        for kv_dtype, code in (("int8", PyCustomOpDef.dt_int8), ("int4", PyCustomOpDef.dt_uint8),
                               ("mixed", PyCustomOpDef.dt_uint8)):
            # scales arrive as fp32: the Python op API has no fp16 (for_onnxruntime casts them, exactly)
            _define_ort_op(onnx_op, ort_op_type(OP_TYPES[(latent, True)], kv_dtype),
                           [f32, code, code, i64, f32, f32] + more,
                           attrs | more_attrs | {name: PyCustomOpDef.dt_string for name in ("kv_dtype", "kv_layout")},
                           (latent, True))
    _ort_registered = True


def _define_ort_op(onnx_op, op_type: str, inputs: list, attrs: dict, kind: tuple[bool, bool]) -> None:
    import numpy as np

    @onnx_op(op_type=op_type, inputs=inputs, outputs=[inputs[0]], attrs=attrs)
    def kernel(q, k, v, attention_mask, *more, **attributes):
        try:
            return _ort_kernel(q, k, v, attention_mask, more, kind, attributes)
        except Exception as e:      # noqa: BLE001 - anything escaping here kills the process
            _ort_errors.append(f"{type(e).__name__}: {e}")
            return np.full((*q.shape[:3], attributes["rank_v"]), np.nan, dtype=np.float32)


def ort_op_type(op_type: str, kv_dtype: str | None) -> str:
    """The name ORT knows a node's Python op by: the op type, with the code type where the cache is quantized
    (a Python op has one type per input)."""
    return op_type if kv_dtype is None else f"{op_type}_{kv_dtype}"


def _ort_kernel(q, k, v, attention_mask, more, kind: tuple[bool, bool], attributes):
    latent, quantized = kind
    q, k, v, mask = (torch.from_numpy(a) for a in (q, k, v, attention_mask))
    more = [torch.from_numpy(a) for a in more]
    if quantized:
        k_scale, v_scale = (s.half() for s in more[:2])                   # fp16 values, cast to fp32 on the way in
        kv_dtype = attributes["kv_dtype"]
        k_counts, v_counts = parse_layout(attributes["kv_layout"])
        k = Quantized(k, k_scale, kv_dtype, attributes["rank_k"], k_counts)
        v = Quantized(v, v_scale, kv_dtype, attributes["rank_v"], v_counts)
    latent_keys = LatentKeys(*more[-3:], more[-4]) if latent else None
    shapes = {"num_heads": q.shape[1], "num_kv_heads": latent_keys.heads if latent else k.shape[1],
              "rank_k": k.shape[3], "rank_v": v.shape[3]}
    if latent:
        shapes["head_dim"] = q.shape[3]
    wrong = {name: (attributes[name], got) for name, got in shapes.items() if attributes[name] != got}
    if wrong:           # the node's attributes must describe its inputs: TensorRT's plugin trusts them
        raise ValueError(f"{OP_TYPE} attributes disagree with the input shapes (attribute, shape): {wrong}")
    with torch.no_grad():
        return lowrank_attention_reference(q, k, v, mask, attributes["scale"], latent_keys).numpy()


def take_ort_error() -> str | None:
    """The first error the ORT op recorded since the last call (and forget them all), or None."""
    errors = list(_ort_errors)
    _ort_errors.clear()
    return errors[0] if errors else None


def complete_attributes(node) -> None:
    """Give a quantized node exported before the `kv_layout` attribute existed (int8 / int4 codes then) the empty
    layout: ORT's Python op and the TensorRT plugin both declare every attribute and refuse a node without one."""
    from onnx import helper

    if node.op_type.endswith("Quantized") and not any(a.name == "kv_layout" for a in node.attribute):
        node.attribute.append(helper.make_attribute("kv_layout", ""))


def for_onnxruntime(model) -> int:
    """Move the plugin nodes of an onnx ModelProto (in memory) into the domain ORT's Python ops live in, each
    named as register_ort_op registered its kind (ort_op_type)."""
    from onnx import TensorProto, helper

    count = 0
    nodes = []
    for node in model.graph.node:
        if node.op_type in OP_TYPES.values() and node.domain == DOMAIN:
            complete_attributes(node)
            kv_dtype = next((a.s.decode() for a in node.attribute if a.name == "kv_dtype"), None)
            node.op_type = ort_op_type(node.op_type, kv_dtype)
            node.domain = ORT_PYOP_DOMAIN
            for i in range(4, 6 if kv_dtype else 4):        # fp16 scales -> fp32, which the Python op API can take
                cast = f"{node.input[i]}.fp32.{count}"
                nodes.append(helper.make_node("Cast", [node.input[i]], [cast], to=TensorProto.FLOAT))
                node.input[i] = cast
            count += 1
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if ORT_PYOP_DOMAIN not in {o.domain for o in model.opset_import}:
        model.opset_import.add(domain=ORT_PYOP_DOMAIN, version=1)
    return count
