"""`fold`: decide ranks from a calibration, fold the bases into the weights, write folded/ (DESIGN 3)."""
from __future__ import annotations

import logging
from pathlib import Path

from ..artifacts.calib import calib_sha256, read_calibration
from ..artifacts.folded import Manifest, stream_uncompressed, write_folded
from ..artifacts.merged import read_merge_record
from ..dtypes import resolve_dtype
from ..errors import EigenExportError
from ..method.decompose import kv_ratio
from ..method.fold import decide_ranks, fold_layers, mixed_layout
from ..settings import FoldSettings
from .common import must_make

log = logging.getLogger("eigen_export")


def is_current(out_dir: Path, source: str, calib_dir: Path, settings: FoldSettings) -> bool:
    """eigen.json holds this source, this calibration's hash and the rule and dtype asked for."""
    try:
        manifest = Manifest.read(out_dir)
        calib = calib_sha256(calib_dir)
    except (EigenExportError, OSError):
        return False
    recorded = manifest.calibration.get("allocation", {})
    return manifest.source == str(source) and manifest.dtype == settings.dtype and \
        manifest.calibration.get("calib_sha256") == calib and \
        all(recorded.get(k) == v for k, v in settings.allocation_record().items())


def run_fold(source: str, calib_dir: str | Path, out_dir: str | Path, settings: FoldSettings = FoldSettings(),
             force: bool = False, replace_stale: bool = False) -> Manifest:
    """Decide ranks from the calibration curves, fold the bases, write the folded artifact."""
    calib_dir, out_dir = Path(calib_dir), Path(out_dir)
    current = is_current(out_dir, source, calib_dir, settings)
    if not must_make("fold", out_dir, current, force, replace_stale, "a fold of this calibration"):
        return Manifest.read(out_dir)
    layers, calib = read_calibration(calib_dir)
    source_model = stream_uncompressed(source, dtype="float32")
    config = source_model.config
    spec = source_model.spec.replace(joint_latents=calib.latents == "joint")
    if calib.model_type != config.model_type or len(layers) != spec.num_layers or \
            layers[0].basis_k.shape[-1] != spec.latent_width:
        raise EigenExportError(f"calibration in {calib_dir} was made for {calib.source!r}, not {source!r}: "
                               "re-run `eigen-export calibrate` for this model")
    (ranks, layer_errors), found = decide_ranks(layers, spec.latent_width, settings.kv_ratio, settings.error_budget,
                                                settings.allocation, calib.rank_multiple)
    dtype = resolve_dtype(settings.dtype)
    mixed = mixed_layout(layers, ranks, settings.mean_bits) if settings.kv_dtype == "mixed" else None

    def parts():
        """The weights outside the layers, then one folded layer at a time, each made when the writer asks for
        it and dropped once written: never the whole model in memory."""
        yield {k: v.to(dtype) for k, v in source_model.global_state().items()}
        bases = [layer.projections() for layer in layers]
        for part in fold_layers(source_model.layer_state, bases, ranks, spec, calib.rope_mode, settings.rotated,
                                mixed):
            yield {k: v.to(dtype) for k, v in part.items()}

    pairs = [(r.k, r.v) for r in ranks]
    merge = read_merge_record(source)     # KV heads merged before this fold: one manifest records both
    calibration = {k: v for k, v in calib.as_dict().items() if k not in ("format", "version")}
    fields = dict(
        model_type=config.model_type, family=spec.family, source=str(source), rope_mode=calib.rope_mode,
        num_layers=spec.num_layers, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, softmax_scale=spec.softmax_scale, ranks=[list(p) for p in pairs],
        kv_ratio=round(kv_ratio(pairs, spec.latent_width), 6), layer_errors=layer_errors,
        calibration={**calibration, "calib_sha256": calib_sha256(calib_dir),
                     "allocation": settings.allocation_record() | found},
        dtype=settings.dtype, kv_dtype=settings.kv_dtype, kv_rotation=settings.rotated,
        kv_layout=mixed[0] if mixed else None, latents=calib.latents,
        extra={"merge": merge} if merge else {},
    )
    manifest = write_folded(out_dir, config, parts(), fields, tokenizer_source=source, force=True)
    log.info("folded %s: KV ratio %.3f, ranks %s, cache %s", source, manifest.kv_ratio, pairs,
             settings.kv_dtype or settings.dtype)
    return manifest
