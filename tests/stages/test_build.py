"""Engine build (DESIGN 7): the pure parts (limits, profiles, build.json, compatibility, backend choice) and the
ONNX Runtime build end to end on tiny exports. The TensorRT build itself is tested in tests/trt/ (GPU only)."""
import json
import logging

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from types import SimpleNamespace  # noqa: E402

from eigen_export.artifacts.engine import (BUILD_VERSION, SIDECAR_KEYS, RuntimeEnv, check_plan_compatible,  # noqa: E402
                                           read_build, validate_sidecar)
from eigen_export.artifacts.layout import BUILD_JSON  # noqa: E402
from eigen_export.backends import OnnxRuntimeBackend  # noqa: E402
from eigen_export.errors import EigenExportError  # noqa: E402
from eigen_export.modeling import default_position_ids  # noqa: E402
from eigen_export.settings import BuildSettings  # noqa: E402
from eigen_export.stages.build import check_model_limits, choose_backend, optimization_profiles  # noqa: E402
from tests.helpers.records import IO_INPUTS  # noqa: E402
from tests.helpers.stages import build  # noqa: E402
from tests.backends.test_export import _left_padded, one_torch_thread  # noqa: E402,F401 (fixture; exports: conftest)

IO = SimpleNamespace(inputs=IO_INPUTS)



# -- pure ---------------------------------------------------------------------------------------------------
def test_profiles_from_limits_by_hand():
    prefill, decode = optimization_profiles(IO, BuildSettings(max_batch=8, max_context=4096))
    assert (prefill["name"], decode["name"]) == ("prefill", "decode")
    p, d = prefill["shapes"], decode["shapes"]
    assert p["input_ids"] == {"min": [1, 1], "opt": [4, 2048], "max": [8, 4096]}
    assert p["attention_mask"] == {"min": [1, 1], "opt": [4, 2048], "max": [8, 4096]}
    assert p["past_key_values.0.key"] == {"min": [1, 2, 0, 40], "opt": [4, 2, 0, 40], "max": [8, 2, 0, 40]}
    assert d["input_ids"] == {"min": [1, 1], "opt": [4, 1], "max": [8, 1]}
    assert d["position_ids"] == d["input_ids"]
    assert d["past_key_values.0.value"] == {"min": [1, 2, 1, 56], "opt": [4, 2, 2048, 56], "max": [8, 2, 4095, 56]}
    # mask width = past + seq at each of min / opt / max
    assert d["attention_mask"] == {"min": [1, 2], "opt": [4, 2049], "max": [8, 4096]}
    tiny_p, tiny_d = optimization_profiles(IO, BuildSettings(max_batch=1, max_context=2))
    assert tiny_p["shapes"]["input_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [1, 2]}
    assert tiny_d["shapes"]["past_key_values.0.key"]["max"] == [1, 2, 1, 40]


def test_unknown_dim_in_io_json_is_refused():
    bad = SimpleNamespace(inputs=IO.inputs[:1] + [{"name": "attention_mask", "dtype": "int64",
                                                   "shape": ["batch", "width"]}])
    with pytest.raises(EigenExportError, match="dim 'width'.*re-run `eigen-export export`"):
        optimization_profiles(bad, BuildSettings(max_batch=2, max_context=16))


@pytest.mark.parametrize("kwargs,message", [
    ({"max_batch": 0, "max_context": 16}, "max_batch must be an integer >= 1, got 0"),
    ({"max_batch": 2.5, "max_context": 16}, "max_batch must be an integer >= 1, got 2.5"),
    ({"max_batch": True, "max_context": 16}, "max_batch must be an integer >= 1, got True"),
    ({"max_batch": 2, "max_context": 1}, r"max_context must be an integer >= 2 \(decode needs"),
])
def test_bad_limits_rejected(kwargs, message):
    with pytest.raises(EigenExportError, match=message):
        BuildSettings(**kwargs)


def test_learned_positions_cap_the_context():
    learned, rope = SimpleNamespace(max_positions=160), SimpleNamespace(max_positions=None)
    check_model_limits(BuildSettings(max_batch=4, max_context=160), learned)
    check_model_limits(BuildSettings(max_batch=4, max_context=100_000), rope)
    with pytest.raises(EigenExportError, match="--max-context 161 is beyond .* cover 160 positions"):
        check_model_limits(BuildSettings(max_batch=4, max_context=161), learned)


def _sidecar(**changes):
    data = {key: None for key in SIDECAR_KEYS}
    data.update(format="eigen_export.engine", version=BUILD_VERSION, backend="tensorrt", engine_file="model.plan",
                graph="plugin", graph_file="model_plugin.onnx", onnx_sha256="ab" * 32, dtype="fp16",
                ranks=[[40, 56]], num_kv_heads=2, max_batch=8, max_context=4096,
                profiles=optimization_profiles(IO, BuildSettings(max_batch=8, max_context=4096)), tensorrt_version="10.13.0",
                gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", build_seconds=12.5)
    data.update(changes)
    return data


def test_sidecar_round_trip_and_rejections(tmp_path):
    data = _sidecar()
    (tmp_path / BUILD_JSON).write_text(json.dumps(data))
    assert read_build(tmp_path) == data
    (tmp_path / BUILD_JSON).write_text(json.dumps({**data, "colour": "red"}))
    with pytest.raises(EigenExportError, match=r"unknown keys \['colour'\].*eigen-export build --force"):
        read_build(tmp_path)
    (tmp_path / BUILD_JSON).write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(EigenExportError, match=f"version 99, this eigen_export reads version {BUILD_VERSION}"):
        read_build(tmp_path)
    missing = dict(data)
    del missing["profiles"]
    with pytest.raises(EigenExportError, match=r"missing keys \['profiles'\]"):
        validate_sidecar(missing)
    with pytest.raises(EigenExportError, match="not an eigen_export.engine record"):
        validate_sidecar({**data, "format": "something.else"})
    (tmp_path / BUILD_JSON).write_text('{"format": "eigen_export.engine", ')
    with pytest.raises(EigenExportError) as err:
        read_build(tmp_path)
    assert "\n" not in str(err.value) and "is not valid JSON" in str(err.value) and "--force" in str(err.value)
    with pytest.raises(EigenExportError, match="not found: run `eigen-export build`"):
        read_build(tmp_path / "nowhere")


def test_compatibility_check_names_each_mismatch():
    sidecar = _sidecar()
    check_plan_compatible(sidecar, RuntimeEnv("10.13.0", "9.0", "NVIDIA H100 80GB HBM3", "ab" * 32))
    check_plan_compatible(sidecar, RuntimeEnv(None, None))            # unknown here: nothing to compare
    cases = [
        (RuntimeEnv("10.9.0", "9.0"), "built with TensorRT 10.13.0 for sm_90; this machine has TensorRT 10.9.0 / sm_90: "
                                      "run `eigen-export build --force`"),
        (RuntimeEnv("10.13.0", "8.0", "NVIDIA A100"), "built with TensorRT 10.13.0 for sm_90 (NVIDIA H100 80GB HBM3); "
                                                      "this machine has TensorRT 10.13.0 / sm_80 (NVIDIA A100)"),
        (RuntimeEnv("10.13.0", "9.0", None, "cd" * 32), "built from another ONNX export (sha256 abababababab, "
                                                        "the export now is cdcdcdcdcdcd)"),
    ]
    for env, message in cases:
        with pytest.raises(EigenExportError) as err:
            check_plan_compatible(sidecar, env)
        assert message in str(err.value) and "\n" not in str(err.value) and "--force" in str(err.value)
    check_plan_compatible(_sidecar(backend="onnxruntime"), RuntimeEnv("1.0", "1.0"))     # ORT sessions: no plan


def test_backend_choice():
    assert choose_backend("auto", None) == ("tensorrt", "built the TensorRT engine")
    assert choose_backend("auto", "TensorRT not installed") == \
        ("onnxruntime", "TensorRT not installed: built the ONNX Runtime session instead")
    assert choose_backend("auto", "no CUDA GPU")[1] == "no CUDA GPU: built the ONNX Runtime session instead"
    assert choose_backend("onnxruntime", None)[0] == "onnxruntime"
    with pytest.raises(EigenExportError, match="--backend tensorrt: no CUDA GPU; pip install"):
        choose_backend("tensorrt", "no CUDA GPU")
    with pytest.raises(EigenExportError, match="backend 'tvm' is not one of auto, tensorrt, onnxruntime"):
        BuildSettings(backend="tvm")


# -- the ONNX Runtime build on tiny exports ---------------------------------------------------------------------
def test_auto_build_falls_back_to_onnxruntime_and_matches_the_export(exports, caplog):
    """Here (no TensorRT, no GPU) auto builds the ORT session, says so in one line, and the saved session runs
    through OnnxRuntimeBackend(engine_dir) with the export's logits and cache (1e-4)."""
    from eigen_export.backends.tensorrt_backend import tensorrt_unavailable

    _, onnx_dir, _, exported = exports.get("llama-gqa", "post")
    reason = tensorrt_unavailable()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present: auto builds TensorRT here (tests/trt covers it)")
    with caplog.at_level(logging.INFO, logger="eigen_export"):
        engine_dir = build(onnx_dir, max_batch=4, max_context=64)
    assert engine_dir == onnx_dir.parent / "engine"
    said = [r.getMessage() for r in caplog.records if "ONNX Runtime session instead" in r.getMessage()]
    assert said == [f"[build] {reason}: built the ONNX Runtime session instead"]
    sidecar = read_build(engine_dir)
    assert sidecar["backend"] == "onnxruntime" and sidecar["engine_file"] == "model.onnx"
    assert sidecar["graph"] == "standard" and sidecar["profiles"] is None and sidecar["tensorrt_version"] is None
    assert (sidecar["max_batch"], sidecar["max_context"]) == (4, 64)
    assert sidecar["providers"] == ["CPUExecutionProvider"] and sidecar["onnxruntime_version"]
    io = json.loads((engine_dir / "io.json").read_text())
    assert io["model"] == "model.onnx" and io["ranks"] == sidecar["ranks"]
    assert sorted(p.name for p in engine_dir.iterdir()) == ["build.json", "io.json", "model.onnx"]

    engine = OnnxRuntimeBackend(engine_dir, threads=1)
    ids, mask = _left_padded(3, 7)
    positions = default_position_ids(mask, 0)
    want, want_past = exported.forward(ids, mask, positions, None)
    got, got_past = engine.forward(ids, mask, positions, None)
    assert (got - want).abs().max().item() <= 1e-4
    step = torch.tensor([[5], [6], [7]])
    mask = torch.cat([mask, torch.ones_like(step)], 1)
    positions = default_position_ids(mask, 7)
    want, _ = exported.forward(step, mask, positions, want_past)
    got, _ = engine.forward(step, mask, positions, got_past)
    assert (got - want).abs().max().item() <= 1e-4


def test_current_build_is_skipped_force_rebuilds_and_other_limits_are_refused(exports):
    _, onnx_dir, _, _ = exports.get("llama-gqa", "post")
    engine_dir = build(onnx_dir, backend="onnxruntime", max_batch=4, max_context=64, force=True)
    before = (engine_dir / BUILD_JSON).stat().st_ino
    assert build(onnx_dir, backend="onnxruntime", max_batch=4, max_context=64) == engine_dir
    assert (engine_dir / BUILD_JSON).stat().st_ino == before                    # skipped: the same file
    with pytest.raises(EigenExportError, match="already exists and is not a build of this export with these settings"):
        build(onnx_dir, backend="onnxruntime", max_batch=8, max_context=64)
    build(onnx_dir, backend="onnxruntime", max_batch=4, max_context=64, force=True)
    assert (engine_dir / BUILD_JSON).stat().st_ino != before                    # rebuilt: a new directory
    assert read_build(engine_dir)["max_batch"] == 4
    assert not list(engine_dir.parent.glob(".engine.*"))                        # no temp dirs left behind


def test_corrupted_build_json_gives_one_line_error(exports, tmp_path):
    _, onnx_dir, _, _ = exports.get("llama-gqa", "post")
    engine_dir = build(onnx_dir, tmp_path / "engine", backend="onnxruntime", max_batch=2, max_context=32)
    (engine_dir / BUILD_JSON).write_text((engine_dir / BUILD_JSON).read_text()[:40])
    with pytest.raises(EigenExportError) as err:
        read_build(engine_dir)
    assert "\n" not in str(err.value) and "is not valid JSON" in str(err.value)
    # a corrupt build is not "current": without --force the build refuses to overwrite it, with --force it redoes it
    with pytest.raises(EigenExportError, match="already exists"):
        build(onnx_dir, tmp_path / "engine", backend="onnxruntime", max_batch=2, max_context=32)
    build(onnx_dir, tmp_path / "engine", backend="onnxruntime", max_batch=2, max_context=32, force=True)
    assert read_build(engine_dir)["backend"] == "onnxruntime"


def test_build_errors_name_the_fix(exports, tmp_path):
    with pytest.raises(EigenExportError, match="holds no ONNX export .*run `eigen-export export` first"):
        build(tmp_path / "nowhere")
    _, onnx_dir, _, _ = exports.get("opt", "original")          # learned positions: 160
    with pytest.raises(EigenExportError, match="--max-context 4096 is beyond what this model supports.*160"):
        build(onnx_dir, tmp_path / "e1", backend="onnxruntime")
    engine_dir = build(onnx_dir, tmp_path / "e3", backend="onnxruntime", max_batch=2, max_context=160)
    sidecar = read_build(engine_dir)        # this export keeps its weights in external data: so does the engine
    assert sidecar["positions"] == "learned" and (engine_dir / "model.onnx").exists()
    assert (engine_dir / "model.onnx.data").exists()
    assert json.loads((engine_dir / "io.json").read_text())["external_data"] == "model.onnx.data"
    OnnxRuntimeBackend(engine_dir, threads=1)


def test_graph_choice_and_the_aot_attribute(tmp_path):
    """TensorRT parses the plugin graph when the export has one, else the standard graph with a note; the copy it
    parses marks each plugin node `aot=1` (the parser's switch to the compiled kernel), the file stays as is."""
    import onnx
    from onnx import TensorProto, helper

    from eigen_export.backends.tensorrt_backend import graph_for_parser
    from eigen_export.stages.build import _pick_graph

    (tmp_path / "model_plugin.onnx").write_bytes(b"")
    io = SimpleNamespace(model="model.onnx", plugin_model="model_plugin.onnx", plugin_model_reason=None)
    assert _pick_graph(tmp_path, io, "tensorrt") == ("model_plugin.onnx", "plugin", None)
    assert _pick_graph(tmp_path, io, "onnxruntime") == ("model.onnx", "standard", None)
    alibi = SimpleNamespace(model="model.onnx", plugin_model=None, plugin_model_reason="ALiBi biases are not in the op")
    assert _pick_graph(tmp_path, alibi, "tensorrt") == (
        "model.onnx", "standard", "no plugin graph (ALiBi biases are not in the op): building the standard-ops graph "
                                  "model.onnx")

    node = helper.make_node("LowRankAttention", ["q", "k", "v", "m"], ["o"], domain="eigen_export",
                            plugin_namespace="eigen_export", plugin_version="1", scale=0.125, num_heads=4,
                            num_kv_heads=2, rank_k=8, rank_v=8, rope_mode="post")
    # the other op types (latent keys, quantized caches) have compiled kernels too
    kinds = ("LatentK", "Quantized", "LatentKQuantized")
    others = [helper.make_node(f"LowRankAttention{kind}", ["q", "k", "v", "m"], [f"o{i}"], domain="eigen_export",
                               plugin_namespace="eigen_export", plugin_version="1") for i, kind in enumerate(kinds)]
    values = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("q", "k", "v", "o")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "o0", "o1", "o2")]
    graph = helper.make_graph([node, helper.make_node("Identity", ["o"], ["y"]), *others], "g", values[:3] +
                              [helper.make_tensor_value_info("m", TensorProto.INT64, None)], outputs)
    path = tmp_path / "model_plugin.onnx"
    onnx.save(helper.make_model(graph), str(path))
    parsed_bytes, nodes = graph_for_parser(path, "plugin")
    parsed = onnx.load_from_string(parsed_bytes)
    assert nodes == {"before": 5, "after": 5, "folded": False, "note": "folding removed no node"}
    attrs = {a.name: helper.get_attribute_value(a) for a in parsed.graph.node[0].attribute}
    assert attrs["aot"] == 1 and attrs["plugin_namespace"] == b"eigen_export" and attrs["num_heads"] == 4
    assert not any(a.name == "aot" for a in parsed.graph.node[1].attribute)
    marked = {n.op_type: any(a.name == "aot" for a in n.attribute) for n in parsed.graph.node[2:]}
    assert marked == {f"LowRankAttention{kind}": True for kind in kinds}
    # quantized nodes exported before `kv_layout` existed get the empty layout the plugin declares
    layouts = {n.op_type: [helper.get_attribute_value(a) for a in n.attribute if a.name == "kv_layout"]
               for n in parsed.graph.node[2:]}
    assert layouts == {"LowRankAttentionLatentK": [], "LowRankAttentionQuantized": [b""],
                       "LowRankAttentionLatentKQuantized": [b""]}
    assert not any(a.name == "aot" for a in onnx.load(str(path)).graph.node[0].attribute)
    standard = onnx.load_from_string(graph_for_parser(path, "standard")[0])
    assert not any(a.name == "aot" for a in standard.graph.node[0].attribute)


def test_profiles_become_polygraphys_profiles():
    """What build_tensorrt hands Polygraphy's CreateConfig: one Profile per optimization profile, every input,
    the same min/opt/max (Polygraphy imports TensorRT lazily: this runs without it)."""
    pytest.importorskip("polygraphy")
    from eigen_export.backends.tensorrt_backend import polygraphy_profile

    prefill, decode = optimization_profiles(IO, BuildSettings(max_batch=8, max_context=4096))
    for ours in (prefill, decode):
        theirs = polygraphy_profile(ours)
        assert list(theirs) == [e["name"] for e in IO.inputs]
        for name, shape in ours["shapes"].items():
            assert list(theirs[name]) == [shape["min"], shape["opt"], shape["max"]]
    assert list(polygraphy_profile(decode)["past_key_values.0.value"]) == [[1, 2, 1, 56], [4, 2, 2048, 56],
                                                                          [8, 2, 4095, 56]]
