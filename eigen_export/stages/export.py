"""`export`: a folded (or original) model directory -> onnx/ with model.onnx, model_plugin.onnx and io.json
(DESIGN 5). The graphs are made by backends/onnx_export.py; this module decides what to write and when."""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from ..artifacts.folded import model_of_shapes
from ..artifacts.layout import HF_CONFIG, IO_JSON, MANIFEST, MODEL_ONNX, MODEL_PLUGIN_ONNX, default_onnx_dir, \
    is_folded, onnx_dir_candidates
from ..artifacts.onnx_io import OnnxIO, check_io, graph_io_from_file, read_io, write_io
from ..artifacts.records import atomic_dir, sha256_file
from ..backends.onnx_export import attach_weights, capture, fold_weight_transposes, io_contract, model_metadata, \
    name_dims, optimize, plugin_cores, plugin_unsupported_reason, require_onnx, save_graphs
from ..dtypes import dtype as dtype_of
from ..errors import EigenExportError
from ..settings import ExportSettings
from .common import must_make

log = logging.getLogger("eigen_export")


def source_sha256(model_dir: Path) -> str:
    """What the export was made from: the folded manifest (it carries the weights' hash) or the HF files."""
    files = [model_dir / MANIFEST] if is_folded(model_dir) else sorted(
        p for p in model_dir.iterdir() if p.name == HF_CONFIG or p.suffix in (".safetensors", ".bin"))
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + sha256_file(path).encode())
    return h.hexdigest()


def is_current(out_dir: Path, source_sha: str, settings: ExportSettings) -> bool:
    """io.json holds this source's hash and these settings, and every graph it names is there."""
    try:
        io = read_io(out_dir)
    except EigenExportError:
        return False
    graphs = [io.model] + ([io.plugin_model] if io.plugin_model else [])
    return (io.source_sha256, io.dtype, io.opset, io.plugin) == \
        (source_sha, settings.dtype, settings.opset, settings.plugin) and all((out_dir / g).exists() for g in graphs)


def run_export(model_dir: str | Path, settings: ExportSettings = ExportSettings(), out_dir: str | Path | None = None,
               force: bool = False, replace_stale: bool = False) -> Path:
    """Write `onnx/model.onnx`, `onnx/model_plugin.onnx` and `onnx/io.json` for an original or folded model
    directory; returns the ONNX dir.

    settings.external_data: weights in `model.onnx.data` (the default; None: only when the model needs it,
    > 2 GB); the plugin graph reads the weights it shares with model.onnx from that file and has its own file
    only for the rest.
    plugin: also write the plugin graph; where the model cannot use the plugin (ALiBi), io.json says why.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise EigenExportError(f"{model_dir} is not a directory: export needs a folded or original model directory")
    out_dir = Path(out_dir) if out_dir is not None else default_onnx_dir(model_dir)
    source_sha = source_sha256(model_dir)
    current = is_current(out_dir, source_sha, settings)
    if not must_make("export", out_dir, current, force, replace_stale, "an export of this model"):
        return out_dir
    require_onnx()
    started, started_cpu = time.perf_counter(), time.process_time()
    torch_dtype = dtype_of(settings.dtype).torch
    # fake weights of the real shapes: the capture holds none of them; save reads them from disk one at a time
    model, read = model_of_shapes(model_dir, torch_dtype)
    weight_names = set(model.state_dict())
    inputs, outputs = io_contract(model, torch_dtype)
    reason = plugin_unsupported_reason(model) if settings.plugin else "not requested (export with plugin=True)"
    io = OnnxIO(model=MODEL_ONNX, external_data=None, plugin=settings.plugin,
                plugin_model=None if reason else MODEL_PLUGIN_ONNX, plugin_model_reason=reason,
                plugin_external_data=None, exporter=f"torch.onnx dynamo (torch {torch.__version__})",
                source=str(model_dir), source_sha256=source_sha, **model_metadata(model, settings.dtype),
                opset=settings.opset, inputs=inputs, outputs=outputs)
    programs = {MODEL_ONNX: capture(model, torch_dtype, settings.opset)}
    if io.plugin_model:
        with plugin_cores(model):
            programs[MODEL_PLUGIN_ONNX] = capture(model, torch_dtype, settings.opset, plugin=True)
    for program in programs.values():
        attach_weights(program.model, weight_names, read)
        fold_weight_transposes(program.model)
        optimize(program.model)
        name_dims(program.model, inputs, outputs)
        for key, value in io.metadata().items():
            program.model.metadata_props[f"eigen_export.{key}"] = json.dumps(value)
    with atomic_dir(out_dir, force=True) as tmp:
        save_graphs(programs, tmp, settings.external_data)
        for name in programs:
            check_io(io, graph_io_from_file(tmp / name), tmp / IO_JSON)
        data_files = {}
        for key, name in (("external_data", MODEL_ONNX), ("plugin_external_data", MODEL_PLUGIN_ONNX)):
            # a graph's own data file: the plugin graph has one only for weights model.onnx.data lacks
            data = sorted(p.name for p in tmp.iterdir() if p.name.startswith(name) and p.name != name)
            data_files[key] = data[0] if data else None
        # wall and CPU time: on a shared machine the wall time measures the neighbours as much as the export
        io = io.replace(**data_files, export_seconds=round(time.perf_counter() - started, 2),
                        export_cpu_seconds=round(time.process_time() - started_cpu, 2))
        write_io(tmp, io)                                                   # last: marks completion
    # the exporter's programs and graphs hold the weights in reference cycles: 0.5 GB of SmolLM2 stays resident
    # until the next collection, under whatever the next stage loads
    del model, programs
    gc.collect()
    log.info("[export] %s -> %s (%s, opset %d, %.1f s)", model_dir, out_dir, settings.dtype, settings.opset,
             io.export_seconds)
    return out_dir


def find_onnx_dir(path: str | Path) -> Path:
    """The ONNX export belonging to PATH: PATH itself, PATH/onnx, or the artifact's onnx/ next to folded/."""
    for candidate in onnx_dir_candidates(path):
        if (candidate / IO_JSON).exists():
            return candidate
    raise EigenExportError(f"no ONNX export found for {path}: run `eigen-export export {path}` first")
