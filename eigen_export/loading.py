"""Loading models: a Hugging Face checkpoint (hub id or local directory) or a folded artifact."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .errors import EigenExportError
from .families import get_adapter, spec_from_config
from .modeling import Decoder

log = logging.getLogger("eigen_export")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise EigenExportError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}") from None


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).exists() or source.count("/") > 1


def load_hf_config(source: str | Path):
    from transformers import AutoConfig

    source = str(source)
    if _looks_local(source) and not Path(source).expanduser().is_dir():
        raise EigenExportError(f"model path {source} does not exist: pass an existing model directory or a hub id")
    try:
        return AutoConfig.from_pretrained(source)
    except OSError as e:
        raise EigenExportError(f"cannot read a model config from {source!r} ({str(e).splitlines()[0]}): "
                               "pass a directory with config.json or a reachable hub id") from None


def decoder_from_hf_model(hf_model, dtype=torch.float32, device="cpu") -> Decoder:
    """Convert a loaded transformers causal LM into the reference Decoder (uncompressed)."""
    config = hf_model.config
    spec = spec_from_config(config)
    adapter = get_adapter(config.model_type)
    state = adapter.to_canonical(dict(hf_model.state_dict()), spec)
    if spec.tie_embeddings:
        state.pop("lm_head.weight", None)
    return build_decoder(config, state, ranks=None, rope_mode=None, dtype=dtype, device=device)


def build_decoder(config, state, ranks, rope_mode, dtype=torch.float32, device="cpu",
                  num_kv_heads: int | None = None) -> Decoder:
    """num_kv_heads: the manifest's count where it differs from the config (KV heads merged in a family whose
    transformers config cannot state it)."""
    spec = spec_from_config(config)
    if num_kv_heads is not None:
        spec = spec.replace(num_kv_heads=num_kv_heads)
    adapter = get_adapter(config.model_type)
    inv_freq, scaling = adapter.rope_inv_freq(config) if adapter.rope_inv_freq else (None, 1.0)
    model = Decoder(spec, ranks, rope_mode, state, inv_freq=inv_freq, rope_scaling=scaling)
    return model.to(device=device, dtype=resolve_dtype(dtype)).eval()


def load_hf(source: str | Path, dtype="float32", device="cpu"):
    """(HF config, Decoder) for a hub id or a local HF directory, or an eigen_export artifact still at full rank."""
    from transformers import AutoModelForCausalLM

    from .fold import MANIFEST

    if (Path(str(source)) / MANIFEST).is_file():
        return load_hf_config(source), _full_rank_artifact(source, dtype, device)
    config = load_hf_config(source)
    spec_from_config(config)  # fail on an unsupported family before loading gigabytes
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(source), dtype=resolve_dtype(dtype))
    except OSError as e:
        raise EigenExportError(f"cannot load weights from {source} ({str(e).splitlines()[0]}): "
                               "the directory needs model.safetensors (or pytorch_model.bin) next to config.json"
                               ) from None
    model = decoder_from_hf_model(hf_model, dtype=dtype, device=device)
    del hf_model
    return config, model


def _full_rank_artifact(path, dtype, device) -> Decoder:
    """A merged-KV-head model of a family with no GQA in transformers is an artifact, yet still uncompressed:
    calibrate and fold accept it as a source. A low-rank artifact is refused: its bases would be refitted."""
    from .fold import load_folded

    model = load_folded(path, dtype=dtype, device=device)
    d = model.spec.head_dim
    if model.rope_mode is not None or any((r.k, r.v) != (d, d) for r in model.ranks):
        raise EigenExportError(f"{path} is already folded to low rank: calibrate and fold the model it came from")
    return model


def load(path: str | Path, dtype="float32", device="cpu") -> Decoder:
    """A folded artifact (directory with eigen.json) or an original HF model, as a reference Decoder."""
    from .fold import MANIFEST, load_folded

    path = Path(path)
    if (path / MANIFEST).exists():
        return load_folded(path, dtype=dtype, device=device)
    return load_hf(path, dtype=dtype, device=device)[1]
