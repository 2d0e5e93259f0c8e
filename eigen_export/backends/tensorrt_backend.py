"""A TensorRT engine (`eigen-export build`) behind the Backend interface (DESIGN 7).

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

from eigen_export_plugins.lowrank_attention.trt_plugin import INSTALL_HINT, PLUGIN_NAME, register

from ..artifacts.engine import RuntimeEnv, check_plan_compatible, read_build
from ..artifacts.onnx_io import read_io
from ..dtypes import dtype
from ..errors import EigenExportError
from .base import check_step_inputs
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
        trt = _import_tensorrt()
        if not torch.cuda.is_available():
            raise EigenExportError("the tensorrt backend needs a CUDA GPU and a CUDA build of torch; none is "
                                   "available here: use --backend onnxruntime")
        check_plan_compatible(self.build, runtime_env())
        if self.build["graph"] == "plugin":
            register()          # harmless for AOT plugin layers; needed if the engine holds the JIT path
        self.io = read_io(self.engine_dir)
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        plan = (self.engine_dir / self.build["engine_file"]).read_bytes()
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EigenExportError(f"TensorRT could not load {self.engine_dir / self.build['engine_file']}: "
                                   "run `eigen-export build --force`")
        self._check_engine()
        self.context = self.engine.create_execution_context()
        self.max_batch, self.max_context = int(self.build["max_batch"]), int(self.build["max_context"])
        self.num_kv_heads = int(self.io.num_kv_heads)
        self.widths = [(int(k), int(v)) for k, v in self.io.ranks]
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
        b, s, p = check_step_inputs(input_ids, attention_mask, position_ids, past, self.num_kv_heads, self.widths,
                                    self.dtype, "engine")
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
        for i, (r_k, r_v) in enumerate(self.widths):
            for j, (kv, width) in enumerate((("key", r_k), ("value", r_v))):
                tensor = past[i][j] if past else torch.empty(b, self.num_kv_heads, 0, width, dtype=self.dtype,
                                                             device=self.device)
                keep.append(self._bind_input(f"past_key_values.{i}.{kv}", tensor))
        logits = torch.empty(b, s, self.vocab_size, dtype=self.dtype, device=self.device)
        self._bind_output("logits", logits)
        presents = []
        for i, (r_k, r_v) in enumerate(self.widths):
            pair = []
            for kv, width in (("key", r_k), ("value", r_v)):
                name = f"present.{i}.{kv}"
                pool = self._buffers.setdefault(name, _CapacityBuffers(
                    self.max_batch * self.num_kv_heads * self.max_context * width, self.dtype, self.device))
                pair.append(self._bind_output(name, pool.take((b, self.num_kv_heads, p + s, width))))
            presents.append(tuple(pair))
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
        for node in model.graph.node:
            if node.op_type == PLUGIN_NAME and not any(a.name == "aot" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("aot", 1))
    return model.SerializeToString()


def build_tensorrt(graph_path: Path, graph: str, profiles: list[dict], plan_path: Path, cache_path: Path) -> dict:
    import tensorrt as trt

    if graph == "plugin":
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
    return {"engine_file": plan_path.name, "profiles": profiles, "tensorrt_version": trt.__version__,
            "gpu_name": torch.cuda.get_device_name(), "compute_capability": f"{capability[0]}.{capability[1]}",
            "timing_cache": str(cache_path)}
