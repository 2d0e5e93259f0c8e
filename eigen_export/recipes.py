"""models/<name>.toml -> a frozen, validated Recipe (DESIGN 1). Unknown keys are typos: rejected."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import EigenExportError

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = REPO_ROOT / "models"
BUILTIN = {"builtin:smollm2-135m"}


@dataclass(frozen=True)
class ValidationSettings:
    """What `validate` measures and the limits each check must hold (DESIGN 8). Ratios compare the folded
    model with the original; `backend_*` compare a backend (ONNX Runtime, TensorRT) with the folded model."""
    dataset: str = "ptb"
    windows: int = 8                       # held-out windows for perplexity, top-1 and KL
    seqlen: int = 512
    generate_steps: int = 16               # greedy tokens compared between a backend and PyTorch
    sweep: tuple[float, ...] = ()          # extra KV ratios folded in memory for the perplexity-vs-ratio plot
    latency_contexts: tuple[int, ...] = (128, 512)
    latency_batches: tuple[int, ...] = (1, 4)
    latency_repeats: int = 5               # timed prefills per point (after one warm-up)
    decode_steps: int = 16                 # timed decode steps per point (after two warm-up steps)
    # layer 1: folded vs original
    max_ppl_ratio: float = 1.6             # folded perplexity / original perplexity
    min_top1: float = 0.6                  # next-token argmax agreement with the original
    max_kl: float = 0.6                    # mean KL(original || folded) per token, nats
    max_layer_error: float = 0.6           # relative error of any layer's output hidden state
    # layer 2: backend vs folded PyTorch (fp32 defaults; fp16 engines need looser ones)
    backend_max_abs: float = 1e-3          # logits
    backend_min_cosine: float = 0.9999
    backend_min_top1: float = 0.999
    backend_max_kl: float = 1e-4
    backend_present_max_abs: float = 1e-3
    backend_min_greedy: float = 1.0        # fraction of greedy tokens equal to PyTorch's

    def __post_init__(self):
        for key in ("windows", "seqlen", "generate_steps", "latency_repeats", "decode_steps"):
            if getattr(self, key) < 1:
                raise EigenExportError(f"[validate] {key} must be >= 1, got {getattr(self, key)}")
        for key in ("latency_contexts", "latency_batches"):
            values = getattr(self, key)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise EigenExportError(f"[validate] {key} must be a non-empty list of positive integers")
        if any(not 0 < r < 1 for r in self.sweep):
            raise EigenExportError(f"[validate] sweep ratios must lie in (0, 1), got {list(self.sweep)}")
        for key in ("min_top1", "backend_min_top1", "backend_min_greedy", "backend_min_cosine"):
            if not 0 <= getattr(self, key) <= 1:
                raise EigenExportError(f"[validate] {key} must lie in [0, 1], got {getattr(self, key)}")
        for key in ("max_ppl_ratio", "max_kl", "max_layer_error", "backend_max_abs", "backend_max_kl",
                    "backend_present_max_abs"):
            if getattr(self, key) < 0:
                raise EigenExportError(f"[validate] {key} must be >= 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str
    family: str
    dtype: str = "float32"
    device: str = "auto"                   # auto: CUDA when torch sees a GPU, else CPU
    dataset: str = "ptb"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    rank_multiple: int = 1                 # GPU recipes: 16, so cache rows stay 16-byte aligned for the kernel
    kv_ratio: float | None = 0.7
    error_budget: float | None = None
    rope_mode: str = "pre"
    max_batch: int = 8
    max_context: int = 2048
    onnx_dtype: str = "fp32"
    backend: str = "auto"                  # auto: TensorRT where installed with a GPU, else ONNX Runtime
    validation: ValidationSettings = field(default_factory=ValidationSettings)

    def __post_init__(self):
        if self.kv_ratio is not None and not 0 < self.kv_ratio <= 1:
            raise EigenExportError(f"recipe {self.name}: kv_ratio {self.kv_ratio} must lie in (0, 1]")
        if (self.kv_ratio is None) == (self.error_budget is None):
            raise EigenExportError(f"recipe {self.name}: give exactly one of [compress] kv_ratio or error_budget")
        if self.error_budget is not None and self.error_budget <= 0:
            raise EigenExportError(f"recipe {self.name}: error_budget must be > 0")
        if self.rope_mode not in ("pre", "post"):
            raise EigenExportError(f"recipe {self.name}: rope_mode must be 'pre' or 'post', got {self.rope_mode!r}")
        for key in ("nsamples", "seqlen", "rank_multiple", "max_batch", "max_context"):
            if getattr(self, key) < 1:
                raise EigenExportError(f"recipe {self.name}: {key} must be >= 1")
        from .families import REGISTRY

        choices = {"family": ("auto", *sorted({a.family for a in REGISTRY.values()})), "dtype": ("float32", "float16", "bfloat16"),
                   "device": ("auto", "cpu", "cuda"), "onnx_dtype": ("fp32", "fp16", "bf16"),
                   "backend": ("auto", "tensorrt", "onnxruntime")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise EigenExportError(f"recipe {self.name}: {key} = {getattr(self, key)!r} is not one of "
                                       f"{', '.join(allowed)}")

    def resolved_source(self) -> str:
        """A loadable path or hub id: built-in assets are materialised, repo-relative paths made absolute."""
        if self.source == "builtin:smollm2-135m":
            from .assets import smollm2_dir

            return str(smollm2_dir())
        local = REPO_ROOT / self.source
        return str(local) if not Path(self.source).is_absolute() and local.exists() else self.source

    def resolved_device(self) -> str:
        return resolve_device(self.device)


def resolve_device(device: str) -> str:
    """auto: CUDA when torch sees a GPU, else CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_TABLES = {"model": {"source", "family", "dtype", "device"},
           "calibration": {"dataset", "nsamples", "seqlen", "seed", "rank_multiple"},
           "compress": {"kv_ratio", "error_budget", "rope_mode"},
           "engine": {"max_batch", "max_context", "onnx_dtype", "backend"},
           "validate": {f.name for f in fields(ValidationSettings)}}


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise EigenExportError(f"recipe {path} not found: recipes live in models/<name>.toml") from None
    except tomllib.TOMLDecodeError as e:
        raise EigenExportError(f"{path}: not valid TOML ({e})") from None
    flat, validation = {}, {}
    for table, values in data.items():
        if table not in _TABLES or not isinstance(values, dict):
            raise EigenExportError(f"{path}: unknown table [{table}]; known tables: {', '.join(_TABLES)}")
        unknown = sorted(set(values) - _TABLES[table])
        if unknown:
            raise EigenExportError(f"{path}: unknown key(s) {unknown} in [{table}]; "
                                   f"known: {', '.join(sorted(_TABLES[table]))}")
        (validation if table == "validate" else flat).update(values)
    if "error_budget" in flat and "kv_ratio" not in flat:
        flat["kv_ratio"] = None
    for required in ("source", "family"):
        if required not in flat:
            raise EigenExportError(f"{path}: [model] needs '{required}'")
    try:
        settings = ValidationSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in validation.items()})
        return Recipe(name=path.stem, validation=settings, **flat)
    except EigenExportError as e:
        raise EigenExportError(f"{path}: {e}") from None
    except TypeError as e:      # a wrong value type (a string where a number belongs) surfaces here
        raise EigenExportError(f"{path}: a value has the wrong type ({e})") from None


def find_recipe(name: str) -> Recipe | None:
    """The recipe called `name` (models/<name>.toml) or a .toml path; None for a model path or hub id."""
    if name.endswith(".toml"):
        return load_recipe(name)
    candidate = RECIPES_DIR / f"{name}.toml"
    return load_recipe(candidate) if candidate.exists() else None


def resolve_model(name: str) -> str:
    """MODEL as the user wrote it -> a loadable source (recipe name, local directory or hub id)."""
    recipe = find_recipe(name)
    return recipe.resolved_source() if recipe else name
