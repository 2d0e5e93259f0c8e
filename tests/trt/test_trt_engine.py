"""TensorRT engines of tiny exports (DESIGN 7): build, run through TensorRTBackend, compare with PyTorch.

Every engine test needs TensorRT (>= 10.15, with tensorrt.plugin) and a CUDA GPU and skips with the precise
reason where either is missing; the error-path tests at the bottom run anywhere.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("onnx")

from eigen_export.artifacts.layout import BUILD_JSON  # noqa: E402
from tests.helpers.stages import build  # noqa: E402
from eigen_export.artifacts.engine import read_build  # noqa: E402
from eigen_export.backends.tensorrt_backend import tensorrt_unavailable  # noqa: E402
from eigen_export.errors import EigenExportError  # noqa: E402
from tests.helpers.stages import export  # noqa: E402
from eigen_export.modeling import default_position_ids  # noqa: E402
from eigen_export.backends import TensorRTBackend, TorchBackend, generate  # noqa: E402
from tests.helpers.tiny_models import ptb_like_ids  # noqa: E402

UNAVAILABLE = tensorrt_unavailable()          # "TensorRT not installed" / "no CUDA GPU" / None
needs_tensorrt = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")
MAX_BATCH, MAX_CONTEXT = 4, 96
# fp16 engine vs the fp16 PyTorch model on the same GPU: kernels sum in other orders; logits of the tiny
# models reach ~10, fp16 keeps ~3 decimal digits, two layers compound it.
RELATIVE_ATOL = 1e-2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A folded tiny Llama (GQA, rope post, r_k != r_v) exported in fp16 with the plugin graph."""
    from tests.helpers.folds import write_tiny_folded

    root = tmp_path_factory.mktemp("trt")
    model_dir, _ = write_tiny_folded(root, "llama-gqa", "post")
    onnx_dir = export(model_dir, root / "onnx", dtype="fp16", plugin=True)
    return model_dir, onnx_dir


@pytest.fixture(scope="module")
def plugin_engine(tiny):
    _, onnx_dir = tiny
    return build(onnx_dir, onnx_dir.parent / "engine", backend="tensorrt", max_batch=MAX_BATCH,
                 max_context=MAX_CONTEXT)


@pytest.fixture(scope="module")
def reference(tiny):
    """The model the export captured (fp16, RoPE tables in fp32), on the GPU."""
    from eigen_export.artifacts.folded import load_model

    model_dir, _ = tiny
    return TorchBackend(load_model(model_dir, dtype="float16").cuda())


def _left_padded(batch, seq, seed=3):
    ids = ptb_like_ids(batch, seq, seed=seed)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, : 2 * row - 1] = 0
    return ids.cuda(), mask.cuda()


def _close(got, want, mask, what):
    real = mask.bool()
    scale = want.float().abs().max().item()
    err = (got.float() - want.float())[real].abs().max().item()
    assert err <= RELATIVE_ATOL * scale, f"{what}: logits differ by {err:.3e} (largest |logit| {scale:.1f})"


@needs_tensorrt
def test_plugin_engine_matches_pytorch_prefill_decode_and_greedy(plugin_engine, reference):
    sidecar = read_build(plugin_engine)
    assert sidecar["backend"] == "tensorrt" and sidecar["graph"] == "plugin"
    assert [p["name"] for p in sidecar["profiles"]] == ["prefill", "decode"]
    assert sidecar["tensorrt_version"] and sidecar["compute_capability"] and sidecar["gpu_name"]
    engine = TensorRTBackend(plugin_engine)
    for batch in (1, 3):
        ids, mask = _left_padded(batch, 9)
        positions = default_position_ids(mask, 0)
        got, past = engine.forward(ids, mask, positions, None)
        want, want_past = reference.forward(ids, mask, positions, None)
        _close(got, want, mask, f"b{batch} prefill")
        assert past[0][0].shape == want_past[0][0].shape and past[0][0].dtype == torch.float16
        for step in range(3):                       # decode: seq 1, past 9, 10, 11 (profile 1)
            token = got[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            positions = default_position_ids(mask, past[0][0].shape[2])
            got, past = engine.forward(token, mask, positions, past)
            want, want_past = reference.forward(token, mask, positions, want_past)
            _close(got, want, mask[:, -1:], f"b{batch} decode step {step}")
    ids, mask = _left_padded(3, 5, seed=7)
    assert torch.equal(generate(engine, ids, mask, max_new_tokens=24), generate(reference, ids, mask, max_new_tokens=24))


@needs_tensorrt
def test_standard_graph_engine_agrees_with_the_plugin_engine(tiny, plugin_engine, tmp_path):
    """The standard-ops graph (no plugin) is the baseline engine; both must give the same tokens."""
    _, onnx_dir = tiny
    standard_onnx = tmp_path / "onnx"
    shutil.copytree(onnx_dir, standard_onnx)
    io = json.loads((standard_onnx / "io.json").read_text())
    io.update(plugin_model=None, plugin_model_reason="the baseline engine of this test")
    (standard_onnx / "io.json").write_text(json.dumps(io))
    engine_dir = build(standard_onnx, tmp_path / "engine", backend="tensorrt", max_batch=MAX_BATCH,
                       max_context=MAX_CONTEXT)
    sidecar = read_build(engine_dir)
    assert sidecar["graph"] == "standard" and "the baseline engine of this test" in sidecar["graph_note"]
    import onnx

    nodes = sidecar["graph_nodes"]          # Polygraphy's folding before the parse: counted, kept only if smaller
    assert nodes["before"] == len(onnx.load(str(standard_onnx / "model.onnx")).graph.node)
    assert nodes["after"] <= nodes["before"] and nodes["folded"] == (nodes["after"] < nodes["before"])
    standard, plugin = TensorRTBackend(engine_dir), TensorRTBackend(plugin_engine)
    ids, mask = _left_padded(2, 11)
    positions = default_position_ids(mask, 0)
    _close(plugin.forward(ids, mask, positions, None)[0], standard.forward(ids, mask, positions, None)[0], mask,
           "plugin vs standard")
    assert torch.equal(generate(plugin, ids, mask, max_new_tokens=16), generate(standard, ids, mask, max_new_tokens=16))


@needs_tensorrt
def test_current_engine_is_skipped_and_limits_are_enforced(tiny, plugin_engine):
    _, onnx_dir = tiny
    before = (plugin_engine / BUILD_JSON).stat().st_ino
    assert build(onnx_dir, plugin_engine, backend="tensorrt", max_batch=MAX_BATCH, max_context=MAX_CONTEXT) == plugin_engine
    assert (plugin_engine / BUILD_JSON).stat().st_ino == before
    engine = TensorRTBackend(plugin_engine)
    ids = ptb_like_ids(MAX_BATCH + 1, 4).cuda()
    mask = torch.ones_like(ids)
    with pytest.raises(EigenExportError, match=f"batch {MAX_BATCH + 1} is beyond this engine's max_batch {MAX_BATCH}: "
                                               f"rebuild with `eigen-export build --max-batch {MAX_BATCH + 1} --force`"):
        engine.forward(ids, mask, default_position_ids(mask, 0), None)
    ids = ptb_like_ids(1, MAX_CONTEXT + 1).cuda()
    mask = torch.ones_like(ids)
    with pytest.raises(EigenExportError, match=f"is beyond this engine's max_context {MAX_CONTEXT}: rebuild with "
                                               f"`eigen-export build --max-context {MAX_CONTEXT + 1} --force`"):
        engine.forward(ids, mask, default_position_ids(mask, 0), None)


@needs_tensorrt
def test_plan_from_another_tensorrt_gets_the_rebuild_error(plugin_engine, tmp_path):
    copy = tmp_path / "engine"
    shutil.copytree(plugin_engine, copy)
    sidecar = json.loads((copy / BUILD_JSON).read_text())
    sidecar["tensorrt_version"] = "9.0.0"
    (copy / BUILD_JSON).write_text(json.dumps(sidecar))
    with pytest.raises(EigenExportError, match=r"built with TensorRT 9\.0\.0 for sm_\d+; this machine has TensorRT .*"
                                               r"run `eigen-export build --force`"):
        TensorRTBackend(copy)


# -- error paths that need neither TensorRT nor a GPU ----------------------------------------------------------
def _fake_trt_engine(tmp_path, **changes):
    from tests.stages.test_build import _sidecar

    (tmp_path / BUILD_JSON).write_text(json.dumps(_sidecar(**changes)))
    return tmp_path


def test_backend_on_an_onnxruntime_build_says_which_backend_to_use(tmp_path):
    with pytest.raises(EigenExportError, match="holds an ONNX Runtime session, not a TensorRT engine: run it with "
                                               "--backend onnxruntime"):
        TensorRTBackend(_fake_trt_engine(tmp_path, backend="onnxruntime", engine_file="model.onnx"))


@pytest.mark.skipif(UNAVAILABLE is None, reason="TensorRT and a GPU are present")
def test_backend_without_tensorrt_or_gpu_says_why_in_one_line(tmp_path):
    with pytest.raises(EigenExportError) as err:
        TensorRTBackend(_fake_trt_engine(tmp_path))
    message = str(err.value)
    assert "\n" not in message
    assert ("needs TensorRT: TensorRT >= 10.15 with tensorrt.plugin is needed" in message
            if UNAVAILABLE == "TensorRT not installed" else "needs a CUDA GPU" in message)


@pytest.mark.skipif(UNAVAILABLE is None, reason="TensorRT and a GPU are present")
def test_build_with_tensorrt_requested_here_says_why(tmp_path):
    from tests.helpers.records import io_record

    (tmp_path / "io.json").write_text(json.dumps(io_record()))
    with pytest.raises(EigenExportError, match=f"--backend tensorrt: {UNAVAILABLE}; pip install"):
        build(tmp_path, backend="tensorrt", max_batch=2, max_context=16)


def test_capacity_buffers_are_reused_in_turn_and_never_under_a_callers_feet():
    """The present storage of the TensorRT backend (CPU tensors stand in for CUDA ones): two fixed-capacity
    buffers alternate while the caller keeps only the latest present; a caller that keeps more gets new memory."""
    from eigen_export.backends.onnxruntime_backend import _use_count
    from eigen_export.backends.tensorrt_backend import _CapacityBuffers

    if _use_count is None:
        pytest.skip("this torch has no storage use count: buffers are never reused")
    pool = _CapacityBuffers(2 * 2 * 16 * 8, torch.float16, torch.device("cpu"))     # max_batch 2, H_kv 2, 16 tokens, r 8
    first = pool.take((2, 2, 5, 8))
    second = pool.take((2, 2, 6, 8))                       # `first` is still held: the other buffer
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    assert first.is_contiguous() and second.shape == (2, 2, 6, 8) and second.untyped_storage().nbytes() == 2 * 512
    first_ptr = first.untyped_storage().data_ptr()
    del first                                               # the caller moved on to `second`
    third = pool.take((2, 2, 7, 8))
    assert third.untyped_storage().data_ptr() == first_ptr  # ping-pong: the first buffer again
    kept = [second, third]
    fourth = pool.take((2, 2, 8, 8))                        # both held: fresh memory, not a capacity buffer
    assert fourth.untyped_storage().data_ptr() not in {t.untyped_storage().data_ptr() for t in kept}
    assert len(pool.storages) == 2
