"""Issue 13, lever 3: one latent per layer over all its KV heads (MLA-like) against one latent per KV head.

    .venv/bin/python bench/joint_latents.py --jobs baseline heads:0.63 joint:0.63 --window-step 4

Both arms use the default method (loss bases, loss allocation, pre-RoPE keys) on the default calibration (32 x 512
PTB train) and differ only in what one basis spans: `heads` fits a basis per KV head (d features, the pipeline's
calibration, every head of a layer keeping the same rank), `joint` one per layer over the H_kv x d features of all
its KV heads (method.calibrate(joint_heads=True)), so a token caches r numbers per layer side instead of H_kv x r.
At a KV ratio both caches hold the same numbers. Each job runs the uncompressed model with every layer's key and
value projections replaced by their rank-r projection up_r down_r^T (pre-RoPE keys: what a folded pre-mode model
rebuilds), which is the function the folded model computes; `heads` reproduces the fold's own perplexity (a
check on the probe, see the README). Rows as bench/kv_accuracy.py; writes bench/results/joint-latents-<host>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.kv_accuracy import calib_dir, calibrate_in_child, evaluate, texts  # noqa: E402
from bench.rope_modes import job_arguments, new_record, run_jobs, write  # noqa: E402

ARMS = ("heads", "joint")
JOINT_FILE = "joint-calibration.pt"


def calibrate_joint(source: str, out: str) -> dict:
    """The default calibration with joint_heads, saved to `out` (torch.save of each layer's fields); its CPU
    time and this child's peak RSS."""
    import torch
    from dataclasses import asdict

    import eigen_export
    from eigen_export.data import calibration_batch
    from eigen_export.loading import load_tokenizer
    from eigen_export.method.calibrate import calibrate
    from eigen_export.settings import CalibrationSettings

    torch.set_num_threads(1)
    s = CalibrationSettings()
    started = time.process_time()
    model = eigen_export.load(source).eval()
    ids = calibration_batch(load_tokenizer(source), s.dataset, s.nsamples, s.seqlen, s.seed)
    layers = calibrate(model, ids, s.rope_mode, s.basis, s.grad_samples, batch_size=s.batch_size, progress=False,
                       joint_heads=True)
    torch.save([asdict(layer) for layer in layers], out + ".tmp")
    Path(out + ".tmp").replace(out)
    return {"cpu_s": round(time.process_time() - started, 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "settings": dict(vars(s))}


def projections(layers, ratio: float) -> tuple[list, list[tuple[int, int]]]:
    """Per layer the rank-r projections (P_k, P_v) [groups, w, w] (groups x w: the H_kv x d features) that the
    loss allocation at `ratio` keeps, and the ranks."""
    from eigen_export.method.decompose import choose_by_cost

    width = layers[0].cost_k.shape[-1]
    ranks, _ = choose_by_cost([(layer.cost_k, layer.cost_v) for layer in layers], ratio, width)

    def projection(up, down, r):
        return (up[..., :r].double() @ down[..., :r].double().transpose(-1, -2)).float()
    return [(projection(layer.basis_k, layer.down_k, rk), projection(layer.basis_v, layer.down_v, rv))
            for layer, (rk, rv) in zip(layers, ranks)], ranks


def project_outputs(model, maps) -> None:
    """Forward hooks that replace each layer's raw k and v projection outputs [B, S, groups x w] by P x."""
    import torch

    def hook(p):
        def apply(module, inputs, out):
            x = out.view(*out.shape[:-1], p.shape[0], p.shape[-1])
            return torch.einsum("...gw,gvw->...gv", x, p.to(out.dtype)).reshape(out.shape)
        return apply
    for block, (p_k, p_v) in zip(model.layers, maps):
        block.attn.k.register_forward_hook(hook(p_k))
        block.attn.v.register_forward_hook(hook(p_v))


def run_job(job: str, source: str, work: str, step: int, names: list[str]) -> dict:
    import torch
    from transformers import AutoTokenizer

    import eigen_export
    from eigen_export.artifacts.calib import read_calibration
    from eigen_export.method.calibrate import LayerCalibration
    from eigen_export.method.decompose import kv_ratio

    torch.set_num_threads(1)
    model = eigen_export.load(source).eval()
    windows = texts(AutoTokenizer.from_pretrained(source), step, names=names)
    row = {"job": job}
    if job != "baseline":
        arm, ratio = job.split(":")
        if arm == "joint":
            layers = [LayerCalibration(**fields) for fields in torch.load(Path(work) / JOINT_FILE)]
        else:
            layers, _ = read_calibration(calib_dir(Path(work), "loss", "ptb"))
        maps, ranks = projections(layers, float(ratio))
        project_outputs(model, maps)
        row |= {"arm": arm, "target": float(ratio),
                "kv_ratio": round(kv_ratio(ranks, layers[0].cost_k.shape[-1]), 4),
                "latent_dims_per_layer": [[k, v] for k, v in ranks]}
    with torch.no_grad():
        return evaluate(row, model, windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", required=True, help="baseline and/or arm:ratio, arm one of "
                        + ", ".join(ARMS))
    args = job_arguments(parser, "bench-joint-latents").parse_args()     # --work holds calib-loss-ptb (per head)
    # and the joint calibration; each is made where missing

    from eigen_export.assets import smollm2_dir

    source, work = str(smollm2_dir()), Path(args.work)
    out = Path(args.out or ROOT / "bench" / "results" / f"joint-latents-{platform.node() or 'host'}.json")
    record = new_record(args)
    arms = {job.split(":")[0] for job in args.jobs if job != "baseline"}
    work.mkdir(parents=True, exist_ok=True)
    heads = calib_dir(work, "loss", "ptb")
    if "heads" in arms and not (heads / "calib.json").exists():
        record["calibration"]["heads"] = calibrate_in_child(source, heads)
    if "joint" in arms and not (work / JOINT_FILE).exists():
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            record["calibration"]["joint"] = pool.submit(calibrate_joint, source, str(work / JOINT_FILE)).result()
        print("joint calibration", record["calibration"]["joint"], flush=True)
    run_jobs(run_job, args, source, work, record, out)
    write(record, out)                  # again: the increases of rows finished before the baseline
    print(json.dumps([{k: v for k, v in r.items() if k.startswith(("job", "ppl", "increase", "kv_ratio"))}
                      for r in record["rows"]], indent=1))


if __name__ == "__main__":
    main()
