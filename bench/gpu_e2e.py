"""Model-level decode speed on a GPU: a random-weight Llama-2-7B-shaped model (a few layers), original
vs Eigen-folded, with the PyTorch reference backend.

    python3 bench/gpu_e2e.py [--layers 4] [--ratio 0.6]

Random weights and random orthonormal bases: speed does not depend on their values, and accuracy is
measured elsewhere on real models. The cache is filled with random tensors of the right shape instead of
a prefill (the reference attention materialises [S, T] scores, which a 16k prefill cannot afford).
Each decode step of the reference concatenates the cache (it copies it), so step time tracks KV bytes.
Writes bench/results/gpu-e2e-<device>.json (and to $OUT when set).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def random_bases(h_kv: int, d: int, r: int, generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(h_kv, d, d, generator=generator, dtype=torch.float64))
    return q[..., :r]


def build(args, kv_heads: int, ratio: float | None, mode: str | None, dtype):
    import transformers as tf

    from eigen_export.method.fold import fold_state
    from eigen_export.loading import build_decoder, decoder_from_hf_model
    from eigen_export.modeling import LayerRanks

    layers = args.layers
    config = tf.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=layers,
                            num_attention_heads=args.heads, num_key_value_heads=kv_heads, vocab_size=args.vocab,
                            max_position_embeddings=32768)
    with torch.device(args.device):
        hf = tf.LlamaForCausalLM(config).to(dtype)
    model = decoder_from_hf_model(hf, dtype=dtype, device=args.device)
    del hf
    if ratio is None:
        return model
    d = args.hidden // args.heads
    r = round(ratio * d)
    g = torch.Generator().manual_seed(0)
    bases = [(random_bases(kv_heads, d, d, g), random_bases(kv_heads, d, d, g)) for _ in range(layers)]
    ranks = [LayerRanks(r, r)] * layers
    state = {k: v.float().cpu() for k, v in model.state_dict().items()}
    folded = fold_state(state, bases, ranks, model.spec, mode)
    del model
    return build_decoder(config, folded, ranks, mode, dtype=dtype, device=args.device)


@torch.no_grad()
def decode_time(model, batch: int, past_len: int, steps: int = 8) -> float:
    """Median milliseconds of one decode step after past_len cached tokens."""
    spec, param = model.spec, next(model.parameters())
    device, dtype = param.device, param.dtype
    past = [(torch.randn(batch, spec.num_kv_heads, past_len, r.k, device=device, dtype=dtype),
             torch.randn(batch, spec.num_kv_heads, past_len, r.v, device=device, dtype=dtype))
            for r in model.ranks]
    token = torch.randint(0, spec.vocab_size, (batch, 1), device=device)
    mask = torch.ones(batch, past_len + 1, dtype=torch.long, device=device)
    pos = torch.full((batch, 1), past_len, device=device)
    cuda = device.type == "cuda"
    for _ in range(2):
        model(token, mask, pos, past)
    times = []
    for _ in range(steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            model(token, mask, pos, past)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            model(token, mask, pos, past)
            times.append(1000 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--mlp", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the code paths (use small sizes)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    name = torch.cuda.get_device_name() if cuda else "cpu-dry-run"
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "commit": os.environ.get("GIT_COMMIT", "unknown"), "device": name, "torch": torch.__version__,
              "settings": vars(args) | {"dtype": str(dtype), "shape": "Llama-2-7B layers (4096 hidden, 32 heads "
                                        "of 128, 11008 MLP), random weights", "timer": "CUDA events, median"},
              "rows": []}
    for kv_heads in args.kv_heads:
        for label, ratio, mode in (("original", None, None), ("post", args.ratio, "post"), ("pre", args.ratio, "pre")):
            model = build(args, kv_heads, ratio, mode, dtype)
            for batch in args.batches:
                for ctx in args.contexts:
                    try:
                        ms = decode_time(model, batch, ctx)
                    except torch.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        record["rows"].append({"kv_heads": kv_heads, "model": label, "batch": batch,
                                               "context": ctx, "skipped": "out of memory"})
                        continue
                    widths = sum(r.k + r.v for r in model.ranks)
                    row = {"kv_heads": kv_heads, "model": label, "batch": batch, "context": ctx,
                           "ms_per_step": round(ms, 3), "tokens_per_s": round(batch * 1000 / ms, 1),
                           "kv_bytes_per_token": 2 * kv_heads * widths}
                    record["rows"].append(row)
                    print(row, flush=True)
            del model
            if cuda:
                torch.cuda.empty_cache()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    text = json.dumps(record, indent=1) + "\n"
    for folder in [REPO / "bench" / "results" if cuda else Path("/tmp")] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else []):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"gpu-e2e-{slug}-r{round(args.ratio * args.hidden / args.heads)}.json").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
