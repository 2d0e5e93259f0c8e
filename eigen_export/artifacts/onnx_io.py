"""onnx/io.json: the graph contract of an export (DESIGN 5): names, element types and named dims of every
input and output, and what the graphs were made from. Written by `export` (and by the ONNX Runtime build
beside its optimized graph), read by the build and every runtime, checked against the graph it describes."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from eigen_export_plugins.lowrank_attention.kv_codec import cache_slots

from ..dtypes import dtype as dtype_of
from ..errors import EigenExportError
from .layout import IO_JSON
from .records import check_format, read_json_record

IO_FORMAT = "eigen_export.onnx"
IO_VERSION = 2       # 2: the graphs encode and decode int4 / mixed caches with mid-rise codes
REMAKE = "re-run `eigen-export export --force`"


@dataclass(frozen=True)
class OnnxIO:
    model: str                          # the standard-ops graph's file name
    external_data: str | None           # its weights file, None where the weights are inline
    plugin: bool                        # whether a plugin graph was asked for
    plugin_model: str | None            # the plugin graph's file name, None where there is none
    plugin_model_reason: str | None     # why there is none (one line)
    plugin_external_data: str | None    # the plugin graph's own weights file (weights model.onnx.data lacks)
    exporter: str
    source: str                         # the model directory exported
    source_sha256: str
    model_type: str
    family: str
    rope_mode: str | None
    positions: str                      # learned | alibi | rope
    max_positions: int | None           # learned positions: the position table's length; else None
    num_layers: int
    num_heads: int
    num_kv_heads: int                   # heads of the cache: the model's KV heads, or 1 for joint latents
    head_dim: int
    softmax_scale: float
    vocab_size: int
    ranks: list[list[int]]              # per layer [r_k, r_v]: the cache widths
    kv_ratio: float
    kv_bytes_per_token: int
    dtype: str                          # fp32 | fp16 | bf16: the export dtype (logits, and a float cache)
    opset: int
    inputs: list[dict]                  # {"name", "dtype", "shape": [int | dim name]}
    outputs: list[dict]
    kv_dtype: str | None = None         # int8 | int4 | mixed: the cache is codes + fp16 scales (kv_codec); None: `dtype`
    kv_layout: list | None = None       # mixed: per layer [key counts, value counts] of its 8/4/2-bit numbers
    export_seconds: float | None = None
    export_cpu_seconds: float | None = None
    format: str = IO_FORMAT
    version: int = IO_VERSION

    @property
    def cache_dtype(self) -> str:
        """The graph's float type: logits, and the cache unless it is quantized."""
        return self.outputs[0]["dtype"]

    def cache_layout(self) -> list[list[tuple[str, int, torch.dtype]]]:
        """Per layer, (name suffix, last dim, element type) of each cache tensor (kv_codec.cache_slots)."""
        float_type = dtype_of(self.cache_dtype).torch
        layout = self.kv_layout or [None] * len(self.ranks)
        return [cache_slots(int(k), int(v), self.kv_dtype, float_type, counts)
                for (k, v), counts in zip(self.ranks, layout)]

    def replace(self, **changes) -> "OnnxIO":
        return dataclasses.replace(self, **changes)

    def to_text(self) -> str:
        """io.json with one line per graph input/output, so that a person can read the contract at a glance."""
        data = dataclasses.asdict(self)
        lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in data.items() if k not in ("inputs", "outputs")]
        lines += [f' "{kind}": [\n' + ",\n".join("  " + json.dumps(e) for e in data[kind]) + "\n ]"
                  for kind in ("inputs", "outputs")]
        return "{\n" + ",\n".join(lines) + "\n}\n"

    def metadata(self) -> dict:
        """What goes into the graphs' metadata_props (everything but the I/O lists and the data file names)."""
        skip = ("inputs", "outputs", "external_data", "plugin_external_data", "export_seconds", "export_cpu_seconds")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def read_io(onnx_dir: str | Path) -> OnnxIO:
    path = Path(onnx_dir) / IO_JSON
    data = read_json_record(path, "run `eigen-export export` to make an ONNX export", REMAKE)
    check_format(data, path, IO_FORMAT, IO_VERSION, REMAKE)
    known = {f.name: f for f in fields(OnnxIO)}
    unknown = sorted(set(data) - set(known))
    missing = sorted(name for name, f in known.items() if name not in data and f.default is dataclasses.MISSING)
    if unknown or missing:
        raise EigenExportError(f"{path} has {f'unknown keys {unknown}' if unknown else f'no {missing}'}: {REMAKE}")
    return OnnxIO(**data)


def write_io(onnx_dir: Path, io: OnnxIO) -> None:
    (Path(onnx_dir) / IO_JSON).write_text(io.to_text())


def graph_io_from_file(path: Path) -> tuple[list[tuple], list[tuple]]:
    """[(name, element type, dims)] of the graph inputs and outputs, read from the ONNX file itself."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    names = {v: k for k, v in onnx.TensorProto.DataType.items()}

    def describe(value):
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        kind = names[t.elem_type].lower()
        return value.name, {"float": "float32", "float16": "float16"}.get(kind, kind), dims

    initializers = {i.name for i in graph.initializer}
    return ([describe(v) for v in graph.input if v.name not in initializers],
            [describe(v) for v in graph.output])


def check_io(io: OnnxIO, graph_io: tuple[list[tuple], list[tuple]], io_path: Path) -> None:
    """io.json must describe exactly the graph's inputs and outputs: names, order, types and dims."""
    for kind, described, actual in (("inputs", io.inputs, graph_io[0]), ("outputs", io.outputs, graph_io[1])):
        said = [e["name"] for e in described]
        has = [a[0] for a in actual]
        if said != has:
            missing = [n for n in said if n not in has] or [n for n in has if n not in said]
            raise EigenExportError(f"{io_path} says the {kind} are {_brief(said)} but the graph has {_brief(has)}"
                                   f"{f' (differs at {missing[0]})' if missing else ' (order differs)'}, "
                                   "re-run `eigen-export export`")
        for entry, (name, dtype, dims) in zip(described, actual):
            if entry["dtype"] != dtype or list(entry["shape"]) != list(dims):
                raise EigenExportError(f"{io_path} says {name} is {entry['dtype']} {list(entry['shape'])} but the "
                                       f"graph has {dtype} {list(dims)}, re-run `eigen-export export`")


def _brief(names: list[str]) -> str:
    return str(names) if len(names) <= 4 else f"[{names[0]}, {names[1]}, ... {names[-1]}] ({len(names)})"
