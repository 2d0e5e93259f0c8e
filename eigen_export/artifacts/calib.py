"""calib/: bases.safetensors (per layer the spectra, bases, down projections and direction costs of K and V) +
calib.json (the settings it was measured with, the error curves if measured, a spectrum summary), written by
`calibrate`, read by `fold`."""
from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from ..errors import EigenExportError
from ..method.calibrate import LayerCalibration, energy_summary
from ..method.decompose import CurvePoint
from .layout import BASES, CALIB_JSON
from .records import atomic_dir, check_format, read_json_record, sha256_file

CALIB_FORMAT = "eigen_export.calib"
CALIB_VERSION = 3
REMAKE = "re-run `eigen-export calibrate --force`"
CALIB_TENSORS = ("eig_k", "basis_k", "eig_v", "basis_v", "cost_k", "cost_v", "down_k", "down_v")


@dataclass(frozen=True)
class CalibRecord:
    """calib.json without its per-layer data: what was calibrated, and how."""
    source: str
    model_type: str
    rope_mode: str | None                 # None for models without RoPE
    basis: str
    grad_samples: int
    rope_positions: int | None            # post mode: None = the model's max context (calibrate's rope_positions)
    dataset: str
    nsamples: int
    seqlen: int
    seed: int
    dtype: str
    eps_grid: list[float]
    error_samples: int
    rank_multiple: int
    wall_time_s: float
    latents: str = "heads"                # joint: one basis per layer over all KV heads ([1, H_kv d, H_kv d] tensors)
    format: str = CALIB_FORMAT
    version: int = CALIB_VERSION

    def as_dict(self) -> dict:
        return asdict(self)


def write_calibration(out_dir: Path, layers: list[LayerCalibration], record: CalibRecord, force: bool = False) -> None:
    from safetensors.torch import save_file

    # cloned: an orthonormal basis is its own down projection, and the loss basis's spectrum its cost (safetensors
    # refuses tensors sharing memory)
    tensors = {f"layers.{i}.{name}": getattr(layer, name).clone().contiguous()
               for i, layer in enumerate(layers) for name in CALIB_TENSORS}
    data = {**record.as_dict(),
            "layers": [{"curve": [vars(p) for p in layer.curve],
                        "energy_k": energy_summary(layer.eig_k), "energy_v": energy_summary(layer.eig_v)}
                       for layer in layers]}
    with atomic_dir(out_dir, force=force) as tmp:
        save_file(tensors, str(tmp / BASES))
        (tmp / CALIB_JSON).write_text(json.dumps(data, indent=1) + "\n")   # last: marks completion


def _read(calib_dir: Path) -> tuple[CalibRecord, list[dict]]:
    path = calib_dir / CALIB_JSON
    data = read_json_record(path, "run `eigen-export calibrate` first", REMAKE)
    check_format(data, path, CALIB_FORMAT, CALIB_VERSION, REMAKE)
    known = {f.name for f in fields(CalibRecord)}
    missing = sorted({f.name for f in fields(CalibRecord) if f.default is MISSING} - set(data))
    if missing or not isinstance(data.get("layers"), list):
        raise EigenExportError(f"{path} is missing {missing or ['layers']}: {REMAKE}")
    return CalibRecord(**{k: v for k, v in data.items() if k in known}), data["layers"]


def read_calib_record(calib_dir: str | Path) -> CalibRecord:
    return _read(Path(calib_dir))[0]


def read_calibration(calib_dir: str | Path) -> tuple[list[LayerCalibration], CalibRecord]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    calib_dir = Path(calib_dir)
    record, entries = _read(calib_dir)
    try:
        tensors = load_file(str(calib_dir / BASES))
        return [LayerCalibration(**{name: tensors[f"layers.{i}.{name}"] for name in CALIB_TENSORS},
                                 curve=[CurvePoint(**p) for p in entry["curve"]])
                for i, entry in enumerate(entries)], record
    except (OSError, SafetensorError, KeyError, TypeError) as e:
        raise EigenExportError(f"{calib_dir / BASES} does not match {CALIB_JSON} ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}): {REMAKE}") from None


def calib_sha256(calib_dir: str | Path) -> str:
    """Identifies one calibration: a fold made from another is stale."""
    return sha256_file(Path(calib_dir) / CALIB_JSON)
