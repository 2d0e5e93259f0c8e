"""Polygraphy's constant folding before TensorRT parses a graph (backends/onnx_sanitize.py): node counts are
recorded, a folded graph is kept only where it is smaller, and whatever is folded still gives the export's
outputs on ONNX Runtime (the parity tolerance of tests/backends/test_export.py, 1e-4)."""
import shutil

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("polygraphy")
pytest.importorskip("onnx_graphsurgeon")

import onnx  # noqa: E402

from eigen_export.artifacts.layout import IO_JSON  # noqa: E402
from eigen_export.backends import OnnxRuntimeBackend  # noqa: E402
from eigen_export.backends.onnx_sanitize import fold, sanitize  # noqa: E402
from eigen_export.modeling import default_position_ids  # noqa: E402
from tests.backends.test_export import _left_padded, one_torch_thread  # noqa: E402,F401 (fixture)
from tests.backends.test_plugin_graph import _assert_close  # noqa: E402


@pytest.mark.parametrize("name,kind,graph", [("llama-gqa", "pre", "model.onnx"), ("qwen2", "post", "model.onnx"),
                                             ("gpt_neox", "post", "model_plugin.onnx"),
                                             ("opt", "folded", "model_plugin.onnx")])
def test_folded_graph_gives_the_exports_outputs(exports, tmp_path, monkeypatch, name, kind, graph):
    _, onnx_dir, _, _ = exports.get(name, kind)
    monkeypatch.chdir(tmp_path)
    sanitized = sanitize(onnx_dir / graph)
    assert not list(tmp_path.iterdir())         # no scratch files in the working directory (ORT's shape inference)
    assert sanitized.nodes_before == len(onnx.load(str(onnx_dir / graph)).graph.node)
    assert sanitized.nodes_after is not None and sanitized.nodes_after <= sanitized.nodes_before
    assert sanitized.folded == (sanitized.nodes_after < sanitized.nodes_before)
    # run the folded graph itself, kept or not, in a copy of the export (same io.json) on ONNX Runtime
    copy = tmp_path / "onnx"
    shutil.copytree(onnx_dir, copy)
    onnx.save(fold(onnx.load(str(onnx_dir / graph))), str(copy / graph))
    plugin = graph == "model_plugin.onnx"
    want_backend = OnnxRuntimeBackend(onnx_dir, threads=1, plugin=plugin)
    got_backend = OnnxRuntimeBackend(copy, threads=1, plugin=plugin)
    ids, mask = _left_padded(3, 7)
    positions = default_position_ids(mask, 0)
    want = want_backend.forward(ids, mask, positions, None)
    got = got_backend.forward(ids, mask, positions, None)
    _assert_close(got, want, mask, 0, f"{name} {kind} {graph} folded, prefill")
    step = torch.tensor([[5], [6], [7]])
    mask = torch.cat([mask, torch.ones_like(step)], 1)
    positions = default_position_ids(mask, 7)
    _assert_close(got_backend.forward(step, mask, positions, got[1]), want_backend.forward(step, mask, positions,
                  want[1]), mask, 7, f"{name} {kind} {graph} folded, decode")


def test_graphs_with_external_weights_are_not_folded(exports):
    _, onnx_dir, _, _ = exports.get("opt", "original")          # this case keeps its weights in model.onnx.data
    sanitized = sanitize(onnx_dir / "model.onnx")
    assert sanitized.record() == {"before": sanitized.nodes_before, "after": None, "folded": False,
                                  "note": "weights in external data: not folded"}
    assert (onnx_dir / IO_JSON).exists()
