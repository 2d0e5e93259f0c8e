"""Engine build (DESIGN 7): `build/<name>/onnx/` -> `build/<name>/engine/`.

Two backends, one artifact layout and one sidecar (`engine/build.json`, written last):
- tensorrt: the plugin graph (`model_plugin.onnx`; the standard-ops `model.onnx` where io.json has none)
  parsed into a strongly typed network, two optimization profiles (prefill: past 0; decode: seq 1),
  a timing cache on disk shared by every build under the same root, `engine/model.plan`.
- onnxruntime: what a machine without TensorRT or a GPU builds instead. The graph optimized by an ORT
  session and saved (`engine/model.onnx`) with a copy of io.json pointing at it, so that
  `OnnxRuntimeBackend(engine_dir)` loads it unchanged.
`backend="auto"` picks TensorRT where it imports and a CUDA GPU is present, else ONNX Runtime, and says
which and why in one line; it never pretends a TensorRT engine exists.

The pure parts (limits, profiles, backend choice) are functions of data, tested without TensorRT; each
backend's builder sits beside its runner in backends/.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

from .. import __version__
from ..artifacts.engine import check_plan_compatible, new_sidecar, read_build, write_build
from ..artifacts.layout import IO_JSON, PLAN, default_engine_dir, timing_cache_path
from ..artifacts.onnx_io import OnnxIO, read_io
from ..artifacts.records import atomic_dir, sha256_file
from ..backends.onnxruntime_backend import build_onnxruntime
from ..backends.tensorrt_backend import PROFILE_NAMES, build_tensorrt, runtime_env, tensorrt_unavailable
from ..errors import EigenExportError
from ..settings import BuildSettings
from .common import must_make

log = logging.getLogger("eigen_export")


# -- limits and profiles (pure) ---------------------------------------------------------------------------
def check_model_limits(settings: BuildSettings, io: OnnxIO) -> None:
    """A model with learned absolute positions cannot serve past its position table (io.json max_positions);
    RoPE and ALiBi have no table to run out of."""
    if io.max_positions is not None and settings.max_context > io.max_positions:
        raise EigenExportError(f"--max-context {settings.max_context} is beyond what this model supports: its "
                               f"learned position embeddings cover {io.max_positions} positions; use "
                               f"--max-context {io.max_positions} or less")


def _mid(low: int, high: int) -> int:
    return (low + high) // 2


def optimization_profiles(io: OnnxIO, settings: BuildSettings) -> list[dict]:
    """The two TensorRT optimization profiles for the inputs io.json lists, as plain data:
    [{"name": "prefill"|"decode", "shapes": {input: {"min": [...], "opt": [...], "max": [...]}}}].

    prefill: batch 1..B, seq 1..C, past 0; decode: batch 1..B, seq 1, past 1..C-1; the mask is
    [batch, past + seq] (DESIGN 5). opt is the midpoint of each range (what TensorRT tunes kernels for).
    """
    b, c = settings.max_batch, settings.max_context
    batch = (1, _mid(1, b), b)
    dims = {
        "prefill": {"batch": batch, "seq": (1, _mid(1, c), c), "past": (0, 0, 0), "total": (1, _mid(1, c), c)},
        "decode": {"batch": batch, "seq": (1, 1, 1), "past": (1, _mid(1, c - 1), c - 1),
                   "total": (2, _mid(1, c - 1) + 1, c)},
    }
    profiles = []
    for name in PROFILE_NAMES:
        shapes = {}
        for entry in io.inputs:
            triples = []
            for dim in entry["shape"]:
                if isinstance(dim, int):
                    triples.append((dim, dim, dim))
                elif dim in dims[name]:
                    triples.append(dims[name][dim])
                else:
                    raise EigenExportError(f"io.json input {entry['name']} has dim {dim!r}, which the engine build "
                                           "does not know (batch, seq, past, total): re-run `eigen-export export`")
            shapes[entry["name"]] = {key: [t[i] for t in triples] for i, key in enumerate(("min", "opt", "max"))}
        profiles.append({"name": name, "shapes": shapes})
    return profiles


def choose_backend(requested: str, unavailable: str | None) -> tuple[str, str]:
    """(backend, the one line that says which and why) for --backend and the reason TensorRT cannot run."""
    if requested == "onnxruntime":
        return "onnxruntime", "built the ONNX Runtime session (--backend onnxruntime)"
    if unavailable is None:
        return "tensorrt", "built the TensorRT engine"
    if requested == "tensorrt":
        raise EigenExportError(f"--backend tensorrt: {unavailable}; pip install 'eigen_export[tensorrt]' on a machine "
                               "with an NVIDIA GPU, or build with --backend onnxruntime")
    return "onnxruntime", f"{unavailable}: built the ONNX Runtime session instead"


def _pick_graph(onnx_dir: Path, io: OnnxIO, backend: str) -> tuple[str, str, str | None]:
    """(file, "plugin"|"standard", a note when the standard graph stands in for the plugin one)."""
    if backend == "onnxruntime":
        return io.model, "standard", None          # ORT has the plugin op only as a Python test double
    plugin = io.plugin_model
    if plugin and (onnx_dir / plugin).exists():
        return plugin, "plugin", None
    reason = io.plugin_model_reason or (f"{plugin} is missing" if plugin else "io.json names no plugin graph")
    return io.model, "standard", f"no plugin graph ({reason}): building the standard-ops graph {io.model}"


def onnx_sha256(path: Path) -> str:
    """sha256 of an ONNX graph and the external-data files it references, in a stable order."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    data = sorted({entry.value for init in model.graph.initializer for entry in init.external_data
                   if entry.key == "location"})
    h = hashlib.sha256()
    for file in [path.name] + data:
        h.update(file.encode() + sha256_file(path.parent / file).encode())
    return h.hexdigest()


# -- the stage --------------------------------------------------------------------------------------------
class _Plan:
    """What a build of `onnx_dir` with `settings` would be: decided before any work (and by is_current)."""

    def __init__(self, onnx_dir: Path, settings: BuildSettings):
        if not (onnx_dir / IO_JSON).exists():
            raise EigenExportError(f"{onnx_dir} holds no ONNX export (no io.json): run `eigen-export export` first")
        self.io = read_io(onnx_dir)
        check_model_limits(settings, self.io)
        self.backend, self.why = choose_backend(
            settings.backend, tensorrt_unavailable() if settings.backend != "onnxruntime" else None)
        self.graph_file, self.graph, self.note = _pick_graph(onnx_dir, self.io, self.backend)
        self.onnx_sha = onnx_sha256(onnx_dir / self.graph_file)


def is_current(out_dir: Path, plan: _Plan, settings: BuildSettings) -> bool:
    """build.json holds this export's hash, these limits and backend, and (TensorRT) this machine's version/GPU."""
    try:
        sidecar = read_build(out_dir)
        check_plan_compatible(sidecar, runtime_env())
    except EigenExportError:
        return False
    same = (sidecar["onnx_sha256"], sidecar["max_batch"], sidecar["max_context"], sidecar["backend"]) == \
        (plan.onnx_sha, settings.max_batch, settings.max_context, plan.backend)
    return same and (out_dir / sidecar["engine_file"]).exists()


def run_build(onnx_dir: str | Path, settings: BuildSettings = BuildSettings(), out_dir: str | Path | None = None,
              force: bool = False, replace_stale: bool = False) -> Path:
    """Build `build/<name>/engine/` from an `eigen-export export` directory; returns the engine dir."""
    onnx_dir = Path(onnx_dir)
    plan = _Plan(onnx_dir, settings)
    out_dir = Path(out_dir) if out_dir is not None else default_engine_dir(onnx_dir)
    current = is_current(out_dir, plan, settings)
    if not must_make("build", out_dir, current, force, replace_stale, "a build of this export"):
        return out_dir
    if plan.note:
        log.info("[build] %s", plan.note)
    started, started_cpu = time.perf_counter(), time.process_time()
    io = plan.io
    sidecar = new_sidecar(
        backend=plan.backend, graph=plan.graph, graph_file=plan.graph_file, graph_note=plan.note,
        onnx_sha256=plan.onnx_sha, source_sha256=io.source_sha256, dtype=io.dtype, num_layers=len(io.ranks),
        num_heads=io.num_heads, num_kv_heads=io.num_kv_heads, ranks=io.ranks, rope_mode=io.rope_mode,
        positions=io.positions, max_batch=settings.max_batch, max_context=settings.max_context,
        eigen_export_version=__version__)
    with atomic_dir(out_dir, force=True) as tmp:
        if plan.backend == "tensorrt":
            sidecar.update(build_tensorrt(onnx_dir / plan.graph_file, plan.graph, optimization_profiles(io, settings),
                                          tmp / PLAN, timing_cache_path(out_dir)))
            shutil.copy2(onnx_dir / IO_JSON, tmp / IO_JSON)     # the contract the runtime binds by
        else:
            sidecar.update(build_onnxruntime(onnx_dir, io, tmp))
        sidecar["build_seconds"] = round(time.perf_counter() - started, 2)
        sidecar["build_cpu_seconds"] = round(time.process_time() - started_cpu, 2)
        write_build(tmp, sidecar)                                           # last: marks completion
    # the one line that says which backend and why; a warning when auto could not build TensorRT
    (log.warning if settings.backend == "auto" and plan.backend == "onnxruntime" else log.info)("[build] %s", plan.why)
    log.info("[build] %s -> %s (%s graph, %.1f s)", onnx_dir, out_dir, plan.graph, sidecar["build_seconds"])
    return out_dir
