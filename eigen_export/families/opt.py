"""OPT: learned absolute positions (offset 2), biases everywhere, LayerNorm, ReLU MLP."""
from ..errors import EigenExportError
from .base import Adapter, ModelSpec, rename

_TABLE = {
    "model.decoder.embed_tokens.weight": "embed.weight",
    "model.decoder.embed_positions.weight": "pos_embed.weight",
    "model.decoder.project_in.weight": "proj_in.weight",
    "model.decoder.project_out.weight": "proj_out.weight",
    "model.decoder.final_layer_norm.weight": "final_norm.weight",
    "model.decoder.final_layer_norm.bias": "final_norm.bias",
    "lm_head.weight": "lm_head.weight",
}
for _p in ("weight", "bias"):
    _TABLE |= {
        f"model.decoder.layers.{{i}}.self_attn_layer_norm.{_p}": f"layers.{{i}}.attn_norm.{_p}",
        f"model.decoder.layers.{{i}}.final_layer_norm.{_p}": f"layers.{{i}}.mlp_norm.{_p}",
        f"model.decoder.layers.{{i}}.self_attn.q_proj.{_p}": f"layers.{{i}}.attn.q.{_p}",
        f"model.decoder.layers.{{i}}.self_attn.k_proj.{_p}": f"layers.{{i}}.attn.k.{_p}",
        f"model.decoder.layers.{{i}}.self_attn.v_proj.{_p}": f"layers.{{i}}.attn.v.{_p}",
        f"model.decoder.layers.{{i}}.self_attn.out_proj.{_p}": f"layers.{{i}}.attn.o.{_p}",
        f"model.decoder.layers.{{i}}.fc1.{_p}": f"layers.{{i}}.mlp.up.{_p}",
        f"model.decoder.layers.{{i}}.fc2.{_p}": f"layers.{{i}}.mlp.down.{_p}",
    }


def _check(config):
    if not getattr(config, "layer_norm_elementwise_affine", True):
        raise EigenExportError("OPT with layer_norm_elementwise_affine=False is not supported")


def _spec(config) -> ModelSpec:
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    return ModelSpec(
        model_type=config.model_type, family="opt", num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size, num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
        vocab_size=config.vocab_size, positions="learned", norm="layernorm", norm_eps=1e-5,
        mlp="plain", activation=config.activation_function, softmax_scale=head_dim**-0.5,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        prenorm=config.do_layer_norm_before,
        # HF keeps the final norm only for pre-norm models (config._remove_final_layer_norm is legacy).
        final_norm=config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False),
        learned_pos_offset=2, max_positions=config.max_position_embeddings,
    )


OPT = Adapter(
    family="opt", model_types=("opt",), spec=_spec,
    to_canonical=lambda sd, spec: rename(sd, _TABLE, spec.num_layers), check=_check,
)
