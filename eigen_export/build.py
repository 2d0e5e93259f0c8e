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

The pure parts (limits, profiles, the sidecar's checks, compatibility) are functions of data, tested
without TensorRT; the TensorRT calls are checked against its Python API documentation (URLs inline).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .artifacts import atomic_dir, read_json_record
from .errors import EigenExportError

log = logging.getLogger("eigen_export")

ENGINE_DIR = "engine"
BUILD_JSON = "build.json"
BUILD_FORMAT = "eigen_export.engine"
BUILD_VERSION = 1
PLAN = "model.plan"
ORT_MODEL = "model.onnx"
ORT_DATA = "model.onnx.data"
PLUGIN_MODEL = "model_plugin.onnx"
TIMING_CACHE = ".trt-timing-cache"            # in the build root (build/), shared by every model's builds
BACKENDS = ("auto", "tensorrt", "onnxruntime")
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_CONTEXT = 4096
PROFILE_NAMES = ("prefill", "decode")
# Keys of build.json; every one is written, None where it does not apply to the backend.
SIDECAR_KEYS = (
    "format", "version", "backend", "engine_file", "graph", "graph_file", "graph_note", "onnx_sha256",
    "source_sha256", "dtype", "num_layers", "num_heads", "num_kv_heads", "ranks", "rope_mode", "positions",
    "max_batch", "max_context", "profiles", "tensorrt_version", "gpu_name", "compute_capability",
    "timing_cache", "onnxruntime_version", "providers", "graph_optimization_level", "build_seconds",
    "build_cpu_seconds", "eigen_export_version",
)
REBUILD = "run `eigen-export build --force`"


# -- limits and profiles (pure) ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    max_batch: int
    max_context: int                      # past + seq: the longest sequence the engine serves


def check_limits(max_batch, max_context, io: dict, model_max_positions: int | None = None) -> Limits:
    """The build limits, or a one-line error naming the flag. `model_max_positions`: the longest sequence the
    model can encode (learned absolute positions); None where it has no hard limit (RoPE, ALiBi)."""
    for flag, value, low in (("--max-batch", max_batch, 1), ("--max-context", max_context, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            why = " (decode needs one cached token plus the new one)" if flag == "--max-context" else ""
            raise EigenExportError(f"{flag} must be an integer >= {low}{why}, got {value!r}")
    if model_max_positions is not None and max_context > model_max_positions:
        raise EigenExportError(f"--max-context {max_context} is beyond what this model supports: its learned "
                               f"position embeddings cover {model_max_positions} positions; use --max-context "
                               f"{model_max_positions} or less")
    return Limits(max_batch, max_context)


def _mid(low: int, high: int) -> int:
    return (low + high) // 2


def optimization_profiles(io: dict, limits: Limits) -> list[dict]:
    """The two TensorRT optimization profiles for the inputs io.json lists, as plain data:
    [{"name": "prefill"|"decode", "shapes": {input: {"min": [...], "opt": [...], "max": [...]}}}].

    prefill: batch 1..B, seq 1..C, past 0; decode: batch 1..B, seq 1, past 1..C-1; the mask is
    [batch, past + seq] (DESIGN 5). opt is the midpoint of each range (what TensorRT tunes kernels for).
    """
    b, c = limits.max_batch, limits.max_context
    batch = (1, _mid(1, b), b)
    dims = {
        "prefill": {"batch": batch, "seq": (1, _mid(1, c), c), "past": (0, 0, 0), "total": (1, _mid(1, c), c)},
        "decode": {"batch": batch, "seq": (1, 1, 1), "past": (1, _mid(1, c - 1), c - 1),
                   "total": (2, _mid(1, c - 1) + 1, c)},
    }
    profiles = []
    for name in PROFILE_NAMES:
        shapes = {}
        for entry in io["inputs"]:
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


# -- the sidecar (pure) -----------------------------------------------------------------------------------
def validate_sidecar(data: dict, path: str | Path = BUILD_JSON) -> dict:
    """build.json as read: right format and version, no unknown or missing keys; else a one-line error."""
    if data.get("format") != BUILD_FORMAT:
        raise EigenExportError(f"{path} is not an eigen_export engine description (format {data.get('format')!r}): "
                               f"{REBUILD}")
    if data.get("version") != BUILD_VERSION:
        raise EigenExportError(f"{path} is version {data.get('version')}, this eigen_export reads version "
                               f"{BUILD_VERSION}: {REBUILD}")
    unknown = sorted(set(data) - set(SIDECAR_KEYS))
    if unknown:
        raise EigenExportError(f"{path} has unknown keys {unknown}: written by another version or edited; {REBUILD}")
    missing = [k for k in SIDECAR_KEYS if k not in data]
    if missing:
        raise EigenExportError(f"{path} is missing keys {missing}: the build did not finish; {REBUILD}")
    if data["backend"] not in ("tensorrt", "onnxruntime"):
        raise EigenExportError(f"{path} names backend {data['backend']!r}: {REBUILD}")
    return data


def read_build(engine_dir: str | Path) -> dict:
    """The validated build.json of an engine directory."""
    path = Path(engine_dir) / BUILD_JSON
    data = read_json_record(path, "run `eigen-export build` to make an engine", f"the engine is corrupt; {REBUILD}")
    return validate_sidecar(data, path)


@dataclass(frozen=True)
class RuntimeEnv:
    """What a plan must match on the machine that runs it. None: unknown here (not checked)."""
    tensorrt_version: str | None
    compute_capability: str | None        # "9.0"
    gpu_name: str | None = None
    onnx_sha256: str | None = None        # the ONNX the caller expects the engine to be built from


def runtime_env(onnx_sha256: str | None = None) -> RuntimeEnv:
    """This machine's TensorRT version and GPU (None where absent)."""
    version = name = capability = None
    try:
        import tensorrt as trt

        version = trt.__version__
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            capability = "{}.{}".format(*torch.cuda.get_device_capability())
    except ImportError:
        pass
    return RuntimeEnv(version, capability, name, onnx_sha256)


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


# -- backend choice ---------------------------------------------------------------------------------------
def tensorrt_unavailable() -> str | None:
    """Why TensorRT cannot build here ("TensorRT not installed", "no CUDA GPU"), or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT not installed"
    try:
        import torch
    except ImportError:
        return "no CUDA GPU (torch is not installed to find one)"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def choose_backend(requested: str, unavailable: str | None) -> tuple[str, str]:
    """(backend, the one line that says which and why) for --backend and the reason TensorRT cannot run."""
    if requested not in BACKENDS:
        raise EigenExportError(f"--backend {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "onnxruntime":
        return "onnxruntime", "built the ONNX Runtime session (--backend onnxruntime)"
    if unavailable is None:
        return "tensorrt", "built the TensorRT engine"
    if requested == "tensorrt":
        raise EigenExportError(f"--backend tensorrt: {unavailable}; pip install 'eigen_export[tensorrt]' on a machine "
                               "with an NVIDIA GPU, or build with --backend onnxruntime")
    return "onnxruntime", f"{unavailable}: built the ONNX Runtime session instead"


# -- build ------------------------------------------------------------------------------------------------
def default_engine_dir(onnx_dir: Path) -> Path:
    """build/<name>/onnx -> build/<name>/engine."""
    return Path(onnx_dir).parent / ENGINE_DIR


def build(onnx_dir: str | Path, out_dir: str | Path | None = None, backend: str = "auto",
          max_batch: int = DEFAULT_MAX_BATCH, max_context: int = DEFAULT_MAX_CONTEXT, force: bool = False,
          replace_stale: bool = False) -> Path:
    """Build `build/<name>/engine/` from an `eigen-export export` directory; returns the engine dir.

    A current build (same ONNX hash, limits and backend, and for TensorRT the same TensorRT and GPU) is
    kept unless `force`. Another build already at `out_dir` is refused unless `force` or `replace_stale`
    (`make engine` owns its directories and replaces what its new inputs made stale).
    """
    from .export import read_io

    onnx_dir = Path(onnx_dir)
    if not (onnx_dir / "io.json").exists():
        raise EigenExportError(f"{onnx_dir} holds no ONNX export (no io.json): run `eigen-export export` first")
    io = read_io(onnx_dir)
    limits = check_limits(max_batch, max_context, io, model_max_positions(io))
    chosen, why = choose_backend(backend, tensorrt_unavailable() if backend != "onnxruntime" else None)
    out_dir = Path(out_dir) if out_dir is not None else default_engine_dir(onnx_dir)
    graph_file, graph, note = _pick_graph(onnx_dir, io, chosen)
    onnx_sha = onnx_sha256(onnx_dir / graph_file)
    if not force and _is_current(out_dir, onnx_sha, limits, chosen):
        log.info("[build] skipped: %s is current (pass --force to redo it)", out_dir)
        return out_dir
    if out_dir.exists() and not (force or replace_stale):
        raise EigenExportError(f"{out_dir} already exists and is not a build of this export with these settings: "
                               "pass --force to replace it or choose another --out")
    if note:
        log.info("[build] %s", note)
    started, started_cpu = time.perf_counter(), time.process_time()
    sidecar = _new_sidecar(io, chosen, graph_file, graph, note, onnx_sha, limits)
    with atomic_dir(out_dir, force=force or replace_stale) as tmp:
        if chosen == "tensorrt":
            profiles = optimization_profiles(io, limits)
            built = _build_tensorrt(onnx_dir / graph_file, graph, profiles, tmp / PLAN, _timing_cache_path(out_dir))
            sidecar.update(profiles=profiles, engine_file=PLAN, **built)
            shutil.copy2(onnx_dir / "io.json", tmp / "io.json")     # the contract the runtime binds by
        else:
            sidecar.update(engine_file=ORT_MODEL, **_build_onnxruntime(onnx_dir, io, tmp))
        sidecar["build_seconds"] = round(time.perf_counter() - started, 2)
        sidecar["build_cpu_seconds"] = round(time.process_time() - started_cpu, 2)
        validate_sidecar(sidecar)
        (tmp / BUILD_JSON).write_text(json.dumps(sidecar, indent=1) + "\n")         # last: marks completion
    # the one line that says which backend and why; a warning when auto could not build TensorRT
    (log.warning if backend == "auto" and chosen == "onnxruntime" else log.info)("[build] %s", why)
    log.info("[build] %s -> %s (%s graph, %.1f s)", onnx_dir, out_dir, graph, sidecar["build_seconds"])
    return out_dir


def _new_sidecar(io: dict, backend: str, graph_file: str, graph: str, note: str | None, onnx_sha: str,
                 limits: Limits) -> dict:
    """build.json's fields known before the build; the backend's own are filled in by its builder."""
    sidecar = {key: None for key in SIDECAR_KEYS}
    sidecar.update(
        format=BUILD_FORMAT, version=BUILD_VERSION, backend=backend, graph=graph, graph_file=graph_file,
        graph_note=note, onnx_sha256=onnx_sha, source_sha256=io.get("source_sha256"), dtype=io["dtype"],
        num_layers=len(io["ranks"]), num_heads=io.get("num_heads"), num_kv_heads=io["num_kv_heads"],
        ranks=io["ranks"], rope_mode=io.get("rope_mode"), positions=io.get("positions"),
        max_batch=limits.max_batch, max_context=limits.max_context, eigen_export_version=_version())
    return sidecar


def model_max_positions(io: dict) -> int | None:
    """The hard sequence limit of a model with learned absolute positions (its position table), else None.

    io.json's `max_positions` where the export wrote one; otherwise the source's config.json
    (`max_position_embeddings`) for learned positions. RoPE and ALiBi have no table to run out of.
    """
    if io.get("max_positions"):
        return int(io["max_positions"]) if io.get("positions") == "learned" else None
    if io.get("positions") != "learned" or not io.get("source"):
        return None
    config = Path(io["source"]) / "config.json"
    try:
        value = json.loads(config.read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def _pick_graph(onnx_dir: Path, io: dict, backend: str) -> tuple[str, str, str | None]:
    """(file, "plugin"|"standard", a note when the standard graph stands in for the plugin one)."""
    if backend == "onnxruntime":
        return io["model"], "standard", None          # ORT has the plugin op only as a Python test double
    plugin = io.get("plugin_model")
    if plugin and (onnx_dir / plugin).exists():
        return plugin, "plugin", None
    reason = io.get("plugin_model_reason") or (f"{plugin} is missing" if plugin else "io.json names no plugin graph")
    return io["model"], "standard", f"no plugin graph ({reason}): building the standard-ops graph {io['model']}"


def onnx_sha256(path: Path) -> str:
    """sha256 of an ONNX graph and the external-data files it references, in a stable order."""
    import onnx

    from .fold import sha256_file

    model = onnx.load(str(path), load_external_data=False)
    data = sorted({entry.value for init in model.graph.initializer for entry in init.external_data
                   if entry.key == "location"})
    h = hashlib.sha256()
    for file in [path.name] + data:
        h.update(file.encode() + sha256_file(path.parent / file).encode())
    return h.hexdigest()


def _is_current(out_dir: Path, onnx_sha: str, limits: Limits, backend: str) -> bool:
    try:
        sidecar = read_build(out_dir)
        check_plan_compatible(sidecar, runtime_env())
    except EigenExportError:
        return False
    same = (sidecar["onnx_sha256"], sidecar["max_batch"], sidecar["max_context"], sidecar["backend"]) == \
        (onnx_sha, limits.max_batch, limits.max_context, backend)
    return same and (out_dir / sidecar["engine_file"]).exists()


def _timing_cache_path(out_dir: Path) -> Path:
    """build/<name>/engine -> build/.trt-timing-cache: one cache for every model built under build/."""
    return out_dir.resolve().parent.parent / TIMING_CACHE


def _version() -> str:
    from . import __version__

    return __version__


# -- ONNX Runtime -----------------------------------------------------------------------------------------
def _build_onnxruntime(onnx_dir: Path, io: dict, tmp: Path) -> dict:
    """Optimize the standard-ops graph once with an ORT session and save it with its own io.json.

    ORT_ENABLE_EXTENDED, not ALL: ALL adds layout transformations specific to the execution provider and
    CPU of this machine, and the saved file should load wherever ORT does
    (https://onnxruntime.ai/docs/performance/model-optimizations/graph-optimizations.html#online-mode-vs-offline-mode).
    Weights of models near protobuf's 2 GB limit go to model.onnx.data through the session config entries
    session.optimized_model_external_initializers_file_name / _min_size_in_bytes (onnxruntime's
    transformers/optimizer.py uses the same two).
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise EigenExportError("the onnxruntime build needs onnxruntime: pip install 'eigen_export[onnx]'") from None
    from .runtime.onnxruntime_backend import OnnxRuntimeBackend, default_providers

    source = onnx_dir / io["model"]
    external = bool(io.get("external_data")) or source.stat().st_size > (1 << 30)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp / ORT_MODEL)
    if external:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", ORT_DATA)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    providers = default_providers()
    try:
        ort.InferenceSession(str(source), options, providers=providers)
    except Exception as e:      # onnxruntime raises one exception type per status code
        raise EigenExportError(f"ONNX Runtime could not optimize {source} ({str(e).splitlines()[0]})") from None
    engine_io = dict(io, model=ORT_MODEL, external_data=ORT_DATA if (tmp / ORT_DATA).exists() else None)
    (tmp / "io.json").write_text(json.dumps(engine_io, indent=1) + "\n")
    OnnxRuntimeBackend(tmp, providers=providers)      # the saved graph still honours the contract, or fail here
    return {"onnxruntime_version": ort.__version__, "providers": providers,
            "graph_optimization_level": "ORT_ENABLE_EXTENDED"}


# -- TensorRT ---------------------------------------------------------------------------------------------
def _trt_logger(trt):
    level = trt.Logger.VERBOSE if log.isEnabledFor(logging.DEBUG) else trt.Logger.WARNING
    return trt.Logger(level)


def _graph_for_parser(path: Path, graph: str) -> bytes:
    """The serialized graph to parse: for the plugin graph, a copy whose plugin nodes carry `aot=1`, the
    attribute that makes TensorRT's parser take the plugin's AOT implementation (compiled kernel, no Python
    at run time) instead of its JIT one (https://github.com/NVIDIA/TensorRT/tree/main/samples/python/
    quickly_deployable_plugins#onnx-model-with-an-aot-plugin). Weights stay external, read from beside `path`."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if graph == "plugin":
        from plugins.lowrank_attention.trt_plugin import PLUGIN_NAME

        for node in model.graph.node:
            if node.op_type == PLUGIN_NAME and not any(a.name == "aot" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("aot", 1))
    return model.SerializeToString()


def _build_tensorrt(graph_path: Path, graph: str, profiles: list[dict], plan_path: Path, cache_path: Path) -> dict:
    import tensorrt as trt
    import torch

    if graph == "plugin":
        from plugins.lowrank_attention.trt_plugin import register

        try:
            register()
        except RuntimeError as e:
            raise EigenExportError(str(e)) from None
    logger = _trt_logger(trt)
    builder = trt.Builder(logger)
    # Strongly typed: every tensor keeps the ONNX graph's type (fp16/bf16 exports stay so; softmax and norm
    # accumulation in fp32 is in the graph). TensorRT 11 removed the FP16/BF16 builder flags and ignores
    # this flag (always strongly typed); TensorRT 10 needs it.
    # https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    # parse(model bytes, path): the path tells the parser where external weights live
    # https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/parsers/Onnx/pyOnnx.html
    if not parser.parse(_graph_for_parser(graph_path, graph), str(graph_path)):
        errors = "; ".join(str(parser.get_error(i)).strip().replace("\n", " ") for i in range(parser.num_errors))
        raise EigenExportError(f"TensorRT could not parse {graph_path.name}: {errors}")
    config = builder.create_builder_config()
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, shape in profile["shapes"].items():
            trt_profile.set_shape(name, shape["min"], shape["opt"], shape["max"])
        config.add_optimization_profile(trt_profile)        # index = position in `profiles` (0 prefill, 1 decode)
    # Timing cache: loaded from disk when present, extended by this build, written back
    # (https://docs.nvidia.com/deeplearning/tensorrt/latest/performance/builder-performance.html#timing-cache).
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EigenExportError(f"TensorRT could not build an engine from {graph_path.name} (run with -v for its log)")
    plan_path.write_bytes(bytes(plan))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_cache = cache_path.with_name(cache_path.name + ".tmp")
    tmp_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    tmp_cache.replace(cache_path)                          # atomic: a concurrent build reads old or new, never half
    capability = torch.cuda.get_device_capability()
    return {"tensorrt_version": trt.__version__, "gpu_name": torch.cuda.get_device_name(),
            "compute_capability": f"{capability[0]}.{capability[1]}", "timing_cache": str(cache_path)}
