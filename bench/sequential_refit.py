"""Issue 13, lever 2: refit each compressed layer's output projection by least squares, layer after layer.

    .venv/bin/python bench/sequential_refit.py --jobs baseline none:0.63 teacher:0.63 local:0.63 --window-step 4

The fold (default calibration, loss bases, loss allocation, pre mode) cuts each layer's value latents to r_v
numbers per head; W_O' = W_O P then maps them back. GPTQ-style calibration instead fits W_O' to what the layer
should output, on the inputs it really sees: the calibration windows run through layers 0..i-1 already
compressed (and refitted), and W_O' of layer i solves min ||A W - T||^2 + ridge, A = the attention core's output
[tokens, H x r_v], T = a target attention output; the ridge (job's third field, relative to the mean of
diag A^T A) pulls W toward the fold's own W_O'. Two targets:
  teacher  the uncompressed model's attention output on the uncompressed stream (also undoes upstream error)
  local    the uncompressed layer's attention output on the compressed stream (only this layer's own error)
`none` is the fold as it is. Jobs run in --workers one-thread processes, each refitting on its own; every row
records the per-layer relative error of the attention output before and after its refit (on the calibration
windows). Writes bench/results/sequential-refit-<host>.json, rewritten after every finished job.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.kv_accuracy import calib_dir, calibrate_in_child, evaluate, folded_model, texts  # noqa: E402
from bench.rope_modes import job_arguments, new_record, run_jobs, write  # noqa: E402

TARGETS = ("none", "teacher", "local")
DEFAULT_RIDGE = 1e-3
BATCH = 4


def solve_ridge(gram, cross, ridge: float, anchor):
    """argmin_W ||A W - T||^2 + ridge * mean(diag A^T A) ||W - anchor||^2 from gram = A^T A, cross = A^T T: a
    large ridge keeps the fold's own W_O' (anchor), a small one fits the calibration windows alone."""
    import torch

    damp = ridge * gram.diagonal().mean()
    return torch.linalg.solve(gram + damp * torch.eye(gram.shape[0], dtype=gram.dtype), cross + damp * anchor)


def refit_outputs(original, folded, ids, target: str, ridge: float) -> list:
    """Refit every layer of `folded` in place (its attn.o weights) on the calibration windows ids [n, S];
    returns per layer (relative error before, after) of its attention output against the target."""
    import torch

    b, s = min(BATCH, ids.shape[0]), ids.shape[1]
    mask, pos = torch.ones(b, s, dtype=torch.long), torch.arange(s)[None].expand(b, -1)
    ctx_o, ctx_c = (m.context(mask, pos, torch.float32) for m in (original, folded))
    stream_o = [original.embed_tokens(ids[i:i + b], pos) for i in range(0, ids.shape[0], b)]
    stream_c = [x.clone() for x in stream_o]
    errors = []
    for block_o, block_c in zip(original.layers, folded.layers):
        attn = block_c.attn
        gram = cross = None
        total = 0.0
        for x_o, x_c in zip(stream_o, stream_c):
            teacher_in = x_o if target == "teacher" else x_c
            want = block_o.attn(block_o.attn_input(teacher_in), ctx_o)[0].flatten(0, 1).double()   # [b*S, D]
            h = block_c.attn_input(x_c)
            q, k, v = attn.project(h, ctx_c)
            present = attn._cached(k, v)
            out = attn.core(q, *attn._read(present, h.dtype)[:2], ctx_c, present)                  # [b, H, S, r_v]
            a = out.transpose(1, 2).flatten(2).flatten(0, 1).double()                              # [b*S, H*r_v]
            gram = a.T @ a if gram is None else gram + a.T @ a
            cross = a.T @ want if cross is None else cross + a.T @ want
            total += float((want ** 2).sum())

        def error(w):                  # ||A W - T||^2 / ||T||^2 from the accumulated products
            return (float((w * (gram @ w)).sum()) - 2 * float((w * cross).sum()) + total) / total

        folded_w = attn.o.weight.double().T
        before = error(folded_w)
        w = solve_ridge(gram, cross, ridge, folded_w)
        attn.o.weight.copy_(w.T.to(attn.o.weight.dtype))
        errors.append((round(before, 5), round(error(w), 5)))
        stream_o = [block_o(x, ctx_o)[0] for x in stream_o]
        stream_c = [block_c(x, ctx_c)[0] for x in stream_c]
    return errors


def run_job(job: str, source: str, work: str, step: int, names: list[str]) -> dict:
    import torch
    from transformers import AutoTokenizer

    import eigen_export
    from eigen_export.artifacts.calib import read_calibration
    from eigen_export.data import calibration_batch

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(source)
    windows = texts(tokenizer, step, names=names)
    model = eigen_export.load(source).eval()
    row = {"job": job}
    if job != "baseline":
        target, ratio, *rest = job.split(":")
        ridge = float(rest[0]) if rest else DEFAULT_RIDGE
        layers, record = read_calibration(Path(work))
        folded, fields = folded_model(eigen_export.load(source), layers, "pre", float(ratio))
        row |= {"refit": target, "ridge": ridge, **fields}
        if target != "none":
            ids = calibration_batch(tokenizer, record.dataset, record.nsamples, record.seqlen, record.seed)
            started = time.process_time()
            with torch.no_grad():
                row["layer_error_before_after"] = refit_outputs(model, folded.eval(), ids, target, ridge)
            row["refit_cpu_s"] = round(time.process_time() - started, 1)
        model = folded
    with torch.no_grad():
        return evaluate(row, model, windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", required=True, help="baseline and/or target:ratio[:ridge, default 1e-3], target one of "
                        + ", ".join(TARGETS))
    parser.add_argument("--calib", default=None, help="an existing calibration directory (default: calibrate one "
                        "with the defaults under --work)")
    args = job_arguments(parser, "bench-sequential-refit").parse_args()

    from eigen_export.assets import smollm2_dir

    source = str(smollm2_dir())
    out = Path(args.out or ROOT / "bench" / "results" / f"sequential-refit-{platform.node() or 'host'}.json")
    record = new_record(args, batch=BATCH)
    calib = Path(args.calib) if args.calib else calib_dir(Path(args.work), "loss", "ptb")
    if not args.calib:
        record["calibration"] = calibrate_in_child(source, calib)
    run_jobs(run_job, args, source, calib, record, out)
    write(record, out)                  # again: the increases of rows finished before the baseline
    print(json.dumps([{k: v for k, v in r.items() if k.startswith(("job", "ppl", "increase"))} for r in record["rows"]],
                     indent=1))


if __name__ == "__main__":
    main()
