"""eigen.json: the versioned contract between the fold and every later stage (DESIGN 1)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EigenExportError

FORMAT = "eigen_export.folded"
VERSION = 1


@dataclass(frozen=True)
class Manifest:
    model_type: str
    family: str
    source: str                          # what was compressed: hub id or local path
    rope_mode: str | None                # pre | post for RoPE families, None otherwise
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int                        # the ORIGINAL head dim: the softmax scale comes from it
    softmax_scale: float
    ranks: list[list[int]]               # per layer [r_k, r_v]
    kv_ratio: float
    layer_errors: list[float | None]     # calibrated block-output error per layer (None: ranks not on the curve)
    calibration: dict                    # dataset, nsamples, seqlen, seed, allocation rule, ...
    weights_sha256: str
    dtype: str = "float32"
    format: str = FORMAT
    version: int = VERSION
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.format != FORMAT:
            raise EigenExportError(f"eigen.json has format {self.format!r}, expected {FORMAT!r}: not a folded model")
        if self.version != VERSION:
            raise EigenExportError(f"eigen.json is version {self.version}, this eigen_export reads version "
                                   f"{VERSION}: re-run `eigen-export fold` with this version")
        if len(self.ranks) != self.num_layers:
            raise EigenExportError(f"eigen.json lists {len(self.ranks)} layer ranks for {self.num_layers} layers")
        for i, (rk, rv) in enumerate(self.ranks):
            if not (1 <= rk <= self.head_dim and 1 <= rv <= self.head_dim):
                raise EigenExportError(f"eigen.json layer {i} ranks ({rk}, {rv}) outside [1, head_dim={self.head_dim}]")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EigenExportError(f"eigen.json has unknown keys {unknown}: written by another version or edited")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in data and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)
        if missing:
            raise EigenExportError(f"eigen.json is missing keys {missing}: the fold did not finish; re-run it")
        return cls(**data)

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        from .artifacts import read_json_record

        return cls.from_dict(read_json_record(path, "run `eigen-export fold` to make a folded model",
                                              "the artifact is corrupt; re-run the fold"))
