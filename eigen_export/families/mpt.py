"""MPT: ALiBi, fused Wqkv (q | k | v blocks), LayerNorm without bias, GELU MLP, no linear biases."""
import torch

from ..errors import EigenExportError
from .base import Adapter, ModelSpec, rename

_TABLE = {
    "transformer.wte.weight": "embed.weight",
    "transformer.norm_f.weight": "final_norm.weight",
    "lm_head.weight": "lm_head.weight",
    "transformer.blocks.{i}.norm_1.weight": "layers.{i}.attn_norm.weight",
    "transformer.blocks.{i}.norm_2.weight": "layers.{i}.mlp_norm.weight",
    "transformer.blocks.{i}.attn.out_proj.weight": "layers.{i}.attn.o.weight",
    "transformer.blocks.{i}.ffn.up_proj.weight": "layers.{i}.mlp.up.weight",
    "transformer.blocks.{i}.ffn.down_proj.weight": "layers.{i}.mlp.down.weight",
}


def _attn_config(config):
    attn = config.attn_config
    return attn if isinstance(attn, dict) else attn.to_dict()


def _check(config):
    attn = _attn_config(config)
    unsupported = {k: attn.get(k) for k in ("clip_qkv", "qk_ln") if attn.get(k)}
    if not attn.get("alibi", True):
        unsupported["alibi"] = False
    if unsupported:
        raise EigenExportError(f"MPT options {unsupported} are not supported (only ALiBi MPT without qk_ln/clip_qkv)")


def _spec(config) -> ModelSpec:
    attn = _attn_config(config)
    head_dim = config.hidden_size // config.n_heads
    return ModelSpec(
        model_type=config.model_type, family="mpt", num_layers=config.n_layers,
        hidden_size=config.hidden_size, num_heads=config.n_heads, num_kv_heads=config.n_heads,
        head_dim=head_dim, vocab_size=config.vocab_size, positions="alibi", norm="layernorm",
        norm_eps=config.layer_norm_epsilon, mlp="plain", activation="gelu",
        softmax_scale=attn.get("softmax_scale") or head_dim**-0.5,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        alibi_bias_max=float(attn.get("alibi_bias_max", 8)), max_positions=config.max_seq_len,
    )


def _to_canonical(sd, spec):
    out = rename(sd, _TABLE, spec.num_layers)
    for i in range(spec.num_layers):
        fused = sd.get(f"transformer.blocks.{i}.attn.Wqkv.weight")
        if fused is None:                   # a part of a checkpoint (one streamed layer); load_weights checks
            continue
        q, k, v = torch.chunk(fused, 3, dim=0)
        out |= {f"layers.{i}.attn.q.weight": q, f"layers.{i}.attn.k.weight": k, f"layers.{i}.attn.v.weight": v}
    return out


MPT = Adapter(family="mpt", model_types=("mpt",), spec=_spec, to_canonical=_to_canonical, check=_check)
