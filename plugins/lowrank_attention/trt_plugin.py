"""TensorRT registration of the low-rank attention op (DESIGN 6) through `tensorrt.plugin` (TensorRT >= 10.15).

The ONNX plugin graph (`onnx/model_plugin.onnx`) holds one `LowRankAttention` node per layer, domain and
`plugin_namespace` "eigen_export", `plugin_version` "1"; TensorRT's ONNX parser maps such a node to the
plugin registered here as "eigen_export::LowRankAttention" (op_type = plugin name, plus the namespace
attribute: https://github.com/NVIDIA/TensorRT/tree/main/samples/python/quickly_deployable_plugins#onnx-model-with-a-plugin).

Three definitions, as the quickly deployable plugin (QDP) API wants them
(https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/pluginGuide.html):
- `@trtp.register`: the output descriptor, q's dtype and shape with the last dim taken from v ([B, H, S, r_v]).
- `@trtp.aot_impl`: the Triton prefill kernel compiled to PTX at engine build time, with its launch grid
  and the two runtime sizes (S, P+S) as symbolic int32 expressions. The engine then holds the kernel
  itself: no Python runs when it executes. The parser takes this path for nodes that carry `aot=1`,
  which `eigen_export.build` adds to a copy of the graph it parses (the exported file stays as exported).
- `@trtp.impl`: the JIT path, a Python callback into `triton_kernels.lowrank_attention` (flash decoding
  for S = 1). It needs Python and this module at engine run time; it is the fallback, not the plan.

Why the AOT path runs the one-pass prefill kernel for decode too: an AOT implementation returns ONE kernel
and TensorRT launches it once per call. Flash decoding is two launches (split, then reduce) plus a
scratch buffer, so it is JIT-only. The prefill kernel handles S = 1 correctly (one program per
(query block, batch, head) walks the whole cache); it reads each KV head once per query head rather than
once per GQA group, which costs decode bandwidth at long contexts - the measured price of a Python-free engine.

Everything TensorRT-specific is imported inside `register()`; the PTX compile (`compile_prefill_ptx`) needs
Triton only, and Triton compiles for a given GPU target without a GPU, so it is tested on CPU machines.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from .reference import NAMESPACE as PLUGIN_NAMESPACE
from .reference import OP_NAME as PLUGIN_NAME
from .reference import VERSION as PLUGIN_VERSION
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
# onnx_op.OP_TYPES
QUANTIZED_OP, LATENT_OP, LATENT_QUANTIZED_OP = (f"{PLUGIN_NAME}{kind}" for kind in ("Quantized", "LatentK",
                                                                                   "LatentKQuantized"))
AOT_OPS = (PLUGIN_NAME, QUANTIZED_OP, LATENT_OP, LATENT_QUANTIZED_OP)   # the op types with a compiled (AOT) kernel
# 10.9 brought tensorrt.plugin; 10.15's ONNX parser reads opsets up to 24 (the export's default is 23)
MIN_TENSORRT = (10, 15)
INSTALL_HINT = ("TensorRT >= 10.15 with tensorrt.plugin is needed: pip install 'eigen_export[tensorrt]' "
                "on a machine with an NVIDIA GPU")
# Compute capability the PTX is compiled for when no GPU tells us (H100); PTX of an older target JITs forward.
DEFAULT_TARGET = (9, 0)
# Shared memory a kernel may take without cuFuncSetAttribute (which a QDP launch does not call).
MAX_STATIC_SHARED = 48 * 1024

_registered = False


@dataclass(frozen=True)
class AotKernel:
    """A compiled kernel and what its launch needs: PTX entry name, warps, shared memory, query block."""
    name: str
    ptx: str
    num_warps: int
    shared_mem: int
    block_m: int


def register() -> None:
    """Register "eigen_export::LowRankAttention" with TensorRT's plugin registry (once per process).

    Call before parsing a plugin graph (the parser looks the creator up) and before deserializing an engine
    built from one (the JIT path needs the Python callback; the AOT path does not, but registering is harmless).
    """
    global _registered
    if _registered:
        return
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError:
        raise RuntimeError(INSTALL_HINT) from None
    if _version_tuple(trt.__version__) < MIN_TENSORRT:
        raise RuntimeError(f"TensorRT {trt.__version__} is installed; {INSTALL_HINT}")
    _define(trt, trtp)
    _registered = True


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


def _define(trt, trtp) -> None:
    from typing import Tuple

    def describe(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, attention_mask: trtp.TensorDesc,
                 scale: float, num_heads: int, num_kv_heads: int, rank_k: int, rank_v: int,
                 rope_mode: str) -> trtp.TensorDesc:
        # out: [B, H, S, r_v] in q's dtype (https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/
        # python-api/infer/tensorrt.plugin/trt_plugin_register.html)
        return trtp.from_shape_expr((q.shape_expr[0], q.shape_expr[1], q.shape_expr[2], v.shape_expr[3]),
                                    dtype=q.dtype)

    def compile_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, attention_mask: trtp.TensorDesc,
                    scale: float, num_heads: int, num_kv_heads: int, rank_k: int, rank_v: int,
                    outputs: Tuple[trtp.TensorDesc], tactic: int):
        # Returns (kernel name, PTX, launch params, extra scalar args); extra args are int32 only, so the
        # softmax scale and the head counts / ranks are compiled in as constants (they are per-node
        # attributes, fixed for the engine). Attributes are not serialized on this path.
        # https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/tensorrt.plugin/
        # trt_plugin_aot_impl/index.html
        return aot_launch(q, k, num_heads, compile_prefill_ptx(
            _DTYPE_NAMES[q.dtype], num_heads, num_kv_heads, rank_k, rank_v, scale, target=_current_target(),
            ptx_version=driver_ptx_version()))

    def compile_aot_latent(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                           attention_mask: trtp.TensorDesc, key_positions: trtp.TensorDesc,
                           basis_cos: trtp.TensorDesc, basis_sin: trtp.TensorDesc, freq: trtp.TensorDesc,
                           scale: float, num_heads: int, num_kv_heads: int, rank_k: int, rank_v: int, head_dim: int,
                           outputs: Tuple[trtp.TensorDesc], tactic: int):
        # a float LowRankAttentionLatentK node (pre mode): the same kernel with the latent-key inputs
        return aot_launch(q, k, num_heads, compile_prefill_ptx(
            _DTYPE_NAMES[q.dtype], num_heads, num_kv_heads, rank_k, rank_v, scale, target=_current_target(),
            ptx_version=driver_ptx_version(), head_dim=head_dim), latent=True)

    def compile_aot_quantized(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                              attention_mask: trtp.TensorDesc, k_scale: trtp.TensorDesc, v_scale: trtp.TensorDesc,
                              scale: float, num_heads: int, num_kv_heads: int, rank_k: int, rank_v: int,
                              kv_dtype: str, kv_layout: str, outputs: Tuple[trtp.TensorDesc], tactic: int):
        # a LowRankAttentionQuantized node: the kernel dequantizes the codes on load; the ranks come from the
        # attributes (int4 codes are ceil(rank / 2) wide, mixed ones as their layout packs them)
        return aot_launch(q, k, num_heads, compile_prefill_ptx(
            _DTYPE_NAMES[q.dtype], num_heads, num_kv_heads, rank_k, rank_v, scale, target=_current_target(),
            ptx_version=driver_ptx_version(), kv_dtype=kv_dtype, kv_layout=kv_layout))

    def compile_aot_latent_quantized(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                                     attention_mask: trtp.TensorDesc, k_scale: trtp.TensorDesc,
                                     v_scale: trtp.TensorDesc, key_positions: trtp.TensorDesc,
                                     basis_cos: trtp.TensorDesc, basis_sin: trtp.TensorDesc, freq: trtp.TensorDesc,
                                     scale: float, num_heads: int, num_kv_heads: int, rank_k: int, rank_v: int,
                                     kv_dtype: str, kv_layout: str, head_dim: int, outputs: Tuple[trtp.TensorDesc],
                                     tactic: int):
        return aot_launch(q, k, num_heads, compile_prefill_ptx(
            _DTYPE_NAMES[q.dtype], num_heads, num_kv_heads, rank_k, rank_v, scale, target=_current_target(),
            ptx_version=driver_ptx_version(), head_dim=head_dim, kv_dtype=kv_dtype, kv_layout=kv_layout), latent=True)

    def aot_launch(q: trtp.TensorDesc, k: trtp.TensorDesc, num_heads: int, kernel: AotKernel, latent: bool = False):
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(q.shape_expr[2], kernel.block_m)        # query blocks
        launch.grid_y = q.shape_expr[0] * num_heads                       # batch x query heads
        launch.block_x = kernel.num_warps * 32
        launch.shared_mem = kernel.shared_mem
        # the kernel's seq_len, total_len and, with latent keys, cache_heads
        sizes = (q.shape_expr[2], k.shape_expr[2]) + ((k.shape_expr[1],) if latent else ())
        extra = trtp.SymIntExprs(len(sizes))
        for i, size in enumerate(sizes):
            extra[i] = trtp.SymInt32(size)
        return kernel.name, kernel.ptx, launch, extra

    def run_jit(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, attention_mask: trtp.Tensor, scale: float,
                outputs: Tuple[trtp.Tensor], stream: int) -> None:
        # JIT path: TensorRT calls back into Python with device tensors (they export
        # __cuda_array_interface__) on its stream.
        import torch

        from .triton_kernels import lowrank_attention

        tensors = [torch.as_tensor(t, device="cuda") for t in (q, k, v, attention_mask)]
        out = torch.as_tensor(outputs[0], device="cuda")
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            out.copy_(lowrank_attention(*tensors, scale))

    # The other op types (onnx_op.OP_TYPES): quantized caches (codes + fp16 scales per side) and pre-RoPE key
    # latents (positions, two maps, frequencies); each has an AOT kernel above and this JIT fallback. The output's
    # last dim is the rank_v attribute: int4 codes are ceil(rank_v / 2) wide. ShapeExpr takes ints as constants
    # (https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/tensorrt.plugin/Shape/ShapeExpr.html).
    def describe_quantized(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                           attention_mask: trtp.TensorDesc, k_scale: trtp.TensorDesc, v_scale: trtp.TensorDesc,
                           scale: float, num_heads: int, num_kv_heads: int, rank_k: int, rank_v: int,
                           rope_mode: str, kv_dtype: str, kv_layout: str) -> trtp.TensorDesc:
        return trtp.from_shape_expr((q.shape_expr[0], q.shape_expr[1], q.shape_expr[2], rank_v), dtype=q.dtype)

    def describe_latent(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, attention_mask: trtp.TensorDesc,
                        key_positions: trtp.TensorDesc, basis_cos: trtp.TensorDesc, basis_sin: trtp.TensorDesc,
                        freq: trtp.TensorDesc, scale: float, num_heads: int, num_kv_heads: int, rank_k: int,
                        rank_v: int, rope_mode: str, head_dim: int) -> trtp.TensorDesc:
        return trtp.from_shape_expr((q.shape_expr[0], q.shape_expr[1], q.shape_expr[2], rank_v), dtype=q.dtype)

    def describe_latent_quantized(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                                  attention_mask: trtp.TensorDesc, k_scale: trtp.TensorDesc,
                                  v_scale: trtp.TensorDesc, key_positions: trtp.TensorDesc,
                                  basis_cos: trtp.TensorDesc, basis_sin: trtp.TensorDesc, freq: trtp.TensorDesc,
                                  scale: float, num_heads: int, num_kv_heads: int, rank_k: int, rank_v: int,
                                  rope_mode: str, kv_dtype: str, kv_layout: str, head_dim: int) -> trtp.TensorDesc:
        return trtp.from_shape_expr((q.shape_expr[0], q.shape_expr[1], q.shape_expr[2], rank_v), dtype=q.dtype)

    def run_quantized(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, attention_mask: trtp.Tensor,
                      k_scale: trtp.Tensor, v_scale: trtp.Tensor, scale: float, rank_k: int, rank_v: int,
                      kv_dtype: str, kv_layout: str, outputs: Tuple[trtp.Tensor], stream: int) -> None:
        _run_jit((q, k, v, attention_mask), (k_scale, v_scale, kv_dtype, kv_layout), None, scale, rank_k, rank_v,
                 outputs, stream)

    def run_latent(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, attention_mask: trtp.Tensor,
                   key_positions: trtp.Tensor, basis_cos: trtp.Tensor, basis_sin: trtp.Tensor, freq: trtp.Tensor,
                   scale: float, rank_k: int, rank_v: int, outputs: Tuple[trtp.Tensor], stream: int) -> None:
        _run_jit((q, k, v, attention_mask), None, (key_positions, basis_cos, basis_sin, freq), scale, rank_k, rank_v,
                 outputs, stream)

    def run_latent_quantized(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, attention_mask: trtp.Tensor,
                             k_scale: trtp.Tensor, v_scale: trtp.Tensor, key_positions: trtp.Tensor,
                             basis_cos: trtp.Tensor, basis_sin: trtp.Tensor, freq: trtp.Tensor, scale: float,
                             rank_k: int, rank_v: int, kv_dtype: str, kv_layout: str, outputs: Tuple[trtp.Tensor],
                             stream: int) -> None:
        _run_jit((q, k, v, attention_mask), (k_scale, v_scale, kv_dtype, kv_layout),
                 (key_positions, basis_cos, basis_sin, freq), scale, rank_k, rank_v, outputs, stream)

    # This module's annotations are strings (PEP 563, which the Triton entry below relies on); tensorrt.plugin
    # validates type hints as objects, so they are resolved before the decorators see the functions.
    names = {"trtp": trtp, "Tuple": Tuple}
    trtp.register(PLUGIN_ID)(_resolve_hints(describe, names))
    trtp.aot_impl(PLUGIN_ID)(_resolve_hints(compile_aot, names))
    trtp.impl(PLUGIN_ID)(_resolve_hints(run_jit, names))
    for op_type, compile_op in ((QUANTIZED_OP, compile_aot_quantized), (LATENT_OP, compile_aot_latent),
                                (LATENT_QUANTIZED_OP, compile_aot_latent_quantized)):
        trtp.aot_impl(f"{PLUGIN_NAMESPACE}::{op_type}")(_resolve_hints(compile_op, names))
    for op_type, shape, run in ((QUANTIZED_OP, describe_quantized, run_quantized),
                                (LATENT_OP, describe_latent, run_latent),
                                (LATENT_QUANTIZED_OP, describe_latent_quantized, run_latent_quantized)):
        trtp.register(f"{PLUGIN_NAMESPACE}::{op_type}")(_resolve_hints(shape, names))
        trtp.impl(f"{PLUGIN_NAMESPACE}::{op_type}")(_resolve_hints(run, names))
    _DTYPE_NAMES.update({trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"})


def _run_jit(tensors, quantized, latent, scale: float, rank_k: int, rank_v: int, outputs, stream: int) -> None:
    """The JIT path of a quantized or latent-key node: codes and scales wrapped as kv_codec.Quantized (quantized:
    (k_scale, v_scale, kv_dtype, kv_layout)), the latent-key inputs as latent_rope.LatentKeys (latent: (positions,
    basis_cos, basis_sin, freq)), for the Triton entry."""
    import torch

    from .kv_codec import Quantized, parse_layout
    from .latent_rope import LatentKeys
    from .triton_kernels import lowrank_attention

    def device(t):
        return torch.as_tensor(t, device="cuda")

    q, k, v, mask = (device(t) for t in tensors)
    if quantized is not None:
        k_scale, v_scale, kv_dtype, kv_layout = quantized
        k_counts, v_counts = parse_layout(kv_layout)
        k = Quantized(k, device(k_scale), kv_dtype, rank_k, k_counts)
        v = Quantized(v, device(v_scale), kv_dtype, rank_v, v_counts)
    latent_keys = None
    if latent is not None:
        positions, basis_cos, basis_sin, freq = (device(t) for t in latent)
        latent_keys = LatentKeys(basis_cos, basis_sin, freq, positions)
    out = device(outputs[0])
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        out.copy_(lowrank_attention(q, k, v, mask, scale, latent_keys=latent_keys))


def _resolve_hints(fn, names: dict):
    import typing

    fn.__annotations__ = typing.get_type_hints(fn, localns=names)
    return fn


_DTYPE_NAMES: dict = {}


def driver_ptx_version() -> int | None:
    """The newest PTX ISA the installed CUDA driver can JIT (e.g. 87 for a CUDA 12.8 driver), None without one.

    Triton writes the PTX ISA of the ptxas it ships (9.x with CUDA 13 tools); the engine's PTX is loaded
    by the driver of the machine that runs it, which may be older, so the ISA is capped to it.
    """
    import ctypes

    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except OSError:
        return None
    from triton.backends.nvidia.compiler import ptx_get_version

    return ptx_get_version(f"{version.value // 1000}.{version.value % 1000 // 10}")


def _current_target() -> tuple[int, int]:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_capability()
    except ImportError:
        pass
    return DEFAULT_TARGET


# -- the AOT kernel ---------------------------------------------------------------------------------------
# TensorRT launches an AOT kernel with (input pointers..., extra int32 args..., output pointers...), in that
# order (https://docs.pytorch.org/TensorRT/tutorials/_rendered_examples/dynamo/triton_op.html), and its
# tensors are contiguous (linear format, the default without @trtp.autotune:
# https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/tensorrt.plugin/
# trt_plugin_autotune/index.html).
# This entry has that signature and derives every stride from the shapes before calling the prefill kernel
# of triton_kernels.py, so the kernel itself is shared with the JIT path and the CPU-interpreter tests.
tl = _prefill_kernel = _contiguous_prefill = None   # bound on first use by _aot_entry (triton must not load at import)


def lowrank_attention_aot(q_ptr, k_ptr, v_ptr, mask_ptr, seq_len, total_len, out_ptr,
                          NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, RANK_K: tl.constexpr,
                          RANK_V: tl.constexpr, QK_SCALE_LOG2: tl.constexpr, IEEE_DOT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RK_PAD: tl.constexpr,
                          RV_PAD: tl.constexpr):
    # a float node: the scale and latent-key pointers are placeholders the kernel never reads
    _contiguous_prefill(q_ptr, k_ptr, v_ptr, mask_ptr, k_ptr, v_ptr, mask_ptr, q_ptr, q_ptr, q_ptr, seq_len,
                        total_len, NUM_HEADS // GROUP, out_ptr, NUM_HEADS, GROUP, RANK_K, RANK_V, RANK_K, RANK_K,
                        RANK_V, QK_SCALE_LOG2, IEEE_DOT, False, 0, 0, 0, 0, 0, BLOCK_M, BLOCK_N, RK_PAD, RV_PAD,
                        RK_PAD)


def lowrank_attention_quantized_aot(q_ptr, k_ptr, v_ptr, mask_ptr, ks_ptr, vs_ptr, seq_len, total_len, out_ptr,
                                    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, RANK_K: tl.constexpr,
                                    RANK_V: tl.constexpr, QK_SCALE_LOG2: tl.constexpr, IEEE_DOT: tl.constexpr,
                                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RK_PAD: tl.constexpr,
                                    RV_PAD: tl.constexpr, BITS: tl.constexpr, K_ROW: tl.constexpr,
                                    V_ROW: tl.constexpr, K_N8: tl.constexpr, K_N4: tl.constexpr,
                                    V_N8: tl.constexpr, V_N4: tl.constexpr):
    # a LowRankAttentionQuantized node: k and v are codes, ks and vs their fp16 scales
    _contiguous_prefill(q_ptr, k_ptr, v_ptr, mask_ptr, ks_ptr, vs_ptr, mask_ptr, q_ptr, q_ptr, q_ptr, seq_len,
                        total_len, NUM_HEADS // GROUP, out_ptr, NUM_HEADS, GROUP, RANK_K, RANK_V, RANK_K, K_ROW, V_ROW,
                        QK_SCALE_LOG2, IEEE_DOT, False, BITS, K_N8, K_N4, V_N8, V_N4, BLOCK_M, BLOCK_N, RK_PAD,
                        RV_PAD, RK_PAD)


def lowrank_attention_latent_aot(q_ptr, k_ptr, v_ptr, mask_ptr, pos_ptr, cos_ptr, sin_ptr, freq_ptr, seq_len,
                                 total_len, cache_heads, out_ptr,
                                 NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, RANK_K: tl.constexpr,
                                 RANK_V: tl.constexpr, HEAD_DIM: tl.constexpr, QK_SCALE_LOG2: tl.constexpr,
                                 IEEE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 RK_PAD: tl.constexpr, RV_PAD: tl.constexpr, QK_PAD: tl.constexpr):
    # a LowRankAttentionLatentK node: q is head_dim wide, k holds the key latents (one head if joint)
    _contiguous_prefill(q_ptr, k_ptr, v_ptr, mask_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, freq_ptr, seq_len,
                        total_len, cache_heads, out_ptr, NUM_HEADS, GROUP, RANK_K, RANK_V, HEAD_DIM, RANK_K, RANK_V,
                        QK_SCALE_LOG2, IEEE_DOT, True, 0, 0, 0, 0, 0, BLOCK_M, BLOCK_N, RK_PAD, RV_PAD, QK_PAD)


def lowrank_attention_latent_quantized_aot(q_ptr, k_ptr, v_ptr, mask_ptr, ks_ptr, vs_ptr, pos_ptr, cos_ptr, sin_ptr,
                                           freq_ptr, seq_len, total_len, cache_heads, out_ptr,
                                           NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, RANK_K: tl.constexpr,
                                           RANK_V: tl.constexpr, HEAD_DIM: tl.constexpr,
                                           QK_SCALE_LOG2: tl.constexpr, IEEE_DOT: tl.constexpr,
                                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RK_PAD: tl.constexpr,
                                           RV_PAD: tl.constexpr, QK_PAD: tl.constexpr, BITS: tl.constexpr,
                                           K_ROW: tl.constexpr, V_ROW: tl.constexpr, K_N8: tl.constexpr,
                                           K_N4: tl.constexpr, V_N8: tl.constexpr, V_N4: tl.constexpr):
    # a LowRankAttentionLatentKQuantized node: the key latents and the values as codes, then their scales
    _contiguous_prefill(q_ptr, k_ptr, v_ptr, mask_ptr, ks_ptr, vs_ptr, pos_ptr, cos_ptr, sin_ptr, freq_ptr, seq_len,
                        total_len, cache_heads, out_ptr, NUM_HEADS, GROUP, RANK_K, RANK_V, HEAD_DIM, K_ROW, V_ROW,
                        QK_SCALE_LOG2, IEEE_DOT, True, BITS, K_N8, K_N4, V_N8, V_N4, BLOCK_M, BLOCK_N, RK_PAD, RV_PAD,
                        QK_PAD)


def contiguous_prefill(q_ptr, k_ptr, v_ptr, mask_ptr, ks_ptr, vs_ptr, pos_ptr, cos_ptr, sin_ptr, freq_ptr, seq_len,
                       total_len, cache_heads, out_ptr, NUM_HEADS: tl.constexpr, GROUP: tl.constexpr,
                       RANK_K: tl.constexpr, RANK_V: tl.constexpr, QK_DIM: tl.constexpr, K_ROW: tl.constexpr,
                       V_ROW: tl.constexpr,
                       QK_SCALE_LOG2: tl.constexpr, IEEE_DOT: tl.constexpr, LATENT_KEYS: tl.constexpr,
                       BITS: tl.constexpr, K_N8: tl.constexpr, K_N4: tl.constexpr, V_N8: tl.constexpr,
                       V_N4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RK_PAD: tl.constexpr,
                       RV_PAD: tl.constexpr, QK_PAD: tl.constexpr):
    """The prefill kernel on contiguous tensors, every stride derived from the shapes: q [B, H, S, QK_DIM],
    k [B, C, T, K_ROW], v [B, C, T, V_ROW] (K_ROW = r_k floats or int8 codes, ceil(r_k / 2) bytes of int4 codes;
    V_ROW alike; C = cache_heads, H_kv or, a joint latent, 1: read by every KV head through a head stride of 0),
    mask [B, T], out [B, H, S, r_v]; with codes (BITS: triton_kernels.CODE_KINDS; mixed codes' 8- and 4-bit runs
    K_N8 / K_N4 and V_N8 / V_N4 long), scales ks / vs [B, C, T, 1]; with latent keys,
    key positions [B, T], basis_cos / basis_sin [H_kv, r_k, QK_DIM], freq [QK_DIM]. Pointers a node does not have
    are placeholders the kernel never reads (BITS 0: no scales; LATENT_KEYS False)."""
    NUM_KV_HEADS: tl.constexpr = NUM_HEADS // GROUP
    per_head = cache_heads // NUM_KV_HEADS          # 1, or 0 for a joint latent
    _prefill_kernel(
        q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, mask_ptr, out_ptr, cos_ptr, sin_ptr, freq_ptr, pos_ptr,
        NUM_HEADS * seq_len * QK_DIM, seq_len * QK_DIM, QK_DIM, 1,
        cache_heads * total_len * K_ROW, per_head * total_len * K_ROW, K_ROW, 1,
        cache_heads * total_len * V_ROW, per_head * total_len * V_ROW, V_ROW, 1,
        cache_heads * total_len, per_head * total_len, 1, cache_heads * total_len, per_head * total_len, 1,
        total_len, 1,
        NUM_HEADS * seq_len * RANK_V, seq_len * RANK_V, RANK_V, 1,
        RANK_K * QK_DIM, QK_DIM, 1, total_len, 1,
        NUM_HEADS, seq_len, total_len, GROUP, RANK_K, RANK_V, QK_DIM, QK_SCALE_LOG2, K_N8, K_N4, V_N8, V_N4,
        True, IEEE_DOT, BITS, BITS, LATENT_KEYS, BLOCK_M, BLOCK_N, RK_PAD, RV_PAD, QK_PAD)


_ENTRIES = {(False, False): lowrank_attention_aot, (False, True): lowrank_attention_quantized_aot,
            (True, False): lowrank_attention_latent_aot, (True, True): lowrank_attention_latent_quantized_aot}


@functools.lru_cache(maxsize=None)
def _aot_entry(latent: bool = False, quantized: bool = False):
    """The AOT entry of a node type (latent keys or not, codes or floats) as a Triton kernel. Triton resolves a
    kernel's names in its module's globals, so `tl`, `_prefill_kernel` and `_contiguous_prefill` are bound here,
    on first use, rather than at import (this module must import without triton, and triton_kernels must load
    after TRITON_INTERPRET is set)."""
    import triton
    import triton.language

    from .triton_kernels import _prefill_kernel

    if _contiguous_prefill is None:
        globals().update(tl=triton.language, _prefill_kernel=_prefill_kernel,
                         _contiguous_prefill=triton.jit(contiguous_prefill))
    return triton.jit(_ENTRIES[latent, quantized])


# what TensorRT passes an AOT kernel, by (latent, quantized): the node's inputs, the int32 sizes (S, P+S; a latent-key
# node: and the cache's head count, H_kv or 1 for a joint latent), the output
_ENTRY_PARAMS = {(False, False): 7, (False, True): 9, (True, False): 12, (True, True): 14}
_TRITON_TYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
_CODE_TYPES = {"int8": "*i8", "int4": "*u8", "mixed": "*u8"}       # kv_codec's storage of each format


@functools.lru_cache(maxsize=None)
def compile_prefill_ptx(dtype: str, num_heads: int, num_kv_heads: int, rank_k: int, rank_v: int, scale: float,
                        target: tuple[int, int] = DEFAULT_TARGET, ptx_version: int | None = None,
                        head_dim: int | None = None, kv_dtype: str | None = None, kv_layout: str = "") -> AotKernel:
    """The AOT kernel for one layer's attributes, compiled to PTX for sm_<target> (no GPU needed).

    ptx_version: cap on the PTX ISA (e.g. 87 = 8.7), see driver_ptx_version(); None = what Triton's ptxas takes.
    head_dim: a LowRankAttentionLatentK node's (its keys are rank_k latents turned into head_dim-wide keys).
    kv_dtype: a quantized node's ("int8" | "int4" | "mixed"): k and v are codes, followed by their fp16 scales;
    kv_layout: a mixed node's counts of 8 / 4 / 2-bit numbers (its `kv_layout` attribute, kv_codec.parse_layout).
    """
    import triton
    from triton.backends.compiler import GPUTarget

    from .kv_codec import code_width, packed_runs, parse_layout
    from .triton_kernels import CODE_KINDS, LOG2E, PrefillConfig, _padded

    if dtype not in _TRITON_TYPES:
        raise ValueError(f"lowrank_attention AOT: dtype {dtype!r} is not one of {', '.join(_TRITON_TYPES)}")
    if kv_dtype is not None and kv_dtype not in _CODE_TYPES:
        raise ValueError(f"lowrank_attention AOT: kv_dtype {kv_dtype!r} is not one of {', '.join(_CODE_TYPES)}")
    codes = {}
    if kv_dtype is not None:        # the code kind, each side's row width in bytes and its packed runs
        k_counts, v_counts = parse_layout(kv_layout)
        (k_n8, k_n4), (v_n8, v_n4) = packed_runs(kv_dtype, rank_k, k_counts), packed_runs(kv_dtype, rank_v, v_counts)
        codes = {"BITS": CODE_KINDS[kv_dtype], "K_ROW": code_width(rank_k, kv_dtype, k_counts),
                 "V_ROW": code_width(rank_v, kv_dtype, v_counts), "K_N8": k_n8, "K_N4": k_n4, "V_N8": v_n8,
                 "V_N4": v_n4}
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"lowrank_attention AOT: num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
    rk_pad, rv_pad = _padded(rank_k), _padded(rank_v)
    latent = head_dim is not None
    qk_pad = _padded(head_dim) if latent else rk_pad
    ieee = dtype == "fp32"
    quantized = kv_dtype is not None
    pointer = _TRITON_TYPES[dtype]
    cache = _CODE_TYPES[kv_dtype] if quantized else pointer
    signature = {"q_ptr": pointer, "k_ptr": cache, "v_ptr": cache, "mask_ptr": "*i64"}
    if quantized:
        signature |= {"ks_ptr": "*fp16", "vs_ptr": "*fp16"}
    if latent:
        signature |= {"pos_ptr": "*i64", "cos_ptr": pointer, "sin_ptr": pointer, "freq_ptr": "*fp32"}
    signature |= {"seq_len": "i32", "total_len": "i32"} | ({"cache_heads": "i32"} if latent else {})
    signature |= {"out_ptr": pointer}
    arch = target[0] * 10 + target[1]
    options = {}
    if ptx_version is not None:
        from triton.backends.nvidia.compiler import get_ptxas, ptx_get_version

        options["ptx_version"] = min(ptx_version, ptx_get_version(get_ptxas(arch).version))
    # Tiles from the JIT launcher's choice down to ones that fit in 48 KB of shared memory: above that a
    # launch must opt in (cuFuncSetAttribute), and the QDP documentation does not say TensorRT does.
    configs = [PrefillConfig(block_m=64, block_n=32) if ieee or max(rk_pad, rv_pad, qk_pad) > 128 else PrefillConfig(),
               PrefillConfig(block_m=64, block_n=32), PrefillConfig(block_m=32, block_n=32),
               PrefillConfig(block_m=32, block_n=32, num_stages=1)]
    for config in configs:
        constexprs = {"NUM_HEADS": num_heads, "GROUP": num_heads // num_kv_heads, "RANK_K": rank_k,
                      "RANK_V": rank_v, "QK_SCALE_LOG2": float(scale) * LOG2E, "IEEE_DOT": ieee,
                      "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "RK_PAD": rk_pad, "RV_PAD": rv_pad}
        if latent:
            constexprs |= {"HEAD_DIM": head_dim, "QK_PAD": qk_pad}
        if quantized:
            constexprs |= codes
        source = triton.compiler.ASTSource(_aot_entry(latent, quantized), signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options=dict(options, num_warps=config.num_warps, num_stages=config.num_stages))
        if compiled.metadata.shared <= MAX_STATIC_SHARED:
            break
    meta = compiled.metadata
    if meta.shared > MAX_STATIC_SHARED:
        raise RuntimeError(f"lowrank_attention AOT: the kernel needs {meta.shared} bytes of shared memory "
                           f"(ranks {rank_k}/{rank_v}, {dtype}) even with the smallest tiles")
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        raise RuntimeError("lowrank_attention AOT: the compiled kernel needs a scratch buffer, "
                           "which a TensorRT AOT launch does not pass")
    ptx = drop_unused_entry_params(compiled.asm["ptx"], meta.name, _ENTRY_PARAMS[latent, quantized])
    return AotKernel(name=meta.name, ptx=ptx, num_warps=meta.num_warps, shared_mem=meta.shared,
                     block_m=config.block_m)


def drop_unused_entry_params(ptx: str, entry: str, keep: int) -> str:
    """Remove the trailing parameters Triton >= 3.3 appends to every kernel (global / profile scratch
    pointers) so that the entry takes exactly the `keep` arguments TensorRT passes.

    Only parameters after the first `keep` that the body never loads are removed; anything else is an
    error, because launching with fewer arguments than the entry reads would read garbage.
    """
    match = re.search(rf"\.entry\s+{re.escape(entry)}\s*\((.*?)\)", ptx, re.S)
    if match is None:
        raise RuntimeError(f"lowrank_attention AOT: no .entry {entry} in the PTX")
    params = [p.strip() for p in match.group(1).split(",") if p.strip()]
    if len(params) < keep:
        raise RuntimeError(f"lowrank_attention AOT: entry {entry} takes {len(params)} parameters, expected {keep}")
    body = ptx[match.end():]
    for param in params[keep:]:
        name = param.split()[-1]
        if re.search(rf"\[{re.escape(name)}(\+\d+)?\]", body):
            raise RuntimeError(f"lowrank_attention AOT: the kernel reads its extra parameter {name}; "
                               "TensorRT would not pass it")
    if len(params) == keep:
        return ptx
    kept = ",\n".join("\t" + p for p in params[:keep])
    return ptx[:match.start(1)] + "\n" + kept + "\n" + ptx[match.end(1):]


__all__ = ["PLUGIN_ID", "PLUGIN_NAME", "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "INSTALL_HINT", "AotKernel",
           "register", "compile_prefill_ptx", "drop_unused_entry_params"]
