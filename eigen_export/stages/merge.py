"""`merge-heads`: calibrate the group caches, merge KV heads (MHA -> GQA, DESIGN 3.4), write the merged model."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..artifacts.folded import load_uncompressed
from ..artifacts.layout import is_folded
from ..artifacts.merged import write_merged
from ..artifacts.records import refuse_existing
from ..data import calibration_batch
from ..families import spec_from_config
from ..loading import load_hf_config, load_tokenizer
from ..method.merge import check_kv_heads, group_grams, merge_record, merge_state
from ..settings import MergeSettings, resolve_device

log = logging.getLogger("eigen_export")


def run_merge(source: str | Path, out_dir: str | Path, settings: MergeSettings, device: str = "auto",
              force: bool = False, progress: bool = True) -> dict:
    """Returns the merge record (also written as merge.json, or into the artifact's manifest)."""
    started = time.perf_counter()
    if not is_folded(source):          # fail before loading gigabytes
        check_kv_heads(spec_from_config(load_hf_config(source)), settings.kv_heads)
    if not force:
        refuse_existing(out_dir)
    config, model = load_uncompressed(source, dtype="float32", device=resolve_device(device))
    spec = model.spec
    check_kv_heads(spec, settings.kv_heads)
    ids = calibration_batch(load_tokenizer(source), settings.dataset, settings.nsamples, settings.seqlen,
                            settings.seed)
    grams = group_grams(model, ids, settings.kv_heads, batch_size=settings.batch_size, progress=progress)
    state, errors = merge_state(model.state_dict(), grams, spec, settings.kv_heads, settings.method)
    record = merge_record(source, config.model_type, spec, settings.kv_heads, settings.method, errors,
                          dataset=settings.dataset, nsamples=settings.nsamples, seqlen=settings.seqlen,
                          seed=settings.seed, wall_time_s=round(time.perf_counter() - started, 2))
    write_merged(Path(out_dir), config, spec.replace(num_kv_heads=settings.kv_heads), state, record, source=source,
                 dtype=settings.dtype, force=force)
    log.info("merged %s: %d -> %d KV heads (%s), mean relative cache error K %.4f V %.4f", source,
             spec.num_kv_heads, settings.kv_heads, settings.method,
             *(sum(e[p] for e in errors) / len(errors) for p in ("key", "value")))
    return record
