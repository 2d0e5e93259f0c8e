"""External data (what models > 2 GB need): model_plugin.onnx reads every weight it shares with model.onnx from
model.onnx.data, matched by content (constant folding names the folded weights per graph), so an export holds
one weights file, not one per graph."""
import json

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_extensions")

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from eigen_export.backends.onnx_export import INLINE_BYTES, _external_data_by_content, _save_sharing_data  # noqa: E402
from eigen_export.artifacts.layout import IO_JSON, MODEL_ONNX, MODEL_PLUGIN_ONNX  # noqa: E402
from tests.helpers.stages import export  # noqa: E402
from eigen_export.modeling import default_position_ids  # noqa: E402
from eigen_export.backends import OnnxRuntimeBackend  # noqa: E402
from eigen_export_plugins.lowrank_attention.onnx_op import register_onnx_schema  # noqa: E402
from tests.backends.test_export import _left_padded, one_torch_thread  # noqa: E402,F401 (fixture)
from tests.backends.test_plugin_graph import _assert_close  # noqa: E402

DATA = MODEL_ONNX + ".data"


def _external(init):
    """(location, offset, length) of an initializer stored outside the graph, else None."""
    if init.data_location != onnx.TensorProto.EXTERNAL:
        return None
    entry = {e.key: e.value for e in init.external_data}
    return entry["location"], int(entry.get("offset", 0)), int(entry["length"])


def _content(init):
    return init.data_type, numpy_helper.to_array(init).tobytes()


@pytest.mark.parametrize("name,kind", [("llama-gqa", "post"), ("mistral", "pre")])
def test_plugin_graph_reads_its_weights_from_model_onnx_data(exports, tmp_path, name, kind):
    """One weights file; each external plugin initializer points at the bytes of an equal model.onnx tensor;
    checker passes on both; the plugin graph on ORT equals model.onnx within 1e-4 at real positions."""
    model_dir, _, _, _ = exports.get(name, kind)
    onnx_dir = export(model_dir, tmp_path / "onnx", external_data=True)
    io = json.loads((onnx_dir / IO_JSON).read_text())
    assert (io["external_data"], io["plugin_external_data"]) == (DATA, None)
    assert sorted(p.name for p in onnx_dir.iterdir()) == [IO_JSON, MODEL_ONNX, DATA, MODEL_PLUGIN_ONNX]

    standard = onnx.load(str(onnx_dir / MODEL_ONNX), load_external_data=False)
    plugin = onnx.load(str(onnx_dir / MODEL_PLUGIN_ONNX), load_external_data=False)
    where = {i.name: _external(i) for i in standard.graph.initializer}
    weights = sum(w[2] for w in where.values() if w)
    assert weights > 0 and (onnx_dir / DATA).stat().st_size <= 1.05 * weights
    plugin_where = {i.name: _external(i) for i in plugin.graph.initializer}
    assert {w[0] for w in plugin_where.values() if w} == {DATA}

    # by content, with the data loaded: every shared reference lands on an equal model.onnx tensor, and every
    # plugin tensor that model.onnx stores externally is such a reference (not a copy). model.onnx has a few
    # attention-core constants (the causal mask's) the plugin graph does not use.
    standard = onnx.load(str(onnx_dir / MODEL_ONNX), load_external_data=True)
    plugin = onnx.load(str(onnx_dir / MODEL_PLUGIN_ONNX), load_external_data=True)
    by_place = {where[i.name]: _content(i) for i in standard.graph.initializer if where[i.name]}
    referenced = set()
    for init in plugin.graph.initializer:
        place, content = plugin_where[init.name], _content(init)
        if place:
            assert by_place.get(place) == content, f"{init.name} at {place} is not the model.onnx tensor there"
            referenced.add(place)
        else:
            assert content not in by_place.values(), f"{init.name} copies a tensor model.onnx.data holds"
    assert sum(length for _, _, length in referenced) >= 0.95 * weights, "most weights are not shared"

    register_onnx_schema()
    for graph in (MODEL_ONNX, MODEL_PLUGIN_ONNX):
        onnx.checker.check_model(str(onnx_dir / graph))
    ids, mask = _left_padded(3, 7)
    positions = default_position_ids(mask, 0)
    ours = OnnxRuntimeBackend(onnx_dir, threads=1, plugin=True).forward(ids, mask, positions, None)
    ref = OnnxRuntimeBackend(onnx_dir, threads=1).forward(ids, mask, positions, None)
    _assert_close(ours, ref, mask, 0, "plugin graph on shared data vs model.onnx")


def test_tensors_only_the_plugin_graph_has_go_to_its_own_file(tmp_path):
    """A weight model.onnx.data lacks is written to model_plugin.onnx.data, a shared one (renamed, reshaped) is
    a reference, a small one stays inline; the saved graph loads back the same values."""
    import onnx_ir as ir

    rng = np.random.default_rng(0)
    weight, other = rng.standard_normal((16, 8), dtype=np.float32), rng.standard_normal(80, dtype=np.float32)
    small = np.arange(4, dtype=np.float32)
    ir.save(_graph({"weight": weight}), tmp_path / MODEL_ONNX, external_data=DATA)
    shared = _external_data_by_content(tmp_path / MODEL_ONNX)
    plugin = _graph({"transpose_3": weight.reshape(8, 16), "own": other, "small": small})
    _save_sharing_data(plugin, tmp_path / MODEL_PLUGIN_ONNX, shared)

    assert all(not isinstance(v.const_value, ir.ExternalTensor) for v in plugin.graph.initializers.values())
    assert (tmp_path / f"{MODEL_PLUGIN_ONNX}.data").stat().st_size == other.nbytes > INLINE_BYTES
    saved = onnx.load(str(tmp_path / MODEL_PLUGIN_ONNX), load_external_data=False)
    assert {i.name: (_external(i) or (None,))[0] for i in saved.graph.initializer} == {
        "transpose_3": DATA, "own": f"{MODEL_PLUGIN_ONNX}.data", "small": None}
    loaded = onnx.load(str(tmp_path / MODEL_PLUGIN_ONNX), load_external_data=True)
    values = {i.name: numpy_helper.to_array(i) for i in loaded.graph.initializer}
    assert np.array_equal(values["transpose_3"], weight.reshape(8, 16))
    assert np.array_equal(values["own"], other) and np.array_equal(values["small"], small)


def _graph(initializers: dict):
    """A graph that only outputs its initializers: enough for saving and loading weights."""
    import onnx_ir as ir

    values = [ir.Value(name=n, const_value=ir.tensor(a, name=n)) for n, a in initializers.items()]
    for v in values:
        v.shape, v.type = v.const_value.shape, ir.TensorType(v.const_value.dtype)
    graph = ir.Graph([], values, nodes=[], initializers=values, opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)
