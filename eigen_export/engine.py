"""`make engine MODEL=...`: calibrate -> fold -> export -> build -> validate (DESIGN 1), skipping every stage
whose output is complete and was made from the current inputs with the current settings."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .errors import EigenExportError
from .recipes import Recipe, find_recipe

log = logging.getLogger("eigen_export")


def _recipe_for(model: str) -> Recipe:
    recipe = find_recipe(model)
    if recipe is not None:
        return recipe
    if not Path(model).is_dir():
        raise EigenExportError(f"{model!r} is neither a recipe in models/*.toml nor a local model directory: "
                               "pick a recipe name (e.g. smollm2-135m) or pass a directory")
    return Recipe(name=Path(model).resolve().name, source=str(Path(model).resolve()), family="auto")


def _record(path: Path) -> dict:
    """A stage's JSON record, or {} where it is missing or unreadable (the stage then runs again)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _repeats(record: dict, wanted: dict) -> bool:
    """An output is current when its record repeats every setting we would use now."""
    return bool(record) and all(record.get(k) == v for k, v in wanted.items())


def _check_family(recipe: Recipe, source: str) -> None:
    """A recipe says which family it expects: a hub id that now points elsewhere fails here, not mid-fold."""
    from .families import spec_from_config
    from .loading import load_hf_config

    if recipe.family != "auto":
        family = spec_from_config(load_hf_config(source)).family
        if family != recipe.family:
            raise EigenExportError(f"recipe {recipe.name} says family {recipe.family!r} but {source} is a "
                                   f"{family!r} model: fix [model] family or source in the recipe")


def run_engine(model: str, build_dir: Path = Path("build"), force: bool = False, device: str | None = None) -> int:
    """Every stage for one recipe; returns 0 when the parity report passes, 1 when a check fails."""
    from .build import build
    from .calibrate import CALIB_JSON, run_calibrate
    from .export import export_onnx
    from .fold import MANIFEST, run_fold
    from .validate import current_report, validate

    recipe = _recipe_for(model)
    source = recipe.resolved_source()
    device = device or recipe.resolved_device()
    _check_family(recipe, source)
    root = build_dir / recipe.name
    calib_settings = dict(source=source, dataset=recipe.dataset, nsamples=recipe.nsamples, seqlen=recipe.seqlen,
                          seed=recipe.seed, dtype=recipe.dtype, rank_multiple=recipe.rank_multiple)
    calib = _record(root / "calib" / CALIB_JSON)
    # non-RoPE calibrations record rope_mode None: any recipe rope_mode fits them
    calib_current = _repeats(calib, calib_settings) and calib.get("rope_mode") in (None, recipe.rope_mode)
    if force or not calib_current:
        log.info("[calibrate] %s on %s (%d x %d tokens)", recipe.name, recipe.dataset, recipe.nsamples,
                 recipe.seqlen)
        run_calibrate(source, root / "calib", dataset=recipe.dataset, nsamples=recipe.nsamples,
                      seqlen=recipe.seqlen, seed=recipe.seed, rope_mode=recipe.rope_mode, dtype=recipe.dtype,
                      rank_multiple=recipe.rank_multiple, device=device, force=True)
    else:
        log.info("[calibrate] skipped: %s is current", root / "calib")
    manifest_path = root / "folded" / MANIFEST
    calib_mtime = (root / "calib" / CALIB_JSON).stat().st_mtime
    folded = _record(manifest_path)
    folded_current = _repeats(folded, {"source": source}) and manifest_path.stat().st_mtime >= calib_mtime and \
        _fold_target_matches(folded, recipe)
    if force or not folded_current:
        manifest = run_fold(source, root / "calib", root / "folded", recipe.kv_ratio, recipe.error_budget,
                            dtype=recipe.dtype, force=True)
        log.info("[fold] KV ratio %.3f -> %s", manifest.kv_ratio, root / "folded")
    else:
        log.info("[fold] skipped: %s is current", root / "folded")
    # export and build skip themselves when current: their records carry their input's hash
    onnx_dir = export_onnx(root / "folded", root / "onnx", dtype=recipe.onnx_dtype, force=force, replace_stale=True)
    log.info("[export] %s", onnx_dir)
    engine_dir = build(onnx_dir, root / "engine", backend=recipe.backend, max_batch=recipe.max_batch,
                       max_context=recipe.max_context, force=force, replace_stale=True)
    log.info("[build] %s", engine_dir)
    report = None if force else current_report(root, recipe.validation)
    if report is None:
        report = validate(root, recipe.validation, device=device, force=True)
    else:
        log.info("[validate] skipped: %s is current", root / "report")
    print(f"{recipe.name}: KV ratio {report['compression']['kv_ratio']:.3f}, "
          f"{recipe.validation.dataset} perplexity {report['accuracy']['perplexity_original']:.2f} -> "
          f"{report['accuracy']['perplexity_folded']:.2f}; engine: {report['engine']['backend']}; "
          f"parity report {report['verdict'].upper()} ({report['passed']} passed, {report['failed']} failed"
          f"{', ' + str(len(report['skipped'])) + ' skipped' if report['skipped'] else ''}): "
          f"{root / 'report' / 'report.md'}")
    return 0 if report["verdict"] == "pass" else 1


def _fold_target_matches(manifest: dict, recipe: Recipe) -> bool:
    """The fold records the rule it was asked for; a recipe whose kv_ratio or error budget changed refolds."""
    record = manifest.get("calibration", {}).get("allocation", {})
    if recipe.error_budget is not None:
        return record.get("rule") == "error_budget" and record.get("error_budget") == recipe.error_budget
    return record.get("rule") == "kv_ratio" and record.get("target") == recipe.kv_ratio
