"""Where every stage's output lives (DESIGN 1): the one module that knows folder and file names.

    build/<name>/calib/   bases.safetensors, calib.json
                 folded/  config.json, model.safetensors, tokenizer, eigen.json
                 onnx/    model.onnx (+ .data), model_plugin.onnx, io.json
                 engine/  model.plan or model.onnx, io.json, build.json
                 report/  report.json, report.md, *.png
                 original/onnx/, original/engine/   the uncompressed model exported and built the same way
    build/.trt-timing-cache   shared by every TensorRT build under build/
Each stage writes its JSON record last: its presence marks a complete output.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CALIB_DIR, FOLDED_DIR, ONNX_DIR, ENGINE_DIR, REPORT_DIR = "calib", "folded", "onnx", "engine", "report"
BASELINE_DIR = "original"          # the uncompressed model's own export and engine, the report's baseline

BASES = "bases.safetensors"
CALIB_JSON = "calib.json"
MANIFEST = "eigen.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = WEIGHTS + ".index.json"     # sharded weights: transformers' index (weight_map: name -> shard)


def weights_shard(i: int, n: int) -> str:
    """transformers' shard name: model-00001-of-00003.safetensors for i = 0, n = 3."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"

HF_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
MERGE_JSON = "merge.json"
IO_JSON = "io.json"
MODEL_ONNX = "model.onnx"
MODEL_PLUGIN_ONNX = "model_plugin.onnx"
ONNX_DATA = MODEL_ONNX + ".data"
BUILD_JSON = "build.json"
PLAN = "model.plan"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
TIMING_CACHE = ".trt-timing-cache"


@dataclass(frozen=True)
class BuildLayout:
    """build/<name>/ and its stage directories."""
    root: Path

    @classmethod
    def of(cls, build_dir: str | Path, name: str) -> "BuildLayout":
        return cls(Path(build_dir) / name)

    @property
    def calib(self) -> Path:
        return self.root / CALIB_DIR

    @property
    def folded(self) -> Path:
        return self.root / FOLDED_DIR

    @property
    def onnx(self) -> Path:
        return self.root / ONNX_DIR

    @property
    def engine(self) -> Path:
        return self.root / ENGINE_DIR

    @property
    def report(self) -> Path:
        return self.root / REPORT_DIR

    @property
    def baseline_onnx(self) -> Path:
        return self.root / BASELINE_DIR / ONNX_DIR

    @property
    def baseline_engine(self) -> Path:
        return self.root / BASELINE_DIR / ENGINE_DIR


def is_folded(path: str | Path) -> bool:
    return (Path(str(path)) / MANIFEST).is_file()


def is_onnx_export(path: str | Path) -> bool:
    return (Path(str(path)) / IO_JSON).is_file()


def is_engine(path: str | Path) -> bool:
    return (Path(str(path)) / BUILD_JSON).is_file()


def default_onnx_dir(model_dir: str | Path) -> Path:
    """build/<name>/folded -> build/<name>/onnx; any other model directory -> <dir>/onnx."""
    model_dir = Path(model_dir)
    if is_folded(model_dir) and model_dir.name == FOLDED_DIR:
        return model_dir.parent / ONNX_DIR
    return model_dir / ONNX_DIR


def default_engine_dir(onnx_dir: str | Path) -> Path:
    """build/<name>/onnx -> build/<name>/engine."""
    return Path(onnx_dir).parent / ENGINE_DIR


def timing_cache_path(engine_dir: str | Path) -> Path:
    """build/<name>/engine -> build/.trt-timing-cache: one cache for every model built under build/."""
    return Path(engine_dir).resolve().parent.parent / TIMING_CACHE


def onnx_dir_candidates(path: str | Path) -> list[Path]:
    """Where the ONNX export belonging to PATH may be: PATH itself, PATH/onnx, or onnx/ beside folded/."""
    path = Path(path)
    return [path, path / ONNX_DIR, default_onnx_dir(path)]


def folded_of(path: str | Path) -> Path:
    """A build/<name> directory -> its folded/; any other path is itself."""
    path = Path(path)
    return path / FOLDED_DIR if is_folded(path / FOLDED_DIR) else path


def engine_of(path: str | Path) -> Path:
    """A build/<name> directory -> its engine/; any other path is itself."""
    path = Path(path)
    return path / ENGINE_DIR if is_engine(path / ENGINE_DIR) else path
