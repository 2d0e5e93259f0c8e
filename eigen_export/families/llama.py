"""Llama-like: RoPE (rotate_half pairs), GQA, RMSNorm, gated SiLU MLP.

Mistral, Qwen2 (q/k/v biases) and SmolLM2 share the mechanism and cost one registry entry each.
"""
import logging

from ..errors import EigenExportError
from .base import Adapter, ModelSpec, inverted, rename, rope_inv_freq_from_config

log = logging.getLogger("eigen_export")

_TABLE = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "final_norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.mlp.gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.mlp.up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.down.weight",
}
for _p in ("weight", "bias"):
    for _hf, _ours in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o")):
        _TABLE[f"model.layers.{{i}}.self_attn.{_hf}.{_p}"] = f"layers.{{i}}.attn.{_ours}.{_p}"


def _check(config):
    if getattr(config, "use_sliding_window", False) or (
        getattr(config, "sliding_window", None) and config.model_type == "mistral"
    ):
        # The reference attention is full causal; past the window the original model forgets, ours does not.
        log.warning("sliding_window=%s is ignored: attention is full causal (exact up to the window length)",
                    config.sliding_window)
    if getattr(config, "mlp_bias", False):
        raise EigenExportError("llama-like models with mlp_bias=True are not supported")


def _spec(config) -> ModelSpec:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelSpec(
        model_type=config.model_type, family="llama", num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size, num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
        vocab_size=config.vocab_size, positions="rope", norm="rmsnorm", norm_eps=config.rms_norm_eps,
        mlp="gated", activation=config.hidden_act, softmax_scale=head_dim**-0.5,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        rope_dim=head_dim, rope_layout="half", max_positions=config.max_position_embeddings,
    )


LLAMA_LIKE = Adapter(
    family="llama", model_types=("llama", "mistral", "qwen2"), spec=_spec,
    to_canonical=lambda sd, spec: rename(sd, _TABLE, spec.num_layers),
    rope_inv_freq=rope_inv_freq_from_config, check=_check,
    from_canonical=lambda sd, spec: rename(sd, inverted(_TABLE), spec.num_layers),
)
