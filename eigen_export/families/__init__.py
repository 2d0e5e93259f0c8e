"""Family adapters, keyed by Hugging Face `model_type` and chosen by mechanism (DESIGN 2)."""
from __future__ import annotations

from ..errors import EigenExportError
from .base import Adapter, ModelSpec, latent_layout
from .gpt_neox import GPT_NEOX
from .llama import LLAMA_LIKE
from .mpt import MPT
from .opt import OPT

_ADAPTERS = (OPT, LLAMA_LIKE, MPT, GPT_NEOX)
REGISTRY: dict[str, Adapter] = {t: a for a in _ADAPTERS for t in a.model_types}
SUPPORTED_MODEL_TYPES = tuple(sorted(REGISTRY))


def get_adapter(model_type: str) -> Adapter:
    try:
        return REGISTRY[model_type]
    except KeyError:
        raise EigenExportError(
            f"unsupported model_type {model_type!r}: eigen_export supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        ) from None


def spec_from_config(config) -> ModelSpec:
    adapter = get_adapter(config.model_type)
    if adapter.check is not None:
        adapter.check(config)
    return adapter.spec(config)


__all__ = ["Adapter", "ModelSpec", "REGISTRY", "SUPPORTED_MODEL_TYPES", "get_adapter", "latent_layout", "spec_from_config"]
