"""models/<name>.toml -> a frozen, validated Recipe (DESIGN 1). Unknown keys are typos: rejected."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import EigenExportError

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = REPO_ROOT / "models"
BUILTIN = {"builtin:smollm2-135m"}


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str
    family: str
    dtype: str = "float32"
    dataset: str = "ptb"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    kv_ratio: float | None = 0.7
    error_budget: float | None = None
    rope_mode: str = "pre"
    max_batch: int = 8
    max_context: int = 2048

    def __post_init__(self):
        if self.kv_ratio is not None and not 0 < self.kv_ratio <= 1:
            raise EigenExportError(f"recipe {self.name}: kv_ratio {self.kv_ratio} must lie in (0, 1]")
        if self.rope_mode not in ("pre", "post"):
            raise EigenExportError(f"recipe {self.name}: rope_mode must be 'pre' or 'post', got {self.rope_mode!r}")
        for key in ("nsamples", "seqlen", "max_batch", "max_context"):
            if getattr(self, key) < 1:
                raise EigenExportError(f"recipe {self.name}: {key} must be >= 1")

    def resolved_source(self) -> str:
        """A loadable path or hub id: built-in assets are materialised, repo-relative paths made absolute."""
        if self.source == "builtin:smollm2-135m":
            from .assets import smollm2_dir

            return str(smollm2_dir())
        local = REPO_ROOT / self.source
        return str(local) if not Path(self.source).is_absolute() and local.exists() else self.source


_TABLES = {"model": {"source", "family", "dtype"},
           "calibration": {"dataset", "nsamples", "seqlen", "seed"},
           "compress": {"kv_ratio", "error_budget", "rope_mode"},
           "engine": {"max_batch", "max_context"}}


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise EigenExportError(f"{path}: not valid TOML ({e})") from None
    flat = {}
    for table, values in data.items():
        if table not in _TABLES or not isinstance(values, dict):
            raise EigenExportError(f"{path}: unknown table [{table}]; known tables: {', '.join(_TABLES)}")
        unknown = sorted(set(values) - _TABLES[table])
        if unknown:
            raise EigenExportError(f"{path}: unknown key(s) {unknown} in [{table}]; "
                                   f"known: {', '.join(sorted(_TABLES[table]))}")
        flat |= values
    if "error_budget" in flat and "kv_ratio" not in flat:
        flat["kv_ratio"] = None
    for required in ("source", "family"):
        if required not in flat:
            raise EigenExportError(f"{path}: [model] needs '{required}'")
    types = {f.name: f.type for f in fields(Recipe)}
    return Recipe(name=path.stem, **{k: v for k, v in flat.items() if k in types})


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
