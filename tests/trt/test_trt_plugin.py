"""The TensorRT plugin's AOT kernel (plugins/lowrank_attention/trt_plugin.py) without TensorRT or a GPU:
Triton compiles PTX for a named GPU target on any machine, Triton's bundled ptxas assembles it, and the
AOT entry (TensorRT's argument order, strides derived from shapes) runs under the CPU interpreter against
the reference. What needs TensorRT itself (registration, parsing, the engine) is in test_trt_engine.py.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.shared import built_once

REPO = Path(__file__).resolve().parents[2]
from eigen_export_plugins.lowrank_attention.trt_plugin import (  # noqa: E402
    INSTALL_HINT, compile_prefill_ptx, drop_unused_entry_params, register,
)

triton = pytest.importorskip("triton")

# what TensorRT passes an AOT kernel: q, k, v, mask (a quantized node: and k_scale, v_scale; a latent-key node: and
# key_positions, basis_cos, basis_sin, freq), seq_len, total_len, out
INPUTS = {(False, False): 4, (False, True): 6, (True, False): 8, (True, True): 10}
SIZES = {False: 2, True: 3}     # int32 sizes: S, P+S (a latent-key node: and the cache's head count)


def _entry_params(ptx: str, name: str) -> list[str]:
    body = re.search(rf"\.entry\s+{name}\s*\((.*?)\)", ptx, re.S).group(1)
    return [p.strip() for p in body.split(",") if p.strip()]


def _ptxas(arch: int) -> Path | None:
    """The ptxas Triton itself uses for this architecture (it ships two: legacy and CUDA 13)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = Path(get_ptxas(arch).path)
    except Exception:           # no NVIDIA backend or no bundled binary
        return None
    return path if path.exists() else None


@pytest.mark.parametrize("dtype,heads,kv_heads,rank_k,rank_v,target,ptx_version,head_dim,kv_dtype", [
    ("fp16", 4, 2, 40, 56, (9, 0), None, None, None),    # GQA, ranks that are not powers of two
    ("bf16", 8, 8, 77, 80, (9, 0), 85, None, None),      # PTX ISA capped for a CUDA 12.6 driver
    ("fp32", 4, 1, 64, 64, (8, 0), None, None, None),    # IEEE dots, smaller tiles; an older target
    ("fp16", 9, 3, 40, 56, (9, 0), None, 64, None),      # latent keys (pre mode): SmolLM2's head shape
    ("bf16", 32, 8, 102, 80, (9, 0), None, 128, None),   # latent keys at a 7B head dim: within 48 KB of shared memory
    ("fp16", 4, 2, 40, 56, (9, 0), None, None, "int8"),  # quantized caches: codes and fp16 scales
    ("bf16", 32, 8, 77, 90, (9, 0), 85, None, "int4"),   # packed int4, odd rank
    ("fp16", 9, 3, 45, 45, (9, 0), None, 64, "int8"),    # SmolLM2 at KV 0.7, pre mode, int8 (the documented default)
    ("fp32", 32, 8, 102, 80, (8, 0), None, 128, "int4"),
    ("fp16", 9, 3, 45, 45, (9, 0), None, 64, "mixed"),   # mixed codes: the layout compiled in
])
def test_aot_kernel_compiles_to_ptx_with_tensorrts_signature(dtype, heads, kv_heads, rank_k, rank_v, target,
                                                             ptx_version, head_dim, kv_dtype):
    kernel = compile_prefill_ptx(dtype, heads, kv_heads, rank_k, rank_v, 0.125, target=target,
                                 ptx_version=ptx_version, head_dim=head_dim, kv_dtype=kv_dtype,
                                 kv_layout="11,23,11;15,15,15" if kv_dtype == "mixed" else "")
    if ptx_version is not None:
        assert f".version {ptx_version // 10}.{ptx_version % 10}" in kernel.ptx
    params = _entry_params(kernel.ptx, kernel.name)
    inputs = INPUTS[head_dim is not None, kv_dtype is not None]
    sizes = SIZES[head_dim is not None]
    assert len(params) == inputs + sizes + 1, params                   # Triton's scratch pointers dropped
    kinds = [p.split()[1] for p in params]
    assert kinds == [".u64"] * inputs + [".u32"] * sizes + [".u64"]   # inputs, int32 sizes, 1 output
    ptx_target = re.search(r"\.target (sm_\w+)", kernel.ptx).group(1)      # sm_90a: Hopper's arch-specific ISA
    assert ptx_target.startswith(f"sm_{target[0]}{target[1]}")
    assert kernel.num_warps * 32 == int(re.search(r"\.reqntid (\d+)", kernel.ptx).group(1))
    assert 0 < kernel.shared_mem <= 48 * 1024 and kernel.block_m in (32, 64)
    ptxas = _ptxas(target[0] * 10 + target[1])
    if ptxas is None:
        pytest.skip("triton ships no ptxas here: the trimmed PTX was not assembled")
    source = Path(os.environ.get("TMPDIR", "/tmp")) / f"lowrank-aot-{os.getpid()}-{dtype}.ptx"
    source.write_text(kernel.ptx)
    try:
        done = subprocess.run([str(ptxas), f"-arch={ptx_target}", str(source), "-o", os.devnull],
                              capture_output=True, text=True)
    finally:
        source.unlink()
    assert done.returncode == 0, done.stderr


def test_extra_parameters_that_the_kernel_reads_are_refused():
    ptx = (".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u64 k_param_1\n)\n{\n"
           "\tld.param.u64 %rd1, [k_param_0];\n\tld.param.u64 %rd2, [k_param_1];\n}\n")
    with pytest.raises(RuntimeError, match="reads its extra parameter k_param_1"):
        drop_unused_entry_params(ptx, "k", 1)
    unused = ptx.replace("\tld.param.u64 %rd2, [k_param_1];\n", "")
    assert _entry_params(drop_unused_entry_params(unused, "k", 1), "k") == [".param .u64 k_param_0"]
    assert drop_unused_entry_params(unused, "k", 2) == unused
    with pytest.raises(RuntimeError, match="no .entry other"):
        drop_unused_entry_params(ptx, "other", 1)


def test_bad_attributes_are_refused():
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=4"):
        compile_prefill_ptx("fp16", 4, 3, 32, 32, 0.125)
    with pytest.raises(ValueError, match="dtype 'int8'"):
        compile_prefill_ptx("int8", 4, 2, 32, 32, 0.125)
    with pytest.raises(ValueError, match="kv_dtype 'int2' is not one of int8, int4, mixed"):
        compile_prefill_ptx("fp16", 4, 2, 32, 32, 0.125, kv_dtype="int2")
    with pytest.raises(ValueError, match="a mixed cache of rank 32 needs counts"):
        compile_prefill_ptx("fp16", 4, 2, 32, 32, 0.125, kv_dtype="mixed")


def test_register_without_tensorrt_says_what_to_install():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError) as err:
            register()
        assert str(err.value) == INSTALL_HINT and "\n" not in INSTALL_HINT
        assert "pip install 'eigen_export[tensorrt]'" in INSTALL_HINT
        return
    pytest.skip("TensorRT is installed: registration is exercised by test_trt_engine.py")


# The AOT entry under the CPU interpreter. triton reads TRITON_INTERPRET when kernels are decorated, so
# (as in tests/test_lowrank_kernel.py) the cases run in one subprocess and report max errors as JSON.
_INTERPRETED = r"""
import json, sys
import torch
import triton
from eigen_export_plugins.lowrank_attention.kv_codec import Quantized, encode
from eigen_export_plugins.lowrank_attention.reference import lowrank_attention_reference
from eigen_export_plugins.lowrank_attention.latent_rope import LatentKeys, latent_key_tables
from eigen_export_plugins.lowrank_attention.trt_plugin import _aot_entry
from eigen_export_plugins.lowrank_attention.triton_kernels import CODE_KINDS, LOG2E, _padded

results = {}
for batch, heads, kv_heads, seq, past, rank_k, rank_v, dtype, head_dim, kv_dtype, joint in json.loads(sys.argv[2]):
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    total = past + seq
    cache_heads = 1 if joint else kv_heads
    q = torch.randn(batch, heads, seq, head_dim or rank_k, dtype=dt)
    k = torch.randn(batch, cache_heads, total, rank_k, dtype=dt)
    v = torch.randn(batch, cache_heads, total, rank_v, dtype=dt)
    mask = torch.ones(batch, total, dtype=torch.int64)
    if batch > 1:
        mask[1, :3] = 0                                   # left padding
    out = torch.empty(batch, heads, seq, rank_v, dtype=dt)
    scale = 0.17
    block_m = 64
    sizes = dict(NUM_HEADS=heads, GROUP=heads // kv_heads, RANK_K=rank_k, RANK_V=rank_v, QK_SCALE_LOG2=scale * LOG2E,
                 IEEE_DOT=dt == torch.float32, BLOCK_M=block_m, BLOCK_N=32, RK_PAD=_padded(rank_k),
                 RV_PAD=_padded(rank_v))
    grid = (triton.cdiv(seq, block_m), batch * heads)
    cache = [k, v]                                        # what the node takes after q: the cache, then the mask
    extra = []                                            # ... then the scales, then the latent-key inputs
    if kv_dtype:                                          # a quantized node: codes, the scales after the mask
        def side(t):                                      # mixed: 8-, 4- and 2-bit runs, odd lengths
            r = t.shape[-1]
            counts = (r // 4, r // 2 + 1, r - r // 4 - r // 2 - 1) if kv_dtype == "mixed" else None
            return Quantized(*encode(t.float(), kv_dtype, counts), kv_dtype, r, counts)
        k, v = side(k), side(v)
        cache, extra = [k.codes, v.codes], [k.scale, v.scale]
        (k_n8, k_n4), (v_n8, v_n4) = k.runs, v.runs
        sizes |= dict(BITS=CODE_KINDS[kv_dtype], K_ROW=k.codes.shape[-1], V_ROW=v.codes.shape[-1],
                      K_N8=k_n8, K_N4=k_n4, V_N8=v_n8, V_N4=v_n4)
    latent = None
    if head_dim:                                          # a LowRankAttentionLatentK node's inputs, in its order
        if joint:       # one orthonormal basis over all KV heads' features (ranks up to H_kv x d), in H_kv blocks
            width = kv_heads * head_dim
            basis = torch.linalg.qr(torch.randn(width, width))[0][:, :rank_k].reshape(kv_heads, head_dim, rank_k)
        else:
            basis = torch.linalg.qr(torch.randn(kv_heads, head_dim, head_dim))[0][..., :rank_k]
        basis = basis.to(dt)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        tables = (t.contiguous() for t in latent_key_tables(basis, inv_freq, head_dim, "half"))   # as TensorRT's are
        latent = LatentKeys(*tables, (mask.cumsum(-1) - 1).clamp(min=0))
        extra += [latent.positions, latent.basis_cos, latent.basis_sin, latent.freq]
        sizes |= dict(HEAD_DIM=head_dim, QK_PAD=_padded(head_dim))
    ints = [seq, total] + ([cache_heads] if head_dim else [])
    _aot_entry(bool(head_dim), bool(kv_dtype))[grid](q, *cache, mask, *extra, *ints, out, **sizes)
    want = lowrank_attention_reference(q, k, v, mask, scale, latent)
    key = f"b{batch}-h{heads}kv{kv_heads}-s{seq}-p{past}-r{rank_k}x{rank_v}-{dtype}-d{head_dim}-{kv_dtype}-{joint}"
    results[key] = (out.float() - want.float()).abs().max().item()
print(json.dumps(results))
"""

INTERPRETED_CASES = [
    # batch, heads, kv_heads, seq, past, rank_k, rank_v, dtype, head_dim (latent keys) or None, kv_dtype or None,
    # joint (latent keys: k and v hold one head that every KV head's maps read)
    (2, 4, 2, 1, 37, 40, 56, "float32", None, None, False),      # decode through the one-pass kernel, GQA, padded row
    (2, 4, 2, 9, 0, 40, 56, "float32", None, None, False),       # prefill
    (1, 3, 1, 5, 70, 24, 8, "float32", None, None, False),       # prefill continuing a cache, odd heads
    (2, 4, 4, 1, 20, 32, 48, "float16", None, None, False),
    (2, 6, 2, 1, 37, 41, 24, "float32", 64, None, False),        # latent keys (pre mode): decode, padded row
    (2, 6, 2, 9, 5, 24, 40, "float16", 64, None, False),         # latent keys: prefill continuing a cache
    (2, 4, 2, 1, 37, 40, 56, "float32", None, "int8", False),    # quantized caches: decode, padded row
    (1, 3, 1, 5, 70, 25, 9, "float16", None, "int4", False),     # packed int4 of odd ranks, prefill continuing a cache
    (2, 6, 2, 1, 37, 41, 24, "float32", 64, "int4", False),      # quantized latent keys: decode, padded row
    (2, 6, 2, 9, 5, 24, 40, "float16", 64, "int8", False),       # quantized latent keys: prefill continuing a cache
    (2, 9, 3, 1, 37, 120, 72, "float32", 64, None, True),        # a joint latent (SmolLM2's shape): decode
    (2, 6, 3, 9, 5, 41, 40, "float16", 64, "int8", True),        # a joint quantized latent: prefill
    (2, 4, 2, 1, 37, 41, 23, "float32", None, "mixed", False),   # mixed codes: decode, padded row
    (2, 9, 3, 5, 17, 120, 72, "float16", 64, "mixed", True),     # a joint mixed latent (SmolLM2's default): prefill
]
TOLERANCE = {"float32": 1e-5, "float16": 2e-3}


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    def run_cases(out):
        env = dict(os.environ, TRITON_INTERPRET="1")
        done = subprocess.run([sys.executable, "-c", _INTERPRETED, str(REPO), json.dumps(INTERPRETED_CASES)],
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        (out / "results.json").write_text(done.stdout.strip().splitlines()[-1])

    return json.loads((built_once(tmp_path_factory, "aot-interpreted", run_cases) / "results.json").read_text())


@pytest.mark.parametrize("case", INTERPRETED_CASES, ids=lambda c: "-".join(map(str, c)))
def test_aot_entry_matches_the_reference_under_the_interpreter(interpreted, case):
    batch, heads, kv_heads, seq, past, rank_k, rank_v, dtype, head_dim, kv_dtype, joint = case
    err = interpreted[f"b{batch}-h{heads}kv{kv_heads}-s{seq}-p{past}-r{rank_k}x{rank_v}-{dtype}-d{head_dim}-{kv_dtype}"
                      f"-{joint}"]
    assert err <= TOLERANCE[dtype], f"max |out - reference| = {err:.2e}"


def test_registration_against_a_stand_in_for_tensorrt_plugin(monkeypatch):
    """register() with stand-ins for `tensorrt` / `tensorrt.plugin` that record what the decorators receive:
    the type hints are objects (as tensorrt.plugin validates them), the output descriptor takes v's last dim,
    and the AOT launch covers (S / BLOCK_M, B * H) with S and P+S as the two int32 extra arguments."""
    import types

    import eigen_export_plugins.lowrank_attention.trt_plugin as trt_plugin

    recorded = {}

    class TensorDesc:
        def __init__(self, shape=(), dtype=None):
            self.shape_expr, self.dtype = tuple(shape), dtype

    class SymIntExprs(list):
        def __init__(self, n):
            super().__init__([None] * n)

    def decorator(kind):
        def wrap(plugin_id):
            def record(fn):
                recorded[(kind, plugin_id)] = fn
                return fn
            return record
        return wrap

    trtp = types.SimpleNamespace(
        TensorDesc=TensorDesc, Tensor=type("Tensor", (), {}), KernelLaunchParams=types.SimpleNamespace,
        SymIntExprs=SymIntExprs, SymInt32=lambda e: ("i32", e), cdiv=lambda a, b: -(-a // b),
        from_shape_expr=lambda shape, dtype: TensorDesc(shape, dtype),
        register=decorator("register"), aot_impl=decorator("aot_impl"), impl=decorator("impl"))
    trt = types.ModuleType("tensorrt")
    trt.__version__, trt.float32, trt.float16, trt.bfloat16, trt.plugin = "10.15.0", "F32", "F16", "BF16", trtp
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(trt_plugin, "_registered", False)
    monkeypatch.setattr(trt_plugin, "driver_ptx_version", lambda: None)
    monkeypatch.setattr(trt_plugin, "_current_target", lambda: (9, 0))
    trt_plugin.register()
    float_op, others = "eigen_export::LowRankAttention", ("Quantized", "LatentK", "LatentKQuantized")
    assert set(recorded) == {(kind, float_op + op) for kind in ("register", "aot_impl", "impl") for op in ("", *others)}
    describe, compile_aot = recorded[("register", float_op)], recorded[("aot_impl", float_op)]
    # a quantized node's output width is the rank_v attribute (int4 value codes are half as wide)
    out = recorded[("register", float_op + "Quantized")](
        TensorDesc((2, 4, 3, 16), "F16"), TensorDesc((2, 2, 5, 8), "U8"), TensorDesc((2, 2, 5, 21), "U8"),
        TensorDesc((2, 5), "I64"), TensorDesc((2, 2, 5, 1), "F16"), TensorDesc((2, 2, 5, 1), "F16"),
        0.125, 4, 2, 16, 41, "post", "int4", "")
    assert out.shape_expr == (2, 4, 3, 41) and out.dtype == "F16"
    # a latent-key node: q is head_dim wide, the output rank_v
    out = recorded[("register", float_op + "LatentK")](
        TensorDesc((2, 4, 3, 64), "F16"), TensorDesc((2, 2, 5, 24), "F16"), TensorDesc((2, 2, 5, 40), "F16"),
        TensorDesc((2, 5), "I64"), TensorDesc((2, 5), "I64"), TensorDesc((2, 24, 64), "F16"),
        TensorDesc((2, 24, 64), "F16"), TensorDesc((64,), "F32"), 0.125, 4, 2, 24, 40, "pre", 64)
    assert out.shape_expr == (2, 4, 3, 40) and out.dtype == "F16"
    assert recorded[("register", float_op + "LatentKQuantized")].__annotations__["freq"] is TensorDesc
    hints = describe.__annotations__
    assert hints["q"] is TensorDesc and hints["scale"] is float and hints["num_heads"] is int
    assert hints["rope_mode"] is str and hints["return"] is TensorDesc

    batch, heads, kv_heads, seq, total, rank_k, rank_v = 3, 4, 2, 70, 75, 40, 56
    q = TensorDesc((batch, heads, seq, rank_k), "F16")
    k = TensorDesc((batch, kv_heads, total, rank_k), "F16")
    v = TensorDesc((batch, kv_heads, total, rank_v), "F16")
    mask = TensorDesc((batch, total), "INT64")
    out = describe(q, k, v, mask, 0.125, heads, kv_heads, rank_k, rank_v, "post")
    assert out.shape_expr == (batch, heads, seq, rank_v) and out.dtype == "F16"
    name, ptx, launch, extra = compile_aot(q, k, v, mask, 0.125, heads, kv_heads, rank_k, rank_v, (out,), 0)
    assert name == "lowrank_attention_aot" and f".entry {name}(" in ptx
    assert (launch.grid_x, launch.grid_y, launch.block_x) == (2, batch * heads, 128)   # 70 queries / 64 per block
    assert 0 < launch.shared_mem <= 48 * 1024
    assert list(extra) == [("i32", seq), ("i32", total)]
    # a float latent-key node (pre mode) compiles its own entry: q is head_dim wide, k the latents
    q_full = TensorDesc((batch, heads, seq, 64), "F16")
    positions, maps = TensorDesc((batch, total), "INT64"), TensorDesc((kv_heads, rank_k, 64), "F16")
    name, ptx, launch, extra = recorded[("aot_impl", float_op + "LatentK")](
        q_full, k, v, mask, positions, maps, maps, TensorDesc((64,), "F32"), 0.125, heads, kv_heads, rank_k, rank_v,
        64, (out,), 0)
    assert name == "lowrank_attention_latent_aot" and f".entry {name}(" in ptx
    assert (launch.grid_x, launch.grid_y) == (2, batch * heads) and 0 < launch.shared_mem <= 48 * 1024
    assert list(extra) == [("i32", seq), ("i32", total), ("i32", kv_heads)]      # the cache's heads: one per KV head
    # quantized nodes: packed codes are narrower than the rank, so the sizes come from the attributes, not the shapes
    # (here mixed: 10 + 20 / 2 + 10 / 4 -> 23 bytes of keys, 14 + 28 / 2 + 14 / 4 -> 32 of values)
    codes_k, codes_v = TensorDesc((batch, kv_heads, total, 23), "U8"), TensorDesc((batch, kv_heads, total, 32), "U8")
    scales = TensorDesc((batch, kv_heads, total, 1), "F16")
    name, ptx, launch, extra = recorded[("aot_impl", float_op + "Quantized")](
        q, codes_k, codes_v, mask, scales, scales, 0.125, heads, kv_heads, rank_k, rank_v, "mixed",
        "10,20,10;14,28,14", (out,), 0)
    assert name == "lowrank_attention_quantized_aot" and len(_entry_params(ptx, name)) == 9
    assert (launch.grid_x, launch.grid_y) == (2, batch * heads) and list(extra) == [("i32", seq), ("i32", total)]
    # a joint latent: one cache head, which the kernel reads for each of the maps' KV heads
    joint_k, joint_v = TensorDesc((batch, 1, total, rank_k), "I8"), TensorDesc((batch, 1, total, rank_v), "I8")
    joint_scales = TensorDesc((batch, 1, total, 1), "F16")
    name, ptx, launch, extra = recorded[("aot_impl", float_op + "LatentKQuantized")](
        q_full, joint_k, joint_v, mask, joint_scales, joint_scales, positions, maps, maps, TensorDesc((64,), "F32"),
        0.125, heads, kv_heads, rank_k, rank_v, "int8", "", 64, (out,), 0)
    assert name == "lowrank_attention_latent_quantized_aot" and len(_entry_params(ptx, name)) == 14
    assert (launch.grid_x, launch.grid_y) == (2, batch * heads)
    assert list(extra) == [("i32", seq), ("i32", total), ("i32", 1)]
