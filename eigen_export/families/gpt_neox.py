"""GPT-NeoX / Pythia: partial rotary, fused qkv interleaved per head ([H, 3, d] rows), parallel residual."""
import torch

from .base import Adapter, ModelSpec, rename, rope_inv_freq_from_config

_TABLE = {
    "gpt_neox.embed_in.weight": "embed.weight",
    "embed_out.weight": "lm_head.weight",  # transformers < 5
    "lm_head.weight": "lm_head.weight",
}
for _p in ("weight", "bias"):
    _TABLE |= {
        f"gpt_neox.final_layer_norm.{_p}": f"final_norm.{_p}",
        f"gpt_neox.layers.{{i}}.input_layernorm.{_p}": f"layers.{{i}}.attn_norm.{_p}",
        f"gpt_neox.layers.{{i}}.post_attention_layernorm.{_p}": f"layers.{{i}}.mlp_norm.{_p}",
        f"gpt_neox.layers.{{i}}.attention.dense.{_p}": f"layers.{{i}}.attn.o.{_p}",
        f"gpt_neox.layers.{{i}}.mlp.dense_h_to_4h.{_p}": f"layers.{{i}}.mlp.up.{_p}",
        f"gpt_neox.layers.{{i}}.mlp.dense_4h_to_h.{_p}": f"layers.{{i}}.mlp.down.{_p}",
    }


def _spec(config) -> ModelSpec:
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    rotary = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    return ModelSpec(
        model_type=config.model_type, family="gpt_neox", num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size, num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
        vocab_size=config.vocab_size, positions="rope", norm="layernorm", norm_eps=config.layer_norm_eps,
        mlp="plain", activation=config.hidden_act, softmax_scale=head_dim**-0.5,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        parallel_residual=config.use_parallel_residual, rope_dim=int(head_dim * rotary),
        rope_layout="half", max_positions=config.max_position_embeddings,
    )


def _to_canonical(sd, spec):
    out = rename(sd, _TABLE, spec.num_layers)
    h, d = spec.num_heads, spec.head_dim
    for i in range(spec.num_layers):
        for part in ("weight", "bias"):
            fused = sd.get(f"gpt_neox.layers.{i}.attention.query_key_value.{part}")
            if fused is None:
                continue
            # rows are [head, (q|k|v), d]: regroup into contiguous q, k, v blocks of heads
            q, k, v = fused.reshape(h, 3, d, *fused.shape[1:]).unbind(1)
            for name, t in zip("qkv", (q, k, v)):
                out[f"layers.{i}.attn.{name}.{part}"] = t.reshape(h * d, *fused.shape[1:])
    return out


GPT_NEOX = Adapter(
    family="gpt_neox", model_types=("gpt_neox",), spec=_spec, to_canonical=_to_canonical,
    rope_inv_freq=rope_inv_freq_from_config,
)
