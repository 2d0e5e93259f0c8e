"""Every on-disk record through its one reader and writer: round trips, and a record of another kind, another
version, with unknown or missing keys, or damaged, refused in one line that names the command remaking it."""
import json

import pytest
import torch

from eigen_export.artifacts.calib import (CALIB_TENSORS, CALIB_FORMAT, CalibRecord, calib_sha256, read_calibration,
                                         write_calibration)
from eigen_export.artifacts.layout import BASES, CALIB_JSON, IO_JSON, MERGE_JSON, REPORT_JSON, BuildLayout, \
    default_engine_dir, default_onnx_dir, timing_cache_path
from eigen_export.artifacts.merged import read_merge_record
from eigen_export.artifacts.onnx_io import OnnxIO, read_io, write_io
from eigen_export.artifacts.records import atomic_dir
from eigen_export.artifacts.report import read_report
from eigen_export.errors import EigenExportError
from eigen_export.loading import decoder_from_hf_model
from eigen_export.method.calibrate import calibrate
from tests.helpers.records import io_record
from tests.helpers.tiny_models import ptb_like_ids, tiny_hf_model


def _one_line(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def _calib_record(**changes):
    fields = dict(source="tiny", model_type="qwen2", rope_mode="post", basis="loss", grad_samples=4,
                  rope_positions=None, dataset="random", nsamples=4, seqlen=24, seed=0, dtype="float32",
                  eps_grid=[0.9], error_samples=2, rank_multiple=1, wall_time_s=0.1)
    return CalibRecord(**{**fields, **changes})


def test_calibration_round_trips_and_refuses_others(tmp_path):
    model = decoder_from_hf_model(tiny_hf_model("qwen2"))
    layers = calibrate(model, ptb_like_ids(4, 24), "post", progress=False, error_samples=2)
    write_calibration(tmp_path / "calib", layers, _calib_record())
    read, record = read_calibration(tmp_path / "calib")
    assert record == _calib_record()
    for a, b in zip(layers, read):
        assert all(torch.equal(getattr(a, name), getattr(b, name)) for name in CALIB_TENSORS) and a.curve == b.curve
        assert a.curve
    digest = calib_sha256(tmp_path / "calib")
    path = tmp_path / "calib" / CALIB_JSON
    data = json.loads(path.read_text())
    for change, fragment in (({"version": 0}, "is version 0, this eigen_export reads version 3"),
                             ({"format": "eigen_export.onnx"}, f"is not an {CALIB_FORMAT} record")):
        path.write_text(json.dumps({**data, **change}))
        with pytest.raises(EigenExportError) as info:
            read_calibration(tmp_path / "calib")
        _one_line(info, fragment, "eigen-export calibrate --force")
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "seqlen"}))
    with pytest.raises(EigenExportError) as info:
        read_calibration(tmp_path / "calib")
    _one_line(info, "missing ['seqlen']", "eigen-export calibrate --force")
    path.write_text(json.dumps(data, indent=1) + "\n")
    assert calib_sha256(tmp_path / "calib") == digest               # the record as written, byte for byte
    (tmp_path / "calib" / BASES).write_bytes(b"not safetensors")
    with pytest.raises(EigenExportError) as info:
        read_calibration(tmp_path / "calib")
    _one_line(info, f"does not match {CALIB_JSON}", "eigen-export calibrate --force")
    with pytest.raises(EigenExportError) as info:
        read_calibration(tmp_path / "nowhere")
    _one_line(info, "not found: run `eigen-export calibrate` first")


def test_io_json_round_trips_and_refuses_others(tmp_path):
    io = OnnxIO(**io_record())
    write_io(tmp_path, io)
    assert read_io(tmp_path) == io
    text = (tmp_path / IO_JSON).read_text()
    assert text.count("\n") > len(io.inputs) + len(io.outputs)          # one line per graph input and output
    for data, fragment in ((io_record(colour="red"), "unknown keys ['colour']"),
                           ({k: v for k, v in io_record().items() if k != "ranks"}, "no ['ranks']"),
                           (io_record(version=0), "is version 0"),
                           (io_record(format="eigen_export.engine"), "is not an eigen_export.onnx record")):
        (tmp_path / IO_JSON).write_text(json.dumps(data))
        with pytest.raises(EigenExportError) as info:
            read_io(tmp_path)
        _one_line(info, fragment, "eigen-export export --force")
    (tmp_path / IO_JSON).write_text(text[:50])
    with pytest.raises(EigenExportError) as info:
        read_io(tmp_path)
    _one_line(info, "is not valid JSON")
    assert io.metadata()["ranks"] == [[40, 56]] and "inputs" not in io.metadata()


def test_merge_record_of_another_version_is_refused(tmp_path):
    (tmp_path / MERGE_JSON).write_text(json.dumps({"format": "eigen_export.merge", "version": 7, "kv_heads": 2}))
    with pytest.raises(EigenExportError) as info:
        read_merge_record(tmp_path)
    _one_line(info, "is version 7", "eigen-export merge-heads --force")
    assert read_merge_record(tmp_path / "plain-model") is None


def test_report_of_another_version_is_refused(tmp_path):
    (tmp_path / REPORT_JSON).write_text(json.dumps({"format": "eigen_export.report", "version": 0}))
    with pytest.raises(EigenExportError) as info:
        read_report(tmp_path)
    _one_line(info, "is version 0", "eigen-export validate --force")


def test_atomic_dir_keeps_the_old_output_when_the_new_one_fails(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target, force=True) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]            # no temp directory left behind
    with pytest.raises(EigenExportError, match="already exists: pass --force"):
        with atomic_dir(target):
            pass


def test_layout_is_the_one_map_of_build_directories(tmp_path):
    layout = BuildLayout.of(tmp_path / "build", "m")
    assert [p.name for p in (layout.calib, layout.folded, layout.onnx, layout.engine, layout.report)] == \
        ["calib", "folded", "onnx", "engine", "report"]
    assert default_engine_dir(layout.onnx) == layout.engine
    assert timing_cache_path(layout.engine) == (tmp_path / "build" / ".trt-timing-cache").resolve()
    assert default_onnx_dir(tmp_path / "hf") == tmp_path / "hf" / "onnx"      # not a fold: onnx/ inside it
