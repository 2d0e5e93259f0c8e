"""`make engine MODEL=...`: calibrate -> fold -> export -> build -> validate (DESIGN 1).

Each stage decides for itself whether its output is current (stages/common.must_make: its record holds the
requested settings and its inputs' hashes) and skips when it is; the pipeline owns build/<name>/ and lets
every stage replace what a change upstream made stale. Each stage runs in its own process (`isolated`).
"""
from __future__ import annotations

import logging
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable

from .artifacts.layout import REPORT_MD, BuildLayout
from .errors import EigenExportError
from .families import spec_from_config
from .loading import load_hf_config
from .machine import return_freed_memory
from .settings import Recipe, find_recipe
from .stages.build import run_build
from .stages.calibrate import run_calibrate
from .stages.export import run_export
from .stages.fold import run_fold
from .stages.validate import run_validate

log = logging.getLogger("eigen_export")


def recipe_for(model: str) -> Recipe:
    """A recipe name (models/<name>.toml or a .toml path) or a local model directory with default settings."""
    recipe = find_recipe(model)
    if recipe is not None:
        return recipe
    if not Path(model).is_dir():
        raise EigenExportError(f"{model!r} is neither a recipe in models/*.toml nor a local model directory: "
                               "pick a recipe name (e.g. smollm2-135m) or pass a directory")
    return Recipe(name=Path(model).resolve().name, source=str(Path(model).resolve()), family="auto")


def check_family(recipe: Recipe, source: str) -> None:
    """A recipe says which family it expects: a hub id that now points elsewhere fails here, not mid-fold."""
    if recipe.family != "auto":
        family = spec_from_config(load_hf_config(source)).family
        if family != recipe.family:
            raise EigenExportError(f"recipe {recipe.name} says family {recipe.family!r} but {source} is a "
                                   f"{family!r} model: fix [model] family or source in the recipe")


def isolated(stage: Callable, *args, **kwargs):
    """stage(*args, **kwargs) in a process of its own; its result, or its error raised here.

    What a stage imports and leaves allocated goes with its process (torch.onnx's exporter alone kept 0.5 GB
    of modules and caches under every later stage), so make engine's peak is that of its largest stage plus
    this process (and, on Linux, the server it forks from: `_stage_context`), not their sum."""
    level = logging.getLogger().getEffectiveLevel()
    with ProcessPoolExecutor(max_workers=1, mp_context=_stage_context(), initializer=_child,
                             initargs=(level,)) as pool:
        try:
            return pool.submit(stage, *args, **kwargs).result()
        except BrokenProcessPool:
            raise EigenExportError(f"the process running {stage.__name__} died (out of memory?): its output was "
                                   "not completed; run the stage alone to see why") from None


_STAGE_MODULES = [f"eigen_export.stages.{name}" for name in ("calibrate", "fold", "export", "build", "validate")]


def _stage_context():
    """On Linux a forkserver: it imports the stages (torch, transformers) once and every stage process forks from
    it, a fresh address space without the 2-5 s import (a stage that found its output current was all import).
    The server never runs a stage, so it holds no CUDA context to fork. Elsewhere spawn (macOS frameworks do not
    survive a fork)."""
    if not sys.platform.startswith("linux"):
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_STAGE_MODULES)
    return context


def _child(level: int) -> None:
    logging.basicConfig(level=level, format="%(message)s")
    return_freed_memory()


def run_engine(model: str, build_dir: Path = Path("build"), force: bool = False, device: str | None = None,
               baseline: bool = True) -> int:
    """Every stage for one recipe; returns 0 when the parity report passes, 1 when a check fails.

    baseline: also export and build the uncompressed model the same way (build/<name>/original/), so that the
    report compares engine with engine; False saves its disk (one more copy of the weights) and time."""
    recipe = recipe_for(model)
    source = recipe.resolved_source()
    device = device or recipe.resolved_device()
    check_family(recipe, source)
    layout = BuildLayout.of(build_dir, recipe.name)
    stale = dict(force=force, replace_stale=True)
    calib = recipe.calibration
    log.info("[calibrate] %s on %s (%d x %d tokens)", recipe.name, calib.dataset, calib.nsamples, calib.seqlen)
    isolated(run_calibrate, source, layout.calib, calib, device=device, **stale)
    manifest = isolated(run_fold, source, layout.calib, layout.folded, recipe.fold, **stale)
    log.info("[fold] KV ratio %.3f -> %s", manifest.kv_ratio, layout.folded)
    isolated(run_export, layout.folded, recipe.export, layout.onnx, **stale)
    log.info("[export] %s", layout.onnx)
    isolated(run_build, layout.onnx, recipe.build, layout.engine, **stale)
    log.info("[build] %s", layout.engine)
    if baseline:
        isolated(run_export, source, recipe.export, layout.baseline_onnx, **stale)
        isolated(run_build, layout.baseline_onnx, recipe.build, layout.baseline_engine, **stale)
        log.info("[build] baseline (uncompressed) %s", layout.baseline_engine)
    report = isolated(run_validate, layout.root, recipe.validation, layout.report, device=device, **stale)
    print(f"{recipe.name}: KV ratio {report['compression']['kv_ratio']:.3f}, "
          f"{recipe.validation.dataset} perplexity {report['accuracy']['perplexity_original']:.2f} -> "
          f"{report['accuracy']['perplexity_folded']:.2f}; engine: {report['engine']['backend']}; "
          f"parity report {report['verdict'].upper()} ({report['passed']} passed, {report['failed']} failed"
          f"{', ' + str(len(report['skipped'])) + ' skipped' if report['skipped'] else ''}): "
          f"{layout.report / REPORT_MD}")
    return 0 if report["verdict"] == "pass" else 1
