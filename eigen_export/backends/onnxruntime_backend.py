"""The exported graph on ONNX Runtime behind the Backend interface (DESIGN 7).

Every call goes through IO binding with buffers we own: inputs are bound by pointer straight from the
torch tensors (no copy), and every output - logits and each layer's present key/value - is preallocated
as a torch tensor whose memory ORT writes into, so the present returned to the caller is the very buffer
the graph's Concat filled, and it is bound as the next step's past without a copy.

What ORT allows and what it does not:
- It binds caller memory for inputs and outputs on CPU and (with onnxruntime-gpu) on CUDA.
- It cannot update a cache in place: the graph of DESIGN 5 returns present = concat(past, new), so each
  step writes past + seq rows per layer into a new buffer (one pass over the cache, which decode
  attention reads anyway). An in-place fixed-capacity cache needs another graph signature (ORT's
  contrib GroupQueryAttention with a shared past/present buffer), which is not the portable contract.
- An output buffer must be contiguous with exactly the output's shape, so the present of step t cannot
  be a slice of a larger preallocated buffer. Instead, two flat buffers per cache tensor are reused in
  turn (ping-pong) once the caller no longer holds the older one, which saves the allocation and page
  faults of a multi-megabyte tensor per layer and step.

`plugin=True` runs `model_plugin.onnx` instead: its LowRankAttention nodes run as a Python custom op
(onnxruntime-extensions, the PyTorch reference as the kernel). That checks the plugin graph's wiring on
CPU; it is not a fast path.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from eigen_export_plugins.lowrank_attention.onnx_op import for_onnxruntime, register_ort_op, take_ort_error

from ..artifacts.layout import BUILD_JSON, IO_JSON, MODEL_ONNX, ONNX_DATA
from ..artifacts.onnx_io import OnnxIO, check_io, read_io, write_io
from ..dtypes import CODES, FLOATS, INT64, dtype
from ..errors import EigenExportError
from .base import check_step_inputs

log = logging.getLogger("eigen_export")

# onnxruntime and onnxruntime-gpu install the same module: one extra each, never both in one environment
ORT_HINT = "pip install 'eigen_export[onnx,ort]' (on a CUDA machine 'eigen_export[onnx,gpu]' instead)"



def default_providers() -> list[str]:
    """CUDA when onnxruntime-gpu and a CUDA torch are both present (the cache then stays on the GPU), else CPU."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class _BufferPool:
    """Reusable storage for one output name. A storage is handed out again only when no tensor the caller
    can still see refers to it: its use count is back to 1, the pool's own reference (views handed out,
    and anything derived from them, each hold one)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.storages: list = []

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        for i, storage in enumerate(self.storages):
            if _use_count(storage) == 1:
                if storage.nbytes() < nbytes:
                    storage = self.storages[i] = self._new(nbytes)
                return torch.empty(0, dtype=dtype, device=self.device).set_(storage, 0, shape)
        if len(self.storages) >= 2 or _use_count is None:
            # the caller keeps older presents alive (or torch cannot tell): allocate rather than hoard
            return torch.empty(shape, dtype=dtype, device=self.device)
        self.storages.append(self._new(nbytes))
        return torch.empty(0, dtype=dtype, device=self.device).set_(self.storages[-1], 0, shape)

    def _new(self, nbytes: int):
        # 1/8 head room: decode steps then reuse one storage for many steps before it has to grow
        return torch.empty(max(nbytes + nbytes // 8, 1), dtype=torch.uint8, device=self.device).untyped_storage()


def _use_count(storage) -> int:
    return torch._C._storage_Use_Count(storage._cdata)


if not hasattr(torch._C, "_storage_Use_Count"):     # a private API: without it, buffers are never reused
    _use_count = None


class OnnxRuntimeBackend:
    """An `eigen-export export` directory (model.onnx or model_plugin.onnx, + io.json) run by ONNX Runtime."""

    name = "onnxruntime"

    def __init__(self, onnx_dir: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 reuse_buffers: bool = True, session_config: dict[str, str] | None = None, plugin: bool = False):
        """threads: intra-op threads (None: ORT's default, all cores). session_config: ORT session config
        entries, e.g. {"session.intra_op.allow_spinning": "0"} on a machine shared with other work.
        plugin: run the plugin graph (fp32 only) with its custom node as a Python op."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise EigenExportError(f"the onnxruntime backend needs onnxruntime: {ORT_HINT}") \
                from None
        self.onnx_dir = Path(onnx_dir)
        self.io = read_io(self.onnx_dir)
        self.plugin = plugin
        model_path = self.onnx_dir / (_plugin_graph_name(self.io, self.onnx_dir) if plugin else self.io.model)
        if not model_path.exists():
            raise EigenExportError(f"{model_path} is missing: re-run `eigen-export export`")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(key, value)
        self.providers = list(providers) if providers is not None else default_providers()
        model = _plugin_graph_for_ort(model_path, options) if plugin else str(model_path)
        try:
            self.session = ort.InferenceSession(model, options, providers=self.providers)
        except Exception as e:      # onnxruntime raises its own exception types, one per status code
            if "NOT_IMPLEMENTED" in str(e):
                raise EigenExportError(f"ONNX Runtime ({', '.join(self.providers)}) cannot run this {self.io.dtype} "
                                       f"graph ({str(e).split(':')[-1].strip()}): CPU kernels exist for fp32 (and fp16 "
                                       "in part), bf16 exports are for GPU backends; export with --dtype fp32 for CPU"
                                       ) from None
            if any(code in str(e) for code in ("INVALID_PROTOBUF", "INVALID_GRAPH", "NO_SUCHFILE", "FAIL")):
                # a truncated or edited file: the stage that wrote it must write it again
                remake = "eigen-export build --force" if (self.onnx_dir / BUILD_JSON).exists() else \
                    "eigen-export export --force"
                cause = " ".join(str(e).split()).split(" : ")[-1][:200]
                raise EigenExportError(f"ONNX Runtime cannot load {model_path} ({cause}): the file is damaged or "
                                       f"does not match io.json; run `{remake}`") from None
            raise
        check_io(self.io, _session_io(self.session), self.onnx_dir / IO_JSON)

        on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider" and torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
        self.dtype = dtype(self.io.cache_dtype).torch
        self.num_kv_heads = int(self.io.num_kv_heads)
        self.layout = self.io.cache_layout()
        self.vocab_size = int(self.io.outputs[0]["shape"][-1])
        self.reuse_buffers = reuse_buffers
        self._pools: dict[str, _BufferPool] = {}

    # -- the Backend interface --------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids, attention_mask, position_ids, past):
        b, s, p = check_step_inputs(input_ids, attention_mask, position_ids, past, self.num_kv_heads, self.layout,
                                    "graph")
        binding = self.session.io_binding()
        keep = []                                         # bound inputs must outlive the run
        for name, tensor in (("input_ids", input_ids), ("attention_mask", attention_mask),
                             ("position_ids", position_ids)):
            keep.append(self._bind_input(binding, name, tensor.to(self.device, torch.int64)))
        for i, slots in enumerate(self.layout):
            for j, (kv, width, element) in enumerate(slots):
                tensor = past[i][j] if past else torch.empty(b, self.num_kv_heads, 0, width, dtype=element,
                                                             device=self.device)
                keep.append(self._bind_input(binding, f"past_key_values.{i}.{kv}", tensor))
        logits = self._bind_output(binding, "logits", (b, s, self.vocab_size), self.dtype)
        presents = []
        for i, slots in enumerate(self.layout):
            presents.append(tuple(self._bind_output(binding, f"present.{i}.{kv}", (b, self.num_kv_heads, p + s, w),
                                                    element) for kv, w, element in slots))
        try:
            self.session.run_with_iobinding(binding)
        finally:
            if self.plugin:
                _raise_plugin_op_error()
        return logits, presents

    # -- binding ----------------------------------------------------------------------------------------
    def _bind_input(self, binding, name: str, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device).contiguous()
        # an empty cache (prefill) has no storage: any valid address will do for zero elements
        binding.bind_input(name, self.device.type, self.device.index or 0, dtype(tensor.dtype).onnx,
                           list(tensor.shape), tensor.data_ptr() or _EMPTY.data_ptr())
        return tensor

    def _bind_output(self, binding, name: str, shape: tuple[int, ...], element: torch.dtype) -> torch.Tensor:
        if self.reuse_buffers and name != "logits":
            out = self._pools.setdefault(name, _BufferPool(self.device)).take(shape, element)
        else:
            out = torch.empty(shape, dtype=element, device=self.device)
        binding.bind_output(name, self.device.type, self.device.index or 0, dtype(element).onnx, list(shape),
                            out.data_ptr() or _EMPTY.data_ptr())
        return out


def _plugin_graph_name(io: OnnxIO, onnx_dir: Path) -> str:
    """io.json's plugin graph, or a one-line error saying why the export has none / why ORT cannot run it."""
    if not io.plugin_model:
        why = io.plugin_model_reason or "it was exported before plugin graphs existed: re-run " \
                                                "`eigen-export export --force`"
        raise EigenExportError(f"{onnx_dir} has no plugin graph (model_plugin.onnx): {why}")
    if io.dtype != "fp32":
        raise EigenExportError(f"ONNX Runtime runs the plugin graph in fp32 only (its Python custom op has one type "
                               f"per input), this export is {io.dtype}: use model.onnx (plugin=False) or TensorRT")
    return io.plugin_model


def _raise_plugin_op_error() -> None:
    error = take_ort_error()
    if error is not None:
        raise EigenExportError(f"the plugin graph's LowRankAttention node failed on ONNX Runtime: {error}")


def _plugin_graph_for_ort(path: Path, options) -> bytes:
    """The plugin graph as ORT can run it: its LowRankAttention nodes moved, in memory only, into the domain
    of onnxruntime-extensions' Python ops (fixed there; the file keeps eigen_export for TensorRT)."""
    try:
        from onnxruntime_extensions import get_library_path
    except ImportError:
        raise EigenExportError("the plugin graph on ONNX Runtime needs onnxruntime-extensions (its custom node runs "
                               "as a Python op): pip install 'eigen_export[onnx]'") from None
    import onnx

    register_ort_op()
    options.register_custom_ops_library(get_library_path())
    model = onnx.load(str(path), load_external_data=False)
    for_onnxruntime(model)
    # handed over as bytes, the graph has no path of its own: external weights are found next to the file
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    return model.SerializeToString()


# the address bound for a zero-size tensor (prefill's empty cache); ORT never reads through it
_EMPTY = torch.empty(1)


def _session_io(session) -> tuple[list[tuple], list[tuple]]:
    names = {d.ort: d.name for d in (*FLOATS, INT64, *CODES)}

    def describe(arg):
        return arg.name, names.get(arg.type, arg.type), list(arg.shape)

    return [describe(a) for a in session.get_inputs()], [describe(a) for a in session.get_outputs()]


# -- the build: the standard-ops graph optimized once and saved --------------------------------------------
def build_onnxruntime(onnx_dir: Path, io: OnnxIO, tmp: Path) -> dict:
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
        raise EigenExportError(f"the onnxruntime build needs onnxruntime: {ORT_HINT}") from None
    source = onnx_dir / io.model
    external = bool(io.external_data) or source.stat().st_size > (1 << 30)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp / MODEL_ONNX)
    if external:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", ONNX_DATA)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    providers = default_providers()
    try:
        ort.InferenceSession(str(source), options, providers=providers)
    except Exception as e:      # onnxruntime raises one exception type per status code
        raise EigenExportError(f"ONNX Runtime could not optimize {source} ({str(e).splitlines()[0]})") from None
    write_io(tmp, io.replace(model=MODEL_ONNX, external_data=ONNX_DATA if (tmp / ONNX_DATA).exists() else None))
    OnnxRuntimeBackend(tmp, providers=providers)      # the saved graph still honours the contract, or fail here
    return {"engine_file": MODEL_ONNX, "onnxruntime_version": ort.__version__, "providers": providers,
            "graph_optimization_level": "ORT_ENABLE_EXTENDED"}
