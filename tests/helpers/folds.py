"""Tiny folds built in-process: calibrated on random ids, folded at fixed fractions of head_dim."""
from eigen_export.artifacts.folded import write_folded
from eigen_export.loading import build_decoder, decoder_from_hf_model
from eigen_export.method.calibrate import calibrate
from eigen_export.method.fold import fold_state, mixed_layout
from eigen_export.modeling import LayerRanks

from .tiny_models import TINY, ptb_like_ids, tiny_hf_model

CASES = [(name, mode) for name in TINY for mode in (("pre", "post") if name not in ("opt", "opt-postnorm", "mpt")
                                                     else (None,))]
# joint latents (issue 13): GQA with and without partial rotary, MHA without RoPE (learned positions, ALiBi)
JOINT_CASES = [("llama-gqa", "pre"), ("qwen2", "pre"), ("gpt_neox", "pre"), ("opt", None), ("mpt", None)]
# (name, mode, latents) of both kinds
ALL_CASES = [(name, mode, "heads") for name, mode in CASES] + [(name, mode, "joint") for name, mode in JOINT_CASES]


def tiny_fold(name, mode, k_fraction, v_fraction=None, kv_dtype=None, rotate=False, kv_bits=4.0, latents="heads"):
    """(hf model, original Decoder, folded Decoder, folded state, ranks, calibration) of a tiny model; kv_dtype:
    the folded Decoder's quantized cache (mixed: kv_bits on average, its layout in folded.kv_layout), rotate: fold
    the incoherent rotation in (fold_layers); latents="joint": one latent per layer side, the fractions of its
    H_kv x head_dim features (no error curves: a joint calibration measures none)."""
    hf = tiny_hf_model(name)
    model = decoder_from_hf_model(hf)
    joint = latents == "joint"
    layers = calibrate(model, ptb_like_ids(4, 24), mode, progress=False, error_samples=0 if joint else 2,
                       joint_heads=joint)
    spec = model.spec.replace(joint_latents=joint)
    d = spec.latent_width
    v_fraction = k_fraction if v_fraction is None else v_fraction
    ranks = [LayerRanks(max(1, int(d * k_fraction)), max(1, int(d * v_fraction)))] * spec.num_layers
    mixed = mixed_layout(layers, ranks, kv_bits) if kv_dtype == "mixed" else None
    state = fold_state(model.state_dict(), [c.projections() for c in layers], ranks, spec, mode, rotate, mixed)
    folded = build_decoder(hf.config, state, ranks, mode, kv_dtype=kv_dtype, kv_layout=mixed and mixed[0],
                           latents=latents)
    return hf, model, folded, state, ranks, layers


def write_tiny_folded(tmp_path, name="llama-gqa", mode="post", kv_dtype=None, latents="heads", **write):
    """A tiny fold written as a folded/ artifact under tmp_path: (its directory, the folded Decoder). kv_dtype: a
    quantized cache (the rotation folded in, as `fold --kv-dtype` does); latents: tiny_fold's. write:
    write_folded's options (shard_bytes)."""
    hf, model, folded, state, ranks, _ = tiny_fold(name, mode, 0.5, 0.75, kv_dtype=kv_dtype, rotate=bool(kv_dtype),
                                                   latents=latents)
    fields = dict(model_type=hf.config.model_type, family=model.spec.family, source="tiny", rope_mode=mode,
                  num_layers=model.spec.num_layers, num_heads=model.spec.num_heads,
                  num_kv_heads=model.spec.num_kv_heads, head_dim=model.spec.head_dim,
                  softmax_scale=model.spec.softmax_scale, ranks=[[r.k, r.v] for r in ranks], kv_ratio=0.5,
                  layer_errors=[0.0] * len(ranks), calibration={"dataset": "random"}, kv_dtype=kv_dtype,
                  kv_rotation=bool(kv_dtype), kv_layout=folded.kv_layout and [list(map(list, layer))
                                                                              for layer in folded.kv_layout],
                  latents=latents)
    out = tmp_path / "folded"
    write_folded(out, hf.config, [state], fields, **write)
    return out, folded
