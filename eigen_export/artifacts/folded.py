"""folded/: config.json + model.safetensors + tokenizer + eigen.json, the versioned contract between the fold
and every later stage (DESIGN 1); its one writer and its one reader (the low-rank reference Decoder)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from eigen_export_plugins.lowrank_attention.kv_codec import KV_DTYPES

from ..dtypes import resolve_dtype
from ..errors import EigenExportError
from ..families import latent_layout, spec_from_config
from ..loading import Checkpoint, StreamedModel, build_decoder, fake_decoder, load_hf, load_hf_config, load_tokenizer
from ..modeling import LATENTS, Decoder, LayerRanks
from .layout import GENERATION_CONFIG, MANIFEST, WEIGHTS, WEIGHTS_INDEX, is_folded, weights_shard
from .records import atomic_dir, read_json_record, sha256_file

log = logging.getLogger("eigen_export")

FORMAT = "eigen_export.folded"
VERSION = 2        # 2: int4 / mixed caches use mid-rise codes (kv_codec), with run ratios folded for them


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
    kv_dtype: str | None = None          # int8 | int4 | mixed: the cache is quantized (kv_codec); None: in `dtype`
    kv_rotation: bool = False            # an incoherent rotation was folded into the bases (method/fold.py)
    kv_layout: list | None = None        # mixed: per layer [key counts, value counts] of 8/4/2-bit coordinates
    latents: str = "heads"               # heads: a latent per KV head; joint: one per layer side (ranks <= H_kv d)
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
        if self.kv_dtype is not None and self.kv_dtype not in KV_DTYPES:
            raise EigenExportError(f"eigen.json has kv_dtype {self.kv_dtype!r}, not one of {KV_DTYPES}: re-run the fold")
        if self.latents not in LATENTS:
            raise EigenExportError(f"eigen.json has latents {self.latents!r}, not one of {LATENTS}: re-run the fold")
        width = self.latent_width
        for i, (rk, rv) in enumerate(self.ranks):
            if not (1 <= rk <= width and 1 <= rv <= width):
                raise EigenExportError(f"eigen.json layer {i} ranks ({rk}, {rv}) outside [1, {width}] ({self.latents} "
                                       f"latents of head_dim {self.head_dim})")
        if (self.kv_dtype == "mixed") != (self.kv_layout is not None):
            raise EigenExportError("eigen.json's kv_layout must be given exactly for a mixed cache: re-run the fold")
        for i, (ranks, counts) in enumerate(zip(self.ranks, self.kv_layout or [])):
            if [sum(c) for c in counts] != list(ranks):
                raise EigenExportError(f"eigen.json layer {i} kv_layout {counts} does not add up to its ranks "
                                       f"{ranks}: re-run the fold")

    @property
    def cache_heads(self) -> int:
        """Heads of the cache (ModelSpec.cache_heads)."""
        return latent_layout(self.num_kv_heads, self.head_dim, self.latents == "joint")[0]

    @property
    def latent_width(self) -> int:
        """Widest a cached vector can be (ModelSpec.latent_width): what kv_ratio divides a rank by."""
        return latent_layout(self.num_kv_heads, self.head_dim, self.latents == "joint")[1]

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
    def read(cls, folded_dir: str | Path) -> "Manifest":
        return cls.from_dict(read_json_record(Path(folded_dir) / MANIFEST,
                                              "run `eigen-export fold` to make a folded model",
                                              "the artifact is corrupt; re-run the fold"))


# Largest shard written: the fold holds at most one shard (or one layer, if larger) of folded weights at a time.
SHARD_BYTES = 1 << 30


def write_folded(out_dir: Path, hf_config, parts: Iterable[dict[str, torch.Tensor]], manifest_fields: dict,
                 tokenizer_source: str | Path | None = None, force: bool = False,
                 shard_bytes: int = SHARD_BYTES) -> Manifest:
    """config.json + weights + tokenizer + eigen.json (written last), atomically. parts: the canonical state in
    pieces (e.g. one layer each), consumed one at a time; more than shard_bytes of them go to shards with
    transformers' index, otherwise to one model.safetensors."""
    with atomic_dir(out_dir, force=force) as tmp:
        hf_config.save_pretrained(tmp)
        _write_shards(tmp, parts, shard_bytes)
        if tokenizer_source is not None:
            copy_model_files(tokenizer_source, tmp)
        manifest = Manifest(weights_sha256=weights_sha256(tmp), **manifest_fields)
        (tmp / MANIFEST).write_text(manifest.to_json())
    return manifest


def _write_shards(out: Path, parts: Iterable[dict[str, torch.Tensor]], shard_bytes: int) -> None:
    from safetensors.torch import save_file

    written: list[tuple[Path, list[str]]] = []
    pending: dict[str, torch.Tensor] = {}
    sizes = {"pending": 0, "total": 0}

    def flush():
        path = out / f"shard-{len(written)}.tmp"
        save_file(pending, str(path), metadata={"format": "pt"})
        written.append((path, list(pending)))
        pending.clear()
        sizes["pending"] = 0

    for part in parts:
        for name, tensor in part.items():
            nbytes = tensor.numel() * tensor.element_size()
            if pending and sizes["pending"] + nbytes > shard_bytes:
                flush()
            pending[name] = tensor.contiguous()
            sizes["pending"] += nbytes
            sizes["total"] += nbytes
    if pending or not written:
        flush()
    if len(written) == 1:
        written[0][0].rename(out / WEIGHTS)
        return
    weight_map = {}
    for i, (path, names) in enumerate(written):
        name = weights_shard(i, len(written))
        path.rename(out / name)
        weight_map |= dict.fromkeys(names, name)
    (out / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": sizes["total"]}, "weight_map": weight_map},
                                                indent=2) + "\n")


def weights_record(folded_dir: Path) -> Path:
    """model.safetensors, or the shards' index where there is only that."""
    one = folded_dir / WEIGHTS
    return one if one.exists() or not (folded_dir / WEIGHTS_INDEX).exists() else folded_dir / WEIGHTS_INDEX


def weights_sha256(folded_dir: Path) -> str:
    """What eigen.json's weights_sha256 holds: model.safetensors' sha256, or for shards that of the index and
    every shard's sha256 in order."""
    if weights_record(folded_dir).name == WEIGHTS:
        return sha256_file(folded_dir / WEIGHTS)
    index = (folded_dir / WEIGHTS_INDEX).read_bytes()
    shards = sorted(set(json.loads(index)["weight_map"].values()))
    h = hashlib.sha256(index)
    for shard in shards:
        h.update(sha256_file(folded_dir / shard).encode())
    return h.hexdigest()


def copy_model_files(source, dest: Path) -> None:
    """What a compressed model keeps of its source besides the weights: tokenizer and generation config."""
    try:
        load_tokenizer(source).save_pretrained(str(dest))
    except EigenExportError as e:
        log.warning("no tokenizer saved with the model (%s)", e)
    generation = Path(str(source)) / GENERATION_CONFIG
    if generation.is_file():
        (dest / GENERATION_CONFIG).write_bytes(generation.read_bytes())


def load_folded(path: str | Path, dtype="float32", device="cpu", verify: bool = True) -> Decoder:
    """Rebuild the low-rank reference model of a folded directory; refuse weights that do not match."""
    config, manifest, checkpoint = open_folded(path, verify)
    state = checkpoint.read(checkpoint.names())
    return build_decoder(config, state, [LayerRanks(k, v) for k, v in manifest.ranks], manifest.rope_mode,
                         dtype=dtype, device=device, num_kv_heads=manifest.num_kv_heads, kv_dtype=manifest.kv_dtype,
                         kv_layout=manifest.kv_layout, latents=manifest.latents)


def open_folded(path: str | Path, verify: bool = True) -> tuple[object, Manifest, Checkpoint]:
    """(HF config, manifest, its weights unread) of a folded directory whose parts agree with each other."""
    path = Path(path)
    manifest = Manifest.read(path)
    config = load_hf_config(path)
    if config.model_type != manifest.model_type:
        raise EigenExportError(f"{path}: config.json is {config.model_type!r} but eigen.json says "
                               f"{manifest.model_type!r}: the artifact was mixed up; re-run the fold")
    weights = weights_record(path)
    if not weights.exists():
        raise EigenExportError(f"{weights} is missing: re-run `eigen-export fold`")
    if verify:
        try:
            digest = weights_sha256(path)
        except (OSError, ValueError, KeyError, TypeError):       # a shard missing, an index edited
            digest = None
        if digest != manifest.weights_sha256:
            raise EigenExportError(f"{weights} does not match the sha256 in eigen.json: the weights were changed "
                                   "or belong to another fold; re-run `eigen-export fold`")
    spec = spec_from_config(config)
    # A KV-head merge in a family whose config has no num_key_value_heads: the manifest holds the count.
    merged = manifest.extra.get("merge", {}).get("kv_heads") == manifest.num_kv_heads
    if (spec.num_layers, spec.head_dim) != (manifest.num_layers, manifest.head_dim) or \
            (spec.num_kv_heads != manifest.num_kv_heads and not merged):
        raise EigenExportError(f"{path}: config.json and eigen.json disagree on layers/KV heads/head_dim")
    return config, manifest, Checkpoint(path)


def model_of_shapes(path: str | Path, dtype) -> tuple[Decoder, Callable[[str], torch.Tensor]]:
    """(the model of a folded or original directory with fake weights of its shapes in `dtype`, a function
    reading one weight by its canonical name, in `dtype`): what a graph capture needs, without the weights
    in memory (issue 17). RoPE frequencies and ALiBi slopes are real and stay fp32."""
    dtype = resolve_dtype(dtype)
    if is_folded(path):
        config, manifest, checkpoint = open_folded(path)
        model = fake_decoder(config, checkpoint.placeholders(checkpoint.names()), dtype,
                             [LayerRanks(k, v) for k, v in manifest.ranks], manifest.rope_mode, manifest.num_kv_heads,
                             manifest.kv_dtype, manifest.kv_layout, manifest.latents)
        return model, lambda name: checkpoint.read([name])[name].to(dtype)
    streamed = StreamedModel(path, dtype=dtype)
    return fake_decoder(streamed.config, streamed.placeholders(), dtype, None, None), streamed.read


def load_model(path: str | Path, dtype="float32", device="cpu") -> Decoder:
    """A folded artifact (directory with eigen.json) or an original HF model, as a reference Decoder."""
    if is_folded(path):
        return load_folded(path, dtype=dtype, device=device)
    return load_hf(path, dtype=dtype, device=device)[1]


def load_uncompressed(source: str | Path, dtype="float32", device="cpu"):
    """(HF config, Decoder) of a model that calibration, fold and merge may start from: an HF model, or a
    merged-KV-head artifact of a family with no GQA in transformers (still full rank). A low-rank artifact is
    refused: its bases would be refitted."""
    if not is_folded(source):
        return load_hf(source, dtype=dtype, device=device)
    model = load_folded(source, dtype=dtype, device=device)
    d = model.spec.head_dim
    if model.rope_mode is not None or model.spec.joint_latents or any((r.k, r.v) != (d, d) for r in model.ranks):
        raise EigenExportError(f"{source} is already folded to low rank: calibrate and fold the model it came from")
    return load_hf_config(source), model


class HeldModel:
    """StreamedModel's interface over a model held whole (a merged-KV-head artifact: small, already ours)."""

    def __init__(self, config, model: Decoder):
        self.config, self.model, self.spec = config, model, model.spec

    def block(self, i: int):
        return self.model.layers[i]

    def load_head(self) -> None:
        """Held whole: the head is loaded already."""

    def layer_state(self, i: int) -> dict[str, torch.Tensor]:
        return self.model.layers[i].state_dict()

    def global_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith("layers.")}


def stream_uncompressed(source: str | Path, dtype="float32", device="cpu") -> StreamedModel | HeldModel:
    """What calibrate and fold read layer by layer: an HF checkpoint streamed from disk (one layer in memory at
    a time), or a merged artifact held whole (load_uncompressed's rules)."""
    if not is_folded(source):
        return StreamedModel(source, dtype=dtype, device=device)
    config, model = load_uncompressed(source, dtype=dtype, device=device)
    return HeldModel(config, model)

