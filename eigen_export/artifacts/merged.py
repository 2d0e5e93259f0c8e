"""A KV-head-merged model (DESIGN 3.4): a stock GQA checkpoint + merge.json where the family's transformers
config can state the head count, else a full-rank folded artifact whose eigen.json carries the merge record."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..dtypes import resolve_dtype
from ..families import ModelSpec, get_adapter
from .folded import Manifest, copy_model_files, write_folded
from .layout import MERGE_JSON, WEIGHTS, is_folded
from .records import atomic_dir, check_format, read_json_record

MERGE_FORMAT = "eigen_export.merge"
MERGE_VERSION = 1
REMAKE = "re-run `eigen-export merge-heads --force`"


def read_merge_record(path: str | Path) -> dict | None:
    """The merge record of a merged model directory (merge.json, or eigen.json's extra), None if not merged."""
    path = Path(str(path))
    if (path / MERGE_JSON).is_file():
        record = read_json_record(path / MERGE_JSON, REMAKE, REMAKE)
        return check_format(record, path / MERGE_JSON, MERGE_FORMAT, MERGE_VERSION, REMAKE)
    if is_folded(path):
        return Manifest.read(path).extra.get("merge")
    return None


def write_merged(out_dir: Path, hf_config, spec: ModelSpec, state: dict[str, torch.Tensor], record: dict,
                 source: str | Path | None = None, dtype: str = "float32", force: bool = False) -> Path:
    """A stock GQA checkpoint where the family's HF config can say so, else a full-rank eigen_export artifact."""
    from safetensors.torch import save_file

    record = {"format": MERGE_FORMAT, "version": MERGE_VERSION, **record}
    adapter = get_adapter(hf_config.model_type)
    state = {k: v.to(resolve_dtype(dtype)).contiguous() for k, v in state.items()}
    if adapter.from_canonical is None:
        fields = dict(
            model_type=hf_config.model_type, family=spec.family, source=record["source"], rope_mode=None,
            num_layers=spec.num_layers, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim, softmax_scale=spec.softmax_scale,
            ranks=[[spec.head_dim, spec.head_dim]] * spec.num_layers,
            # fraction of the source's cache, as for a fold
            kv_ratio=round(spec.num_kv_heads / record["kv_heads_before"], 6),
            # no block-output error is measured for a merge: the worse of the two cache errors stands in
            layer_errors=[max(e["key"], e["value"]) for e in record["layers"]],
            calibration={k: record.get(k) for k in ("dataset", "nsamples", "seqlen", "seed")},
            dtype=dtype, extra={"merge": record})
        write_folded(Path(out_dir), hf_config, [state], fields, tokenizer_source=source, force=force)
        return Path(out_dir)
    config = copy.deepcopy(hf_config)
    config.num_key_value_heads = spec.num_kv_heads
    config.dtype = resolve_dtype(dtype)
    with atomic_dir(out_dir, force=force) as tmp:
        config.save_pretrained(tmp)
        save_file(adapter.from_canonical(state, spec), str(tmp / WEIGHTS), metadata={"format": "pt"})
        if source is not None:
            copy_model_files(source, tmp)
        (tmp / MERGE_JSON).write_text(json.dumps(record, indent=1) + "\n")      # last: marks completion
    return Path(out_dir)

