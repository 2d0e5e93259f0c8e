"""`calibrate`: load the model and the calibration text, measure bases and error curves, write calib/."""
from __future__ import annotations

import time
from pathlib import Path

from ..artifacts.calib import CalibRecord, read_calib_record, write_calibration
from ..artifacts.folded import stream_uncompressed
from ..data import calibration_batch
from ..errors import EigenExportError
from ..loading import load_tokenizer
from ..machine import return_freed_memory
from ..method.calibrate import calibrate, choose_latents
from ..method.decompose import EPS_GRID
from ..settings import CalibrationSettings, resolve_device
from .common import must_make

CALIBRATE_MMAP_THRESHOLD = 16 << 20


def is_current(calib_dir: Path, source: str, settings: CalibrationSettings) -> bool:
    """calib.json holds this source and every setting that changes a number (non-RoPE models record
    rope_mode None: any requested mode fits them)."""
    try:
        record = read_calib_record(calib_dir).as_dict()
    except EigenExportError:
        return False
    wanted = {"source": str(source), **settings.record()}
    rope_mode, latents = wanted.pop("rope_mode"), wanted.pop("latents")
    return all(record.get(k) == v for k, v in wanted.items()) and record.get("rope_mode") in (None, rope_mode) and \
        latents in ("auto", record.get("latents"))


def run_calibrate(source: str, out_dir: str | Path, settings: CalibrationSettings = CalibrationSettings(),
                  device: str = "auto", force: bool = False, replace_stale: bool = False,
                  progress: bool = True) -> Path:
    """Measure, write calib/ (bases + curves); returns the calib dir."""
    out_dir = Path(out_dir)
    current = is_current(out_dir, source, settings)
    if not must_make("calibrate", out_dir, current, force, replace_stale, "a calibration of this model"):
        return out_dir
    started = time.perf_counter()
    # The backward pass allocates the same few 4-40 MB activations again and again: served from their own
    # mappings (the 1 MiB threshold eigen-export sets) each is page-faulted afresh, which cost SmolLM2 68 s of
    # system time in 185 s of CPU; from the heap they are reused.
    return_freed_memory(CALIBRATE_MMAP_THRESHOLD)
    streamed = stream_uncompressed(source, dtype=settings.dtype, device=resolve_device(device))
    config, model = streamed.config, streamed.model
    ids = calibration_batch(load_tokenizer(source), settings.dataset, settings.nsamples, settings.seqlen,
                            settings.seed)
    streamed.load_head()
    latents = choose_latents(settings.latents, model.spec, settings.rope_mode, settings.basis, settings.error_samples)
    layers = calibrate(model, ids, settings.rope_mode, settings.basis, settings.grad_samples,
                       error_samples=settings.error_samples,
                       batch_size=settings.batch_size, rank_multiple=settings.rank_multiple, progress=progress,
                       layer=streamed.block, rope_positions=settings.rope_positions,
                       joint_heads=latents == "joint")
    record = CalibRecord(
        source=str(source), model_type=config.model_type,
        rope_mode=settings.rope_mode if model.spec.positions == "rope" else None, basis=settings.basis,
        grad_samples=settings.grad_samples, rope_positions=settings.rope_positions,
        dataset=settings.dataset, nsamples=settings.nsamples, seqlen=settings.seqlen, seed=settings.seed,
        dtype=settings.dtype, eps_grid=list(EPS_GRID), error_samples=settings.error_samples,
        rank_multiple=settings.rank_multiple, latents=latents,
        wall_time_s=round(time.perf_counter() - started, 2))
    write_calibration(out_dir, layers, record, force=True)
    return out_dir
