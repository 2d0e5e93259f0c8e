"""engine/build.json: what an engine was built from and for (DESIGN 7): backend, the ONNX it was built from
(sha256), limits and profiles, and for TensorRT the version and GPU a plan is tied to."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import EigenExportError
from .layout import BUILD_JSON
from .records import check_format, read_json_record

BUILD_FORMAT = "eigen_export.engine"
BUILD_VERSION = 2              # 2: graph_nodes (the graph TensorRT parsed: node counts before/after folding)
REBUILD = "run `eigen-export build --force`"
ENGINE_BACKENDS = ("tensorrt", "onnxruntime")
# Keys of build.json; every one is written, None where it does not apply to the backend.
SIDECAR_KEYS = (
    "format", "version", "backend", "engine_file", "graph", "graph_file", "graph_note", "onnx_sha256",
    "source_sha256", "dtype", "num_layers", "num_heads", "num_kv_heads", "ranks", "rope_mode", "positions",
    "max_batch", "max_context", "profiles", "graph_nodes", "tensorrt_version", "gpu_name", "compute_capability",
    "timing_cache", "onnxruntime_version", "providers", "graph_optimization_level", "build_seconds",
    "build_cpu_seconds", "eigen_export_version",
)


def new_sidecar(**known) -> dict:
    """build.json with every key present: the given ones, None for the rest (filled in by the builder)."""
    unknown = sorted(set(known) - set(SIDECAR_KEYS))
    if unknown:
        raise ValueError(f"not build.json keys: {unknown}")
    return {**{key: None for key in SIDECAR_KEYS}, "format": BUILD_FORMAT, "version": BUILD_VERSION, **known}


def validate_sidecar(data: dict, path: str | Path = BUILD_JSON) -> dict:
    """build.json as read: right format and version, no unknown or missing keys; else a one-line error."""
    check_format(data, path, BUILD_FORMAT, BUILD_VERSION, REBUILD)
    unknown = sorted(set(data) - set(SIDECAR_KEYS))
    if unknown:
        raise EigenExportError(f"{path} has unknown keys {unknown}: written by another version or edited; {REBUILD}")
    missing = [k for k in SIDECAR_KEYS if k not in data]
    if missing:
        raise EigenExportError(f"{path} is missing keys {missing}: the build did not finish; {REBUILD}")
    if data["backend"] not in ENGINE_BACKENDS:
        raise EigenExportError(f"{path} names backend {data['backend']!r}: {REBUILD}")
    return data


def read_build(engine_dir: str | Path) -> dict:
    """The validated build.json of an engine directory."""
    path = Path(engine_dir) / BUILD_JSON
    data = read_json_record(path, "run `eigen-export build` to make an engine", f"the engine is corrupt; {REBUILD}")
    return validate_sidecar(data, path)


def write_build(engine_dir: Path, sidecar: dict) -> None:
    """build.json, written last: it marks a complete engine."""
    validate_sidecar(sidecar)
    (Path(engine_dir) / BUILD_JSON).write_text(json.dumps(sidecar, indent=1) + "\n")


@dataclass(frozen=True)
class RuntimeEnv:
    """What a plan must match on the machine that runs it. None: unknown here (not checked)."""
    tensorrt_version: str | None
    compute_capability: str | None        # "9.0"
    gpu_name: str | None = None
    onnx_sha256: str | None = None        # the ONNX the caller expects the engine to be built from


def check_plan_compatible(sidecar: dict, env: RuntimeEnv) -> None:
    """A TensorRT plan runs only with the TensorRT version and GPU architecture it was built for (plans are
    not portable across either: https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/
    advanced.html#version-compatibility is opt-in and not used here). One-line "rebuild" error on mismatch."""
    if sidecar.get("backend") != "tensorrt":
        return
    built = f"TensorRT {sidecar['tensorrt_version']} for sm_{_sm(sidecar['compute_capability'])}"
    here = f"TensorRT {env.tensorrt_version or 'none'} / sm_{_sm(env.compute_capability or 'none')}"
    if env.tensorrt_version is not None and env.tensorrt_version != sidecar["tensorrt_version"]:
        raise EigenExportError(f"the engine was built with {built}; this machine has {here}: {REBUILD}")
    if env.compute_capability is not None and env.compute_capability != sidecar["compute_capability"]:
        raise EigenExportError(f"the engine was built with {built} ({sidecar['gpu_name']}); this machine has {here} "
                               f"({env.gpu_name}): {REBUILD}")
    if env.onnx_sha256 is not None and env.onnx_sha256 != sidecar["onnx_sha256"]:
        raise EigenExportError(f"the engine was built from another ONNX export (sha256 {sidecar['onnx_sha256'][:12]}, "
                               f"the export now is {env.onnx_sha256[:12]}): {REBUILD}")


def _sm(capability: str) -> str:
    return capability.replace(".", "")
