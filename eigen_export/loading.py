"""Loading Hugging Face checkpoints (hub id or local directory) as the reference Decoder; folded artifacts are
read by artifacts/folded.py on top of this."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .dtypes import resolve_dtype
from .errors import EigenExportError
from .families import get_adapter, spec_from_config
from .modeling import Decoder

log = logging.getLogger("eigen_export")

def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).exists() or source.count("/") > 1


def load_hf_config(source: str | Path):
    from transformers import AutoConfig

    source = str(source)
    if _looks_local(source) and not Path(source).expanduser().is_dir():
        raise EigenExportError(f"model path {source} does not exist: pass an existing model directory or a hub id")
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:     # ValueError: a directory without a model config
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
    """(HF config, Decoder) for a hub id or a local HF directory."""
    from transformers import AutoModelForCausalLM

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


def load_tokenizer(source: str | Path):
    """The tokenizer saved with a model directory (or a hub id's), or a one-line error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as e:
        raise EigenExportError(f"no tokenizer in {source} ({str(e).splitlines()[0]}): "
                               "use a model directory that has one") from None
