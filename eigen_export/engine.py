"""`make engine MODEL=...`: run every stage that exists, skipping those whose outputs are current."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .errors import EigenExportError
from .recipes import Recipe, find_recipe

log = logging.getLogger("eigen_export")

# Stages of DESIGN 1 that are not built yet; the engine says so instead of pretending.
PENDING = ("build (TensorRT engine)", "validate (parity report)")


def _recipe_for(model: str) -> Recipe:
    recipe = find_recipe(model)
    if recipe is not None:
        return recipe
    if not Path(model).is_dir():
        raise EigenExportError(f"{model!r} is neither a recipe in models/*.toml nor a local model directory: "
                               "pick a recipe name (e.g. smollm2-135m) or pass a directory")
    return Recipe(name=Path(model).resolve().name, source=str(Path(model).resolve()), family="auto")


def _current(path: Path, wanted: dict) -> bool:
    """An output is current when its record exists and repeats every setting we would use now."""
    if not path.exists():
        return False
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return all(record.get(k) == v for k, v in wanted.items())


def run_engine(model: str, build_dir: Path = Path("build"), force: bool = False, device: str = "cpu") -> int:
    from .calibrate import CALIB_JSON, run_calibrate
    from .fold import MANIFEST, run_fold

    recipe = _recipe_for(model)
    source = recipe.resolved_source()
    root = build_dir / recipe.name
    calib_settings = dict(source=source, dataset=recipe.dataset, nsamples=recipe.nsamples, seqlen=recipe.seqlen,
                          seed=recipe.seed, dtype=recipe.dtype)
    if force or not _current(root / "calib" / CALIB_JSON, calib_settings):
        log.info("[calibrate] %s on %s (%d x %d tokens)", recipe.name, recipe.dataset, recipe.nsamples,
                 recipe.seqlen)
        run_calibrate(source, root / "calib", dataset=recipe.dataset, nsamples=recipe.nsamples,
                      seqlen=recipe.seqlen, seed=recipe.seed, rope_mode=recipe.rope_mode, dtype=recipe.dtype,
                      device=device, force=True)
    else:
        log.info("[calibrate] skipped: %s is current", root / "calib")
    manifest_path = root / "folded" / MANIFEST
    calib_mtime = (root / "calib" / CALIB_JSON).stat().st_mtime
    folded_current = manifest_path.exists() and manifest_path.stat().st_mtime >= calib_mtime and _current(
        manifest_path, {"source": source})
    if force or not folded_current:
        manifest = run_fold(source, root / "calib", root / "folded", recipe.kv_ratio, recipe.error_budget,
                            dtype=recipe.dtype, force=True)
        log.info("[fold] KV ratio %.3f -> %s", manifest.kv_ratio, root / "folded")
    else:
        log.info("[fold] skipped: %s is current", root / "folded")
    from .export import export_onnx

    # skips itself when the export is current; the source hash changes whenever the fold is redone
    onnx_dir = export_onnx(root / "folded", root / "onnx", force=force)
    log.info("[export] %s", onnx_dir)
    summary = _evaluate(source, root / "folded", recipe, device)
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{recipe.name}: KV ratio {summary['kv_ratio']:.3f}, PTB-test perplexity "
          f"{summary['perplexity_original']:.2f} -> {summary['perplexity_folded']:.2f} "
          f"({summary['windows']} x {summary['seqlen']} tokens); written to {root}")
    print("not built yet: " + "; ".join(PENDING))
    return 0


def _evaluate(source: str, folded: Path, recipe: Recipe, device: str, windows: int = 8) -> dict:
    from transformers import AutoTokenizer

    from .data import eval_windows
    from .loading import load
    from .manifest import Manifest
    from .runtime import TorchBackend, perplexity

    seqlen = min(512, recipe.max_context)
    ids = eval_windows(AutoTokenizer.from_pretrained(source), "ptb", seqlen, split="test", max_windows=windows)
    result = {"seqlen": seqlen, "windows": int(ids.shape[0])}
    for name, path in (("original", source), ("folded", folded)):
        result[f"perplexity_{name}"] = perplexity(TorchBackend(load(path, device=device)), ids)
    result["kv_ratio"] = Manifest.read(folded / "eigen.json").kv_ratio
    return result
