"""What a family adapter must tell the rest of the pipeline.

A `ModelSpec` is the normalised description of a decoder (optimum-style: one place maps each family's
config names onto ours). Everything outside `families/` reads the spec and the canonical weight names
below, never a Hugging Face module.

Canonical weights (linear weights are (out, in), heads are contiguous blocks of rows):
  embed.weight, pos_embed.weight (learned positions), proj_in.weight / proj_out.weight (OPT-350m),
  final_norm.{weight,bias}, lm_head.weight (absent when tied),
  layers.{i}.attn_norm.*, layers.{i}.mlp_norm.*,
  layers.{i}.attn.{q,k,v,o}.{weight,bias},
  layers.{i}.mlp.{up,gate,down}.{weight,bias}
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

POSITIONS = ("learned", "rope", "alibi")


def latent_layout(num_kv_heads: int, head_dim: int, joint: bool) -> tuple[int, int]:
    """(heads of the cache, widest cached vector): one joint latent over all H_kv d features of a layer side, or
    one per KV head over its d."""
    return (1, num_kv_heads * head_dim) if joint else (num_kv_heads, head_dim)


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    positions: str                      # learned | rope | alibi
    norm: str                           # layernorm | rmsnorm
    norm_eps: float
    mlp: str                            # plain (up, act, down) | gated (act(gate) * up, down)
    activation: str                     # key of transformers.activations.ACT2FN
    softmax_scale: float                # 1/sqrt(original head_dim) unless the config overrides it
    tie_embeddings: bool
    prenorm: bool = True                # OPT-350m normalises after the residual add
    parallel_residual: bool = False     # GPT-NeoX: attention and MLP read the same input
    final_norm: bool = True
    learned_pos_offset: int = 0         # OPT shifts position ids by 2
    rope_dim: int = 0                   # rotary dims per head (partial rotary < head_dim)
    rope_layout: str = "half"           # half: pairs (i, i + n/2) | interleaved: pairs (2i, 2i+1)
    alibi_bias_max: float = 8.0
    max_positions: int = 0
    joint_latents: bool = False         # folded: one cached latent per layer side spans all KV heads (issue 13)

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} query heads cannot be grouped over {self.num_kv_heads} KV heads")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def cache_heads(self) -> int:
        """Heads of the cache: one joint latent, or one latent (or full vector) per KV head."""
        return latent_layout(self.num_kv_heads, self.head_dim, self.joint_latents)[0]

    @property
    def latent_width(self) -> int:
        """Widest a cached vector can be: the features its basis spans (H_kv d for a joint latent)."""
        return latent_layout(self.num_kv_heads, self.head_dim, self.joint_latents)[1]

    def replace(self, **changes) -> "ModelSpec":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Adapter:
    """One attention mechanism family. Quirks live next to the field that handles them."""
    family: str
    model_types: tuple[str, ...]
    spec: Callable[[object], ModelSpec]                                     # HF config -> spec
    to_canonical: Callable[[dict[str, torch.Tensor], ModelSpec], dict[str, torch.Tensor]]
    rope_inv_freq: Callable[[object], tuple[torch.Tensor, float]] | None = None
    check: Callable[[object], None] | None = None                           # reject unsupported options
    # canonical -> HF names, for families whose transformers class can hold what we write (e.g. a GQA
    # merge: num_key_value_heads); None where only eigen_export's own artifact can
    from_canonical: Callable[[dict[str, torch.Tensor], ModelSpec], dict[str, torch.Tensor]] | None = None


def rename(state_dict: dict[str, torch.Tensor], table: dict[str, str], num_layers: int) -> dict[str, torch.Tensor]:
    """Map HF names to canonical ones; `{i}` in a key stands for the layer index.

    HF names not in the table are ignored (rotary caches, masked_bias buffers); a canonical name whose
    HF source is missing is simply absent, and the model builder reports it.
    """
    out = {}
    for hf_name, ours in table.items():
        for i in range(num_layers) if "{i}" in hf_name else [None]:
            src = hf_name.format(i=i) if i is not None else hf_name
            if src in state_dict:
                out[ours.format(i=i) if i is not None else ours] = state_dict[src]
    return out


def inverted(table: dict[str, str]) -> dict[str, str]:
    """A rename table read backwards (canonical -> HF): writing a checkpoint is loading it in reverse."""
    return {ours: hf for hf, ours in table.items()}


def rope_inv_freq_from_config(config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scaling of the config's RoPE variant (transformers' own table)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        base = params["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)).float(), 1.0
    if rope_type == "dynamic":
        # Dynamic NTK changes the frequencies with the sequence length; a fixed basis cannot follow it.
        raise ValueError("rope_type 'dynamic' is not supported: its frequencies change with sequence length")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scaling)
