"""A TensorRT engine (`eigen-export build`) behind the Backend interface (DESIGN 7), and its build.

Built and deserialized through Polygraphy's loaders (create_network, CreateConfig + Profile with the timing
cache, EngineBytesFromNetwork, engine_from_bytes), which NVIDIA tests against every TensorRT release.
Executed by hand on the execution context, not by Polygraphy's TrtRunner: the runner writes each output into
a buffer of its own that the next call reuses, and the decode loop feeds every present back as the next
past, so a present would be overwritten by the very step that reads it (or must be copied out each step).
The two capacity buffers below avoid both.

The engine has two optimization profiles (build.json lists them): 0 = prefill (past 0, seq 1..max_context),
1 = decode (seq 1, past 1..max_context-1). forward() picks one by the past length, sets the input shapes,
binds torch-owned CUDA memory by address and enqueues on torch's current stream:
- `set_optimization_profile_async(index, stream)`, `set_input_shape(name, shape)`,
  `set_tensor_address(name, ptr)`, `execute_async_v3(stream)`
  (https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html).
  Work is ordered with torch's kernels on the same stream, so no synchronisation is needed between steps.

What is and is not in place, honestly:
- The graph of DESIGN 5 returns present = concat(past, new), so every step writes past + seq rows per layer
  (one pass over the cache, which decode attention reads anyway). The cache is NOT updated in place:
  that needs the plugin to alias its cache input to an output (`tensorrt.plugin` supports aliased I/O;
  the exported graph does not use it yet).
- What is fixed is the storage: each present is written into one of two capacity buffers per cache tensor,
  each sized for max_batch x max_context tokens and allocated once, used in turn (step t reads past from
  one and writes present to the other). A present is a contiguous view at the start of its buffer, as
  TensorRT requires for an output binding. A buffer is handed to TensorRT again only when no tensor the
  caller can see still refers to it (a caller that keeps old presents gets freshly allocated ones instead).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from eigen_export_plugins.lowrank_attention.onnx_op import complete_attributes
from eigen_export_plugins.lowrank_attention.trt_plugin import AOT_OPS, INSTALL_HINT, register

from ..artifacts.engine import RuntimeEnv, check_plan_compatible, read_build
from ..artifacts.onnx_io import read_io
from ..dtypes import dtype
from ..errors import EigenExportError
from .base import check_step_inputs
from .onnx_sanitize import quiet_polygraphy, sanitize
from .onnxruntime_backend import _use_count

log = logging.getLogger("eigen_export")

PREFILL, DECODE = 0, 1          # profile indices, in the order optimization_profiles writes them
PROFILE_NAMES = ("prefill", "decode")


class _CapacityBuffers:
    """Two fixed-capacity storages for one cache tensor, handed out in turn (see the module docstring)."""

    def __init__(self, capacity_elements: int, dtype: torch.dtype, device: torch.device):
        self.capacity, self.dtype, self.device = capacity_elements, dtype, device
        self.storages: list = []

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        for storage in self.storages:
            if _use_count is not None and _use_count(storage) == 1:
                return torch.empty(0, dtype=self.dtype, device=self.device).set_(storage, 0, shape)
        if len(self.storages) < 2 and _use_count is not None:
            self.storages.append(torch.empty(self.capacity, dtype=self.dtype, device=self.device).untyped_storage())
            return torch.empty(0, dtype=self.dtype, device=self.device).set_(self.storages[-1], 0, shape)
        return torch.empty(shape, dtype=self.dtype, device=self.device)     # the caller holds both: allocate


class TensorRTBackend:
    """An `eigen-export build` directory (model.plan + build.json + io.json) run by TensorRT on CUDA."""

    name = "tensorrt"

    def __init__(self, engine_dir: str | Path):
        self.engine_dir = Path(engine_dir)
        self.build = read_build(self.engine_dir)
        if self.build["backend"] != "tensorrt":
            raise EigenExportError(f"{self.engine_dir} holds an ONNX Runtime session, not a TensorRT engine: "
                                   "run it with --backend onnxruntime, or rebuild with `eigen-export build "
                                   "--backend tensorrt --force` on a machine with TensorRT and a GPU")
        _import_tensorrt()
        if not torch.cuda.is_available():
            raise EigenExportError("the tensorrt backend needs a CUDA GPU and a CUDA build of torch; none is "
                                   "available here: use --backend onnxruntime")
        check_plan_compatible(self.build, runtime_env())
        if self.build["graph"] == "plugin":
            register()          # harmless for AOT plugin layers; needed if the engine holds the JIT path
        self.io = read_io(self.engine_dir)
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.engine = _load_engine(self.engine_dir / self.build["engine_file"])
        self._check_engine()
        self.context = self.engine.create_execution_context()
        self.max_batch, self.max_context = int(self.build["max_batch"]), int(self.build["max_context"])
        self.num_kv_heads = int(self.io.num_kv_heads)
        self.layout = self.io.cache_layout()
        self.dtype = dtype(self.io.cache_dtype).torch
        self.vocab_size = int(self.io.outputs[0]["shape"][-1])
        self._profile = None
        self._buffers: dict[str, _CapacityBuffers] = {}
        self._empty = torch.empty(1, dtype=self.dtype, device=self.device)   # address for zero-size tensors

    def _check_engine(self) -> None:
        """The plan must expose io.json's tensors and build.json's two profiles (prefill, decode), in that order."""
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        wanted = [e["name"] for e in self.io.inputs + self.io.outputs]
        missing = [n for n in wanted if n not in names]
        profiles = [p["name"] for p in self.build["profiles"] or []]
        if missing or profiles != ["prefill", "decode"] or self.engine.num_optimization_profiles != 2:
            what = f"lacks {missing[:3]}" if missing else f"has profiles {profiles}"
            raise EigenExportError(f"{self.engine_dir} does not match this eigen_export (the engine {what}): "
                                   "run `eigen-export build --force`")

    # -- the Backend interface --------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids, attention_mask, position_ids, past):
        b, s, p = check_step_inputs(input_ids, attention_mask, position_ids, past, self.num_kv_heads, self.layout,
                                    "engine")
        self._check(b, s, p)
        stream = torch.cuda.current_stream(self.device)
        profile = PREFILL if p == 0 else DECODE
        if profile != self._profile:
            # https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html
            self.context.set_optimization_profile_async(profile, stream.cuda_stream)
            self._profile = profile
        keep = []                                           # inputs must live until the enqueued work ran
        for name, tensor in (("input_ids", input_ids), ("attention_mask", attention_mask),
                             ("position_ids", position_ids)):
            keep.append(self._bind_input(name, tensor.to(self.device, torch.int64)))
        for i, slots in enumerate(self.layout):
            for j, (kv, width, element) in enumerate(slots):
                tensor = past[i][j] if past else torch.empty(b, self.num_kv_heads, 0, width, dtype=element,
                                                             device=self.device)
                keep.append(self._bind_input(f"past_key_values.{i}.{kv}", tensor))
        logits = torch.empty(b, s, self.vocab_size, dtype=self.dtype, device=self.device)
        self._bind_output("logits", logits)
        presents = []
        for i, slots in enumerate(self.layout):
            layer = []
            for kv, width, element in slots:
                name = f"present.{i}.{kv}"
                pool = self._buffers.setdefault(name, _CapacityBuffers(
                    self.max_batch * self.num_kv_heads * self.max_context * width, element, self.device))
                layer.append(self._bind_output(name, pool.take((b, self.num_kv_heads, p + s, width))))
            presents.append(tuple(layer))
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EigenExportError(f"TensorRT failed to run the engine at batch {b}, seq {s}, past {p} "
                                   "(run with -v for its log)")
        return logits, presents

    # -- binding ----------------------------------------------------------------------------------------
    def _bind_input(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device).contiguous()
        if not self.context.set_input_shape(name, tuple(tensor.shape)):
            raise EigenExportError(f"{name} of shape {tuple(tensor.shape)} is outside the engine's profiles: "
                                   "rebuild with larger --max-context / --max-batch")
        self.context.set_tensor_address(name, tensor.data_ptr() or self._empty.data_ptr())
        return tensor

    def _bind_output(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        self.context.set_tensor_address(name, tensor.data_ptr() or self._empty.data_ptr())
        return tensor

    def _check(self, b, s, p) -> None:
        """Shapes beyond the profiles, named with the limit and the flag that raises it."""
        if b > self.max_batch:
            raise EigenExportError(f"batch {b} is beyond this engine's max_batch {self.max_batch}: rebuild with "
                                   f"`eigen-export build --max-batch {b} --force`")
        if p + s > self.max_context:
            raise EigenExportError(f"past {p} + seq {s} = {p + s} tokens is beyond this engine's max_context "
                                   f"{self.max_context}: rebuild with "
                                   f"`eigen-export build --max-context {p + s} --force`")
        if p > 0 and s != 1:
            raise EigenExportError(f"seq {s} with past {p}: the engine's profiles are prefill (past 0) and decode "
                                   "(seq 1); feed the new tokens one at a time")


def _load_engine(plan: Path):
    """The deserialized engine, through Polygraphy's loader; a damaged plan is a one-line error."""
    from polygraphy.backend.trt import engine_from_bytes
    from polygraphy.exception import PolygraphyException

    with quiet_polygraphy():
        try:
            return engine_from_bytes(plan.read_bytes())
        except PolygraphyException:
            raise EigenExportError(f"TensorRT could not load {plan}: run `eigen-export build --force`") from None


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise EigenExportError(f"the tensorrt backend needs TensorRT: {INSTALL_HINT}") from None
    return trt


# -- what this machine has -----------------------------------------------------------------------------
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


# -- the build ------------------------------------------------------------------------------------------------
def graph_for_parser(path: Path, graph: str) -> tuple[bytes, dict]:
    """The serialized graph TensorRT parses, and its node counts (build.json `graph_nodes`).

    The export, folded further by Polygraphy where that removes nodes (backends/onnx_sanitize.py); for the
    plugin graph, each plugin node of a type with a compiled kernel (trt_plugin.AOT_OPS: every op type, float and
    quantized caches, `pre` mode's latent keys) carries `aot=1`, the attribute that makes TensorRT's parser take
    the plugin's AOT implementation (compiled kernel, no Python at run time) instead of its JIT one, and a quantized
    node exported before the `kv_layout` attribute existed gets an empty one (onnx_op.complete_attributes)
    (https://github.com/NVIDIA/TensorRT/tree/main/samples/python/quickly_deployable_plugins#onnx-model-with-an-
    aot-plugin). External weights stay where they are, read from beside `path`. The file is not changed."""
    import onnx

    sanitized = sanitize(path)
    model = sanitized.model
    if graph == "plugin":
        for node in model.graph.node:
            if node.op_type not in AOT_OPS:
                continue
            complete_attributes(node)
            if not any(a.name == "aot" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("aot", 1))
    return model.SerializeToString(), sanitized.record()


def polygraphy_profile(profile: dict):
    """One of stages.build.optimization_profiles as Polygraphy's Profile (input -> min/opt/max shapes)."""
    from polygraphy.backend.trt import Profile

    trt_profile = Profile()
    for name, shape in profile["shapes"].items():
        trt_profile.add(name, shape["min"], shape["opt"], shape["max"])
    return trt_profile


def build_tensorrt(graph_path: Path, graph: str, profiles: list[dict], plan_path: Path, cache_path: Path) -> dict:
    """The engine through Polygraphy's loaders: network, builder config with the two profiles and the timing
    cache, the serialized engine (Polygraphy locks the cache file while it merges this build's timings in)."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, create_network
    from polygraphy.backend.trt.util import get_trt_logger
    from polygraphy.exception import PolygraphyException

    if graph == "plugin":
        try:
            register()
        except RuntimeError as e:
            raise EigenExportError(str(e)) from None
    model_bytes, nodes = graph_for_parser(graph_path, graph)
    # Strongly typed: every tensor keeps the ONNX graph's type (fp16/bf16 exports stay so; softmax and norm
    # accumulation in fp32 is in the graph). TensorRT 11 removed the flag (always strongly typed) and the
    # FP16/BF16 builder flags; TensorRT 10 needs it.
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    with quiet_polygraphy():
        try:
            builder, network = create_network(strongly_typed=strongly_typed)
            # Parsed here rather than by NetworkFromOnnxPath / NetworkFromOnnxBytes: the graph parsed is not the
            # file (aot=1, folded), and only parse(bytes, path) tells the parser where external weights live
            # (https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/parsers/Onnx/pyOnnx.html).
            parser = trt.OnnxParser(network, get_trt_logger())
            if not parser.parse(model_bytes, str(graph_path)):
                errors = "; ".join(str(parser.get_error(i)).strip().replace("\n", " ")
                                   for i in range(parser.num_errors))
                raise EigenExportError(f"TensorRT could not parse {graph_path.name}: {errors}")
            # index = position in `profiles` (0 prefill, 1 decode): TensorRTBackend selects them by index
            config = CreateConfig(profiles=[polygraphy_profile(p) for p in profiles],
                                  load_timing_cache=str(cache_path) if cache_path.exists() else None)
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            plan = EngineBytesFromNetwork((builder, network, parser), config=config,
                                          save_timing_cache=str(cache_path))()
        except PolygraphyException as e:
            raise EigenExportError(f"TensorRT could not build an engine from {graph_path.name} "
                                   f"({str(e).strip().splitlines()[-1]}; run with -v for its log)") from None
    plan_path.write_bytes(bytes(plan))
    capability = torch.cuda.get_device_capability()
    return {"engine_file": plan_path.name, "profiles": profiles, "graph_nodes": nodes,
            "tensorrt_version": trt.__version__, "gpu_name": torch.cuda.get_device_name(),
            "compute_capability": f"{capability[0]}.{capability[1]}", "timing_cache": str(cache_path)}
