"""Every setting of every stage: one frozen dataclass per stage, one default and one validation per setting,
checked when the object is made, before any work starts (STYLE: one settings object per workflow).

A Recipe (models/<name>.toml) composes them; the CLI maps its flags onto them in one place (cli.py); the
stage records store them, so a later run can tell whether an output was made with the settings asked for.
Unknown recipe tables or keys are typos: rejected.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from eigen_export_plugins.lowrank_attention.kv_codec import KV_DTYPES

from .assets import smollm2_dir
from .dtypes import EXPORT_NAMES, FLOAT_NAMES
from .errors import EigenExportError
from .families import REGISTRY
from .method.calibrate import BASES, joint_fittable
from .method.fold import ALLOCATIONS
from .method.merge import check_method
from .modeling import LATENTS, ROPE_MODES

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = REPO_ROOT / "models"
BUILTIN_SMOLLM2 = "builtin:smollm2-135m"
DEVICES = ("auto", "cpu", "cuda")
ENGINE_CHOICES = ("auto", "tensorrt", "onnxruntime")
MIN_OPSET = 18
# 23 brings RotaryEmbedding, which `pre` mode's key rotation exports as (backends/onnx_export.py)
DEFAULT_OPSET = 23


# Messages name the setting as recipes spell it (the flag is the same name with dashes).
def _at_least(owner, low: int, *names: str, why: str = "") -> None:
    for name in names:
        value = getattr(owner, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise EigenExportError(f"{name} must be an integer >= {low}{why}, got {value!r}")


def _one_of(owner, name: str, allowed) -> None:
    if getattr(owner, name) not in allowed:
        raise EigenExportError(f"{name} {getattr(owner, name)!r} is not one of {', '.join(map(str, allowed))}")


def _device(owner) -> None:
    value = owner.device
    if value not in DEVICES and not value.startswith("cuda:"):
        raise EigenExportError(f"device {value!r} is not one of {', '.join(DEVICES)} (or cuda:N)")


@dataclass(frozen=True)
class CalibrationSettings:
    """`calibrate`: which text, how much of it, and which bases to fit."""
    dataset: str = "ptb"                   # ptb | pycode | wikitext2 | c4 | path/to/file.txt | a+b (a mix)
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    rope_mode: str = "pre"                 # RoPE models: basis before (paper) or after rotation
    basis: str = "loss"                    # loss: bases that keep the loss; energy: the paper's eigenbases
    grad_samples: int = 16                 # samples the loss gradients are measured on (the backward pass)
    rope_positions: int | None = None      # post mode: positions the key basis serves (None: the max context;
                                           # 0: only the calibration windows' positions)
    dtype: str = "float32"
    batch_size: int = 4
    error_samples: int = 0                 # samples for the block-error curves (--allocation error needs them)
    rank_multiple: int = 1                 # GPU recipes: 16, so cache rows stay 16-byte aligned for the kernel
    latents: str = "auto"                  # heads: a basis per KV head; joint: one per layer over all KV heads;
                                           # auto: joint where it fits (method.calibrate.choose_latents)

    def __post_init__(self):
        _at_least(self, 1, "nsamples", "batch_size", "rank_multiple", "grad_samples")
        _one_of(self, "latents", ("auto", *LATENTS))
        if self.latents == "joint" and not joint_fittable(self.rope_mode, self.basis, self.error_samples):
            raise EigenExportError("--latents joint takes the loss basis, --rope-mode pre and no error curves "
                                   f"(got basis {self.basis}, rope mode {self.rope_mode}, {self.error_samples} "
                                   "error samples)")
        _at_least(self, 0, "error_samples")
        if self.rope_positions is not None:
            _at_least(self, 0, "rope_positions", why=" (0: the calibration positions; unset: the max context)")
        _at_least(self, 2, "seqlen")
        _one_of(self, "rope_mode", ROPE_MODES)
        _one_of(self, "basis", BASES)
        _one_of(self, "dtype", FLOAT_NAMES)

    def record(self) -> dict:
        """What calib.json records and a later run compares (the batch size changes no number)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "batch_size"}


@dataclass(frozen=True)
class FoldSettings:
    """`fold`: the KV budget (exactly one of kv_ratio and error_budget) and how ranks are spread over layers."""
    kv_ratio: float | None = 0.7           # fraction of the original KV cache to keep
    error_budget: float | None = None      # per-layer relative block-output error budget instead
    allocation: str = "loss"               # loss: cheapest calibrated loss; energy: one energy threshold;
                                           # error / update_error: calibrated block error (needs error_samples)
    dtype: str = "float32"
    kv_dtype: str | None = None            # int8 | int4 | mixed: quantize the latent cache (kv_codec); None: the
                                           # model's dtype
    kv_rotation: bool = True               # with kv_dtype: fold an incoherent rotation into the bases first
    kv_bits: float | None = None           # mixed: mean bits per cached latent number (8, 4 or 2 each); None: 4

    def __post_init__(self):
        if (self.kv_ratio is None) == (self.error_budget is None):
            raise EigenExportError("give exactly one of kv_ratio (--kv-ratio) or error_budget (--error-budget)")
        if self.kv_ratio is not None and not (isinstance(self.kv_ratio, (int, float)) and 0 < self.kv_ratio <= 1):
            raise EigenExportError(f"kv_ratio {self.kv_ratio} is outside (0, 1]: it is the fraction of the "
                                   "original KV cache to keep, e.g. 0.7")
        budget = self.error_budget
        if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
            raise EigenExportError(f"error_budget {self.error_budget} must be positive (e.g. 0.02)")
        _one_of(self, "allocation", ALLOCATIONS)
        _one_of(self, "dtype", FLOAT_NAMES)
        _one_of(self, "kv_dtype", (None, *KV_DTYPES))
        if self.kv_bits is not None and self.kv_dtype != "mixed":
            raise EigenExportError(f"kv_bits applies to a mixed cache only, not to kv_dtype {self.kv_dtype}: pass "
                                   "--kv-dtype mixed or drop --kv-bits")
        if self.kv_dtype in ("int4", "mixed") and not self.kv_rotation:
            raise EigenExportError(f"--no-kv-rotation works with --kv-dtype int8 only: {self.kv_dtype} codes are "
                                   "mid-rise (no zero level) and need the rotation to spread each vector's energy "
                                   "(unrotated int4 at KV 0.7 took SmolLM2 to perplexity 67349); drop the flag")
        if not (isinstance(self.mean_bits, (int, float)) and 2 <= self.mean_bits <= 8):
            raise EigenExportError(f"kv_bits {self.kv_bits} is outside [2, 8]: the mean bits per cached number of a "
                                   "mixed cache, e.g. 4")

    @property
    def mean_bits(self) -> float:
        """A mixed cache's mean bits per cached number (kv_bits, default 4: the bytes of int4)."""
        return 4.0 if self.kv_bits is None else self.kv_bits

    @property
    def rotated(self) -> bool:
        """Whether the fold turns the latents by decompose.incoherent_rotation (only a quantized cache gains)."""
        return self.kv_dtype is not None and self.kv_rotation

    @classmethod
    def target(cls, kv_ratio: float | None = None, error_budget: float | None = None, **rest) -> "FoldSettings":
        """The default kv_ratio applies only where neither budget is given."""
        if kv_ratio is None and error_budget is None:
            return cls(**rest)
        return cls(kv_ratio=kv_ratio, error_budget=error_budget, **rest)

    def allocation_record(self) -> dict:
        """The rule eigen.json records; a fold is current when its record repeats it."""
        if self.error_budget is not None:
            rule = {"rule": "error_budget", "error_budget": self.error_budget}
        else:
            rule = {"rule": "kv_ratio", "target": self.kv_ratio, "allocation": self.allocation}
        return rule | {"kv_dtype": self.kv_dtype, "kv_rotation": self.rotated} | \
            ({"kv_bits": self.mean_bits} if self.kv_dtype == "mixed" else {})


@dataclass(frozen=True)
class MergeSettings:
    """`merge-heads`: the KV head count to merge to, the method, and the calibration text of the group caches."""
    kv_heads: int
    method: str = "svd"                    # svd: eigenvectors of the group caches; mean: mean-pool baseline
    dataset: str = "ptb"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 4
    dtype: str = "float32"

    def __post_init__(self):
        _at_least(self, 1, "kv_heads", "nsamples", "batch_size")
        _at_least(self, 2, "seqlen")
        check_method(self.method)
        _one_of(self, "dtype", FLOAT_NAMES)


@dataclass(frozen=True)
class ExportSettings:
    """`export`: the graphs' dtype and opset, and whether to write the plugin graph too."""
    dtype: str = "fp32"                    # fp16/bf16 keep softmax and norms in fp32
    opset: int = DEFAULT_OPSET
    plugin: bool = True
    # weights in model.onnx.data: saved tensor by tensor and shared by the plugin graph. Inline (False) or
    # size-decided (None) graphs are serialised whole in memory, twice the weights for a moment.
    external_data: bool | None = True

    def __post_init__(self):
        _one_of(self, "dtype", EXPORT_NAMES)
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or self.opset < MIN_OPSET:
            raise EigenExportError(f"opset {self.opset} is below {MIN_OPSET}, the lowest this export supports "
                                   "(DESIGN 5)")


@dataclass(frozen=True)
class BuildSettings:
    """`build`: which engine and the largest batch and context it serves."""
    backend: str = "auto"                  # auto: TensorRT where installed with a GPU, else ONNX Runtime
    max_batch: int = 8
    max_context: int = 4096                # past + new tokens

    def __post_init__(self):
        _one_of(self, "backend", ENGINE_CHOICES)
        _at_least(self, 1, "max_batch")
        _at_least(self, 2, "max_context", why=" (decode needs one cached token plus the new one)")


@dataclass(frozen=True)
class ValidationSettings:
    """What `validate` measures and the limits each check must hold (DESIGN 8). Ratios compare the folded
    model with the original; `backend_*` compare a backend (ONNX Runtime, TensorRT) with the folded model."""
    dataset: str = "ptb"
    windows: int = 8                       # held-out windows for perplexity, top-1 and KL
    seqlen: int = 512
    long_windows: int = 2                  # windows as long as the engine's max_context (a basis that only
                                           # holds up to its calibration length fails there)
    continuation_prompts: int = 4          # greedy continuations of real-text prompts, folded vs original
    prompt_tokens: int = 32
    continuation_tokens: int = 64
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
    min_continuation_prefix: float = 4.0   # mean length of the greedy continuation both models agree on (tokens)
    max_top1_drop: float = 0.05            # next-token accuracy on the held-out text: original minus folded
    # layer 2: backend vs folded PyTorch (fp32 defaults; fp16 engines need looser ones)
    backend_max_abs: float = 1e-3          # logits
    backend_min_cosine: float = 0.9999
    backend_min_top1: float = 0.999
    backend_max_kl: float = 1e-4
    backend_present_max_abs: float = 1e-3
    backend_min_greedy: float = 1.0        # fraction of greedy tokens equal to PyTorch's

    def __post_init__(self):
        for key in ("windows", "seqlen", "long_windows", "continuation_prompts", "prompt_tokens",
                    "continuation_tokens", "generate_steps", "latency_repeats", "decode_steps"):
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
        if self.min_continuation_prefix > self.continuation_tokens:
            raise EigenExportError(f"[validate] min_continuation_prefix {self.min_continuation_prefix} is more than "
                                   f"the {self.continuation_tokens} continuation_tokens")
        for key in ("max_ppl_ratio", "max_kl", "max_layer_error", "min_continuation_prefix", "max_top1_drop",
                    "backend_max_abs", "backend_max_kl", "backend_present_max_abs"):
            if getattr(self, key) < 0:
                raise EigenExportError(f"[validate] {key} must be >= 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class Recipe:
    """A model and the settings of every stage that work for it."""
    name: str
    source: str
    family: str
    device: str = "auto"
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    fold: FoldSettings = field(default_factory=FoldSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    build: BuildSettings = field(default_factory=BuildSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)

    def __post_init__(self):
        families = ("auto", *sorted({a.family for a in REGISTRY.values()}))
        if self.family not in families:
            raise EigenExportError(f"family = {self.family!r} is not one of {', '.join(families)}")
        _device(self)

    def resolved_source(self) -> str:
        """A loadable path or hub id: built-in assets are materialised, repo-relative paths made absolute."""
        if self.source == BUILTIN_SMOLLM2:
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


# recipe table -> (Recipe field, {recipe key: settings field}); [model] keys are Recipe's own
_TABLES = {
    "model": (None, {"source": "source", "family": "family", "device": "device", "dtype": "dtype"}),
    "calibration": ("calibration", {"dataset": "dataset", "nsamples": "nsamples", "seqlen": "seqlen", "seed": "seed",
                                    "rank_multiple": "rank_multiple"}),
    "compress": (None, {"kv_ratio": "kv_ratio", "error_budget": "error_budget", "rope_mode": "rope_mode",
                        "latents": "latents",
                        "allocation": "allocation", "kv_dtype": "kv_dtype", "kv_rotation": "kv_rotation",
                        "kv_bits": "kv_bits"}),
    "engine": (None, {"max_batch": "max_batch", "max_context": "max_context", "onnx_dtype": "onnx_dtype",
                      "backend": "backend"}),
    "validate": ("validation", {f.name: f.name for f in fields(ValidationSettings)}),
}


def recipe_from_tables(name: str, data: dict) -> Recipe:
    """A Recipe from the parsed TOML tables; every value is checked by the settings it lands in."""
    values = {}
    for table, entries in data.items():
        if table not in _TABLES or not isinstance(entries, dict):
            raise EigenExportError(f"unknown table [{table}]; known tables: {', '.join(_TABLES)}")
        unknown = sorted(set(entries) - set(_TABLES[table][1]))
        if unknown:
            known = ", ".join(sorted(_TABLES[table][1]))
            raise EigenExportError(f"unknown key(s) {unknown} in [{table}]; known: {known}")
        values[table] = entries
    model, compress, engine = (values.get(t, {}) for t in ("model", "compress", "engine"))
    for required in ("source", "family"):
        if required not in model:
            raise EigenExportError(f"[model] needs '{required}'")
    dtype = model.get("dtype", "float32")
    calibration = {**values.get("calibration", {}), "dtype": dtype,
                   **{k: compress[k] for k in ("rope_mode", "latents") if k in compress}}
    validation = {k: tuple(v) if isinstance(v, list) else v for k, v in values.get("validate", {}).items()}
    try:
        return Recipe(
            name=name, source=model["source"], family=model["family"], device=model.get("device", "auto"),
            calibration=CalibrationSettings(**calibration),
            fold=FoldSettings.target(compress.get("kv_ratio"), compress.get("error_budget"), dtype=dtype,
                                     **{k: compress[k] for k in ("allocation", "kv_dtype", "kv_rotation", "kv_bits")
                                        if k in compress}),
            export=ExportSettings(**({"dtype": engine["onnx_dtype"]} if "onnx_dtype" in engine else {})),
            build=BuildSettings(**{k: engine[k] for k in ("backend", "max_batch", "max_context") if k in engine}),
            validation=ValidationSettings(**validation))
    except TypeError as e:      # a wrong value type (a string where a number belongs) surfaces here
        raise EigenExportError(f"a value has the wrong type ({e})") from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise EigenExportError(f"recipe {path} not found: recipes live in models/<name>.toml") from None
    except tomllib.TOMLDecodeError as e:
        raise EigenExportError(f"{path}: not valid TOML ({e})") from None
    try:
        return recipe_from_tables(path.stem, data)
    except EigenExportError as e:
        raise EigenExportError(f"{path}: {e}") from None


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


def override(settings, assignments: list[str]):
    """--set key=value on a frozen settings dataclass; values are parsed as the field's current type."""
    known = {f.name: getattr(settings, f.name) for f in fields(settings)}
    changes = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep or key not in known:
            raise EigenExportError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(known)}")
        current = known[key]
        try:
            if isinstance(current, tuple):
                changes[key] = tuple(type(current[0] if current else 0.0)(v) for v in text.split(",") if v)
            else:
                changes[key] = type(current)(text)
        except ValueError:
            raise EigenExportError(f"--set {item!r}: {text!r} is not a {type(current).__name__}") from None
    return dataclasses.replace(settings, **changes)
