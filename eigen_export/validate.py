"""`eigen-export validate`: the parity report a person reads before shipping a compressed model (DESIGN 8).

Three layers of checks, each with an explicit limit from the recipe's [validate] table:
1. accuracy: the folded model against the original, both in PyTorch, on held-out text;
2. parity: every backend this build has (its engine, the plugin graph) against the folded PyTorch model;
3. performance: prefill and decode latency, KV bytes, sizes, peak memory. Reported, never pass/fail: on a
   shared machine a timing threshold would fail for the neighbours' sake.
A backend that cannot run here (TensorRT without a GPU) is listed as skipped with the reason; a skipped
check is never counted as passed. `report/report.json` holds every number, `report.md` the tables.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .artifacts import atomic_dir, read_json_record
from .errors import EigenExportError
from .recipes import ValidationSettings

log = logging.getLogger("eigen_export")

REPORT_DIR = "report"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_FORMAT = "eigen_export.report"
REPORT_VERSION = 1
PARITY_PROMPT_LEN = 48          # longest of the three left-padded parity prompts


@dataclass(frozen=True)
class Check:
    layer: str                  # "accuracy" or "parity: <backend>"
    name: str
    value: float
    op: str                     # "<=" or ">="
    limit: float

    @property
    def passed(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    def record(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed}


# -- metrics: pure functions of tensors ---------------------------------------------------------------------
def logit_metrics(ref: torch.Tensor, test: torch.Tensor, valid: torch.Tensor | None = None) -> dict:
    """Agreement of logits [B, S, V] at the positions where `valid` [B, S] is true (default: all).

    cosine is the smallest per-position cosine similarity; kl is the mean KL(softmax(ref) || softmax(test))."""
    ref, test = ref.float(), test.float()
    if valid is None:
        valid = torch.ones(ref.shape[:2], dtype=torch.bool, device=ref.device)
    ref, test = ref[valid], test[valid]                                  # [N, V]
    diff = (ref - test).abs()
    kl = F.kl_div(F.log_softmax(test, -1), F.log_softmax(ref, -1), log_target=True,
                  reduction="none").sum(-1).clamp_min(0)         # >= 0 in exact arithmetic; rounding dips below
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
            "cosine": F.cosine_similarity(ref, test, dim=-1).min().item(),
            "top1": (ref.argmax(-1) == test.argmax(-1)).float().mean().item(), "kl": kl.mean().item(),
            "positions": int(ref.shape[0])}


def present_max_abs(ref: list, test: list, mask: torch.Tensor) -> float:
    """Largest |difference| over every layer's key and value cache at real (unpadded) positions."""
    keep = mask.bool()[:, None, :, None]                                 # [B, 1, T, 1]
    worst = 0.0
    for (rk, rv), (tk, tv) in zip(ref, test):
        for a, b in ((rk, tk), (rv, tv)):
            if a.shape != b.shape:
                raise EigenExportError(f"a backend returned a cache of shape {tuple(b.shape)} where PyTorch has "
                                       f"{tuple(a.shape)}: the export does not match the folded model")
            worst = max(worst, ((a.float() - b.float().to(a.device)).abs() * keep).max().item())
    return worst


def relative_errors(ref: list[torch.Tensor], test: list[torch.Tensor]) -> list[float]:
    return [((t.float() - r.float()).norm() / r.float().norm().clamp_min(1e-12)).item() for r, t in zip(ref, test)]


def percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    return {"p50": statistics.median(ordered), "p90": p90, "n": len(ordered)}


# -- layer 1: folded vs original ----------------------------------------------------------------------------
@torch.no_grad()
def layer_outputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Hidden state after every decoder layer for a full-length prefill of ids [B, S]."""
    mask = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    x = model.embed_tokens(ids, positions)
    ctx = model.context(mask, positions, x.dtype)
    outs = []
    for layer in model.layers:
        x, _, _ = layer(x, ctx)
        outs.append(x)
    return outs


@torch.no_grad()
def accuracy_numbers(original, folded, windows: torch.Tensor, batch_size: int = 2) -> dict:
    """Perplexity of both, top-1 agreement and KL per token over the windows; per-layer output errors."""
    nll = {"original": 0.0, "folded": 0.0}
    agree, kl, tokens = 0.0, 0.0, 0
    device = next(original.parameters()).device
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size].to(device)
        logits = {name: model(ids)[0][:, :-1].float() for name, model in (("original", original), ("folded", folded))}
        for name, lg in logits.items():
            nll[name] += F.cross_entropy(lg.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        m = logit_metrics(logits["original"], logits["folded"])
        agree += m["top1"] * m["positions"]
        kl += m["kl"] * m["positions"]
        tokens += m["positions"]
    probe = windows[:1].to(device)
    errors = relative_errors(layer_outputs(original, probe), layer_outputs(folded, probe))
    return {"perplexity_original": math.exp(nll["original"] / tokens),
            "perplexity_folded": math.exp(nll["folded"] / tokens),
            "top1_agreement": agree / tokens, "kl": kl / tokens, "layer_errors": errors,
            "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1])}


def accuracy_checks(numbers: dict, s: ValidationSettings) -> list[Check]:
    ratio = numbers["perplexity_folded"] / numbers["perplexity_original"]
    return [Check("accuracy", "perplexity ratio folded/original", ratio, "<=", s.max_ppl_ratio),
            Check("accuracy", "top-1 agreement with the original", numbers["top1_agreement"], ">=", s.min_top1),
            Check("accuracy", "KL(original || folded) per token", numbers["kl"], "<=", s.max_kl),
            Check("accuracy", "worst layer output relative error", max(numbers["layer_errors"]), "<=",
                  s.max_layer_error)]


# -- layer 2: a backend vs the folded PyTorch model ----------------------------------------------------------
def parity_batch(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Three real-text prompts of different lengths, left padded: (ids [3, L], mask [3, L])."""
    length = min(PARITY_PROMPT_LEN, windows.shape[1])
    rows = windows[:3] if windows.shape[0] >= 3 else windows[:1].repeat(3, 1)
    lengths = [length, max(1, length - 7), max(1, length - 13)]
    ids = torch.zeros(3, length, dtype=torch.long)
    mask = torch.zeros(3, length, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, length - n:] = rows[i, :n]
        mask[i, length - n:] = 1
    return ids, mask


@torch.no_grad()
def parity_run(backend, ids: torch.Tensor, mask: torch.Tensor, steps: int, token: torch.Tensor | None = None) -> dict:
    """What layer 2 compares, from one backend: prefill logits and caches, the logits of one decode step (of
    `token`, default this backend's own next token) and `steps` greedy tokens. Tensors on the CPU."""
    from .modeling import default_position_ids
    from .runtime import generate

    dev = backend.device
    positions = default_position_ids(mask, 0)
    logits, past = backend.forward(ids.to(dev), mask.to(dev), positions.to(dev), None)
    token = logits[:, -1:].float().argmax(-1).cpu() if token is None else token
    step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    step_logits, _ = backend.forward(token.to(dev), step_mask.to(dev), (positions[:, -1:] + 1).to(dev), past)
    return {"logits": logits.cpu(), "past": [(k.cpu(), v.cpu()) for k, v in past], "token": token,
            "step_logits": step_logits.cpu(), "tokens": generate(backend, ids, mask, max_new_tokens=steps).cpu()}


def parity_numbers(reference: dict, run: dict, mask: torch.Tensor) -> dict:
    """A backend's `parity_run` against the reference's (the backend's decode step fed the reference's token)."""
    return {"prefill": logit_metrics(reference["logits"], run["logits"], mask.bool()),
            "decode": logit_metrics(reference["step_logits"], run["step_logits"]),
            "present_max_abs": present_max_abs(reference["past"], run["past"], mask),
            "greedy_match": (reference["tokens"] == run["tokens"]).float().mean().item(),
            "greedy_steps": int(run["tokens"].shape[1]), "batch": int(mask.shape[0]),
            "prompt_lengths": mask.sum(1).tolist()}


def parity_checks(backend: str, n: dict, s: ValidationSettings) -> list[Check]:
    layer = f"parity: {backend}"
    checks = []
    for phase in ("prefill", "decode"):
        m = n[phase]
        checks += [Check(layer, f"{phase} logits max abs error", m["max_abs"], "<=", s.backend_max_abs),
                   Check(layer, f"{phase} logits min cosine", m["cosine"], ">=", s.backend_min_cosine),
                   Check(layer, f"{phase} top-1 agreement", m["top1"], ">=", s.backend_min_top1),
                   Check(layer, f"{phase} KL per token", m["kl"], "<=", s.backend_max_kl)]
    return checks + [Check(layer, "present caches max abs error", n["present_max_abs"], "<=",
                           s.backend_present_max_abs),
                     Check(layer, f"greedy tokens equal ({n['greedy_steps']} steps)", n["greedy_match"], ">=",
                           s.backend_min_greedy)]


# -- layer 3: performance -------------------------------------------------------------------------------------
def _elapsed_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


@torch.no_grad()
def measure_latency(backend, vocab_size: int, batch: int, context: int, repeats: int, steps: int) -> dict:
    """Prefill of `context` tokens (one warm-up run excluded) and decode steps whose cache ends at `context`
    (two warm-up steps excluded), in milliseconds."""
    device = backend.device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab_size, (batch, context), generator=g).to(device)
    mask = torch.ones_like(ids)
    positions = torch.arange(context, device=device).expand(batch, context)
    prefill = [_elapsed_ms(lambda: backend.forward(ids, mask, positions, None), device) for _ in range(repeats + 1)]
    start = max(1, context - steps - 2)
    _, past = backend.forward(ids[:, :start], mask[:, :start], positions[:, :start], None)
    decode = []
    for t in range(start, context):
        token, step_mask, pos = ids[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1]
        holder = {}
        ms = _elapsed_ms(lambda: holder.update(out=backend.forward(token, step_mask, pos, past)), device)
        past = holder["out"][1]
        decode.append(ms)
    return {"batch": batch, "context": context, "prefill_ms": percentiles(prefill[1:]),
            "decode_ms": percentiles(decode[2:] or decode)}


def kv_bytes_per_token(num_kv_heads: int, widths: list[tuple[int, int]], itemsize: int) -> int:
    return sum(num_kv_heads * (k + v) for k, v in widths) * itemsize


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).exists() else 0


# -- the stages this report reads ---------------------------------------------------------------------------
@dataclass
class BuildDirs:
    root: Path
    folded: Path
    onnx: Path
    engine: Path

    @classmethod
    def find(cls, root: str | Path) -> "BuildDirs":
        from .export import IO_JSON
        from .fold import MANIFEST

        root = Path(root)
        if not root.is_dir():
            raise EigenExportError(f"{root} is not a build directory: run `make engine MODEL=...` or "
                                   "`eigen-export engine MODEL` first")
        dirs = cls(root, root / "folded", root / "onnx", root / "engine")
        for path, record, command in ((dirs.folded, MANIFEST, f"eigen-export fold MODEL --calib {root}/calib "
                                       f"--out {dirs.folded}"),
                                      (dirs.onnx, IO_JSON, f"eigen-export export {dirs.folded}"),
                                      (dirs.engine, "build.json", f"eigen-export build {dirs.onnx}")):
            if not (path / record).exists():
                raise EigenExportError(f"{path / record} is missing: validate needs every earlier stage; "
                                       f"make it with `{command}` (or `eigen-export engine`)")
        return dirs


def available_backends(dirs: BuildDirs, build: dict, io: dict) -> tuple[dict, dict]:
    """({name: factory}, {name: reason it is skipped}) for the backends this build (its build.json and io.json)
    can be validated on."""
    runnable, skipped = {}, {}
    kind = build.get("backend")
    if kind == "onnxruntime":
        runnable["onnxruntime"] = lambda: _onnxruntime(dirs.engine)
    elif kind == "tensorrt":
        from .build import tensorrt_unavailable

        reason = tensorrt_unavailable()
        if reason:
            skipped["tensorrt"] = f"{reason} on this machine: the engine in {dirs.engine} was not run"
        else:
            runnable["tensorrt"] = lambda: _tensorrt(dirs.engine)
    else:
        raise EigenExportError(f"{dirs.engine / 'build.json'} names backend {kind!r}: re-run `eigen-export build "
                               f"{dirs.onnx} --force`")
    plugin = io.get("plugin_model")
    if not plugin:
        skipped["onnxruntime (plugin graph)"] = io.get("plugin_unsupported") or "the export has no plugin graph"
    elif io.get("dtype") != "fp32":
        skipped["onnxruntime (plugin graph)"] = f"ONNX Runtime runs the plugin graph in fp32 only ({io['dtype']} export)"
    else:
        runnable["onnxruntime (plugin graph)"] = lambda: _onnxruntime(dirs.onnx, plugin=True)
    return runnable, skipped


def _onnxruntime(path: Path, plugin: bool = False):
    from .runtime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(path, plugin=plugin)


def _tensorrt(engine_dir: Path):
    from .runtime import TensorRTBackend

    return TensorRTBackend(engine_dir)



# -- the report -----------------------------------------------------------------------------------------------
def validate(root: str | Path, settings: ValidationSettings | None = None, out: str | Path | None = None,
             device: str = "cpu", force: bool = False, calib: str | Path | None = None) -> dict:
    """Measure everything, write report/ atomically, return the report (its "verdict" is pass or fail)."""
    from . import load
    from .data import eval_windows
    from .build import read_build
    from .export import read_io
    from .loading import load_hf_config
    from .manifest import Manifest
    from .runtime import TorchBackend

    settings = settings or ValidationSettings()
    dirs = BuildDirs.find(root)
    out = Path(out) if out is not None else dirs.root / REPORT_DIR
    manifest = Manifest.read(dirs.folded / "eigen.json")
    _refuse_foreign_report(out, manifest, force)
    build, io = read_build(dirs.engine), read_io(dirs.onnx)
    available, skipped = available_backends(dirs, build, io)
    started = time.perf_counter()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(dirs.folded))
    windows = eval_windows(tokenizer, settings.dataset, settings.seqlen, split="test", max_windows=settings.windows)
    # the fold's dtype (fp16 for the GPU recipes): two fp32 copies of a 7B model would not fit next to an engine
    opened = {name: factory() for name, factory in available.items()}    # a damaged engine fails now, not later
    original = load(manifest.source, dtype=manifest.dtype, device=device)
    folded = load(dirs.folded, dtype=manifest.dtype, device=device)
    log.info("[validate] accuracy: %d x %d tokens of %s", *windows.shape, settings.dataset)
    phase = time.perf_counter()
    accuracy = accuracy_numbers(original, folded, windows)
    accuracy["kv_ratio"] = manifest.kv_ratio
    checks = accuracy_checks(accuracy, settings)
    seconds = {"accuracy": time.perf_counter() - phase}
    phase = time.perf_counter()
    sweep = _sweep(manifest, original, windows, settings.sweep, calib or dirs.root / "calib", device)
    seconds["sweep"] = time.perf_counter() - phase

    reference = TorchBackend(folded)
    ids, mask = parity_batch(windows)
    reference_run = parity_run(reference, ids, mask, settings.generate_steps) if opened else None
    backends = {}
    for name, backend in opened.items():
        log.info("[validate] parity: %s", name)
        phase = time.perf_counter()
        run = parity_run(backend, ids, mask, settings.generate_steps, token=reference_run["token"])
        backends[name] = parity_numbers(reference_run, run, mask)
        checks += parity_checks(name, backends[name], settings)
        seconds[f"parity: {name}"] = time.perf_counter() - phase

    # the plugin graph on ONNX Runtime runs a Python op: its wiring is checked above, its speed means nothing
    timed = {"pytorch original": TorchBackend(original), "pytorch compressed": reference,
             **{f"{name} compressed": b for name, b in opened.items() if "plugin" not in name}}
    vocab = load_hf_config(dirs.folded).vocab_size
    latency = []
    phase = time.perf_counter()
    for name, backend in timed.items():
        for batch in settings.latency_batches:
            for context in settings.latency_contexts:
                log.info("[validate] latency: %s, batch %d, context %d", name, batch, context)
                latency.append({"backend": name, **measure_latency(backend, vocab, batch, context,
                                                                   settings.latency_repeats, settings.decode_steps)})
    seconds["latency"] = time.perf_counter() - phase
    seconds["total"] = time.perf_counter() - started
    report = _assemble(dirs, manifest, io, build, settings, accuracy, sweep, backends, skipped, latency, checks, device,
                       {k: round(v, 1) for k, v in seconds.items()})
    report["inputs"] = report_inputs(dirs, settings)
    _write(out, report, force=True)
    return report


def report_inputs(dirs: BuildDirs, settings: ValidationSettings) -> dict:
    """What a report was measured on: any change (a refold, a re-export, a rebuild, other settings) makes it stale."""
    import hashlib

    from .manifest import Manifest

    digest = {name: hashlib.sha256((path / record).read_bytes()).hexdigest()
              for name, path, record in (("io_json_sha256", dirs.onnx, "io.json"),
                                         ("build_json_sha256", dirs.engine, "build.json"))}
    return {"folded_sha256": Manifest.read(dirs.folded / "eigen.json").weights_sha256, **digest,
            "settings": json.loads(json.dumps(dataclasses.asdict(settings)))}


def current_report(root: str | Path, settings: ValidationSettings, out: str | Path | None = None) -> dict | None:
    """The existing report when it was measured on exactly these stage outputs and settings, else None."""
    try:
        dirs = BuildDirs.find(root)
        report = read_report(Path(out) if out is not None else dirs.root / REPORT_DIR)
    except EigenExportError:
        return None
    return report if report.get("inputs") == report_inputs(dirs, settings) else None


def _refuse_foreign_report(out: Path, manifest, force: bool) -> None:
    """A report directory belongs to one folded model: replacing another model's report needs --force."""
    path = out / REPORT_JSON
    if not path.exists() or force:
        return
    old = read_json_record(path, "", "pass --force to replace it")
    if old.get("folded_sha256") != manifest.weights_sha256:
        raise EigenExportError(f"{out} holds the report of another model ({old.get('model', 'unknown')}): pass "
                               "--force to replace it or choose another --out")


def _sweep(manifest, original, windows, ratios, calib_dir: Path, device: str) -> list[dict]:
    """Perplexity at other KV ratios, folded in memory from the same calibration (for the plot)."""
    if not ratios:
        return []
    from .calibrate import load_calibration
    from .decompose import kv_ratio
    from .fold import fold_to_target
    from .loading import build_decoder, load_hf_config
    from .runtime import TorchBackend, perplexity

    if not (Path(calib_dir) / "calib.json").exists():
        raise EigenExportError(f"[validate] sweep needs the calibration in {calib_dir}: run `eigen-export calibrate` "
                               "or remove `sweep` from the recipe")
    layers, calib_settings = load_calibration(Path(calib_dir))
    config = load_hf_config(manifest.source)
    points = []
    for target in ratios:
        ranks, _, _, state = fold_to_target(original, layers, calib_settings, target)
        model = build_decoder(config, state, ranks, calib_settings.get("rope_mode"), device=device)
        ppl = perplexity(TorchBackend(model), windows, batch_size=2)
        points.append({"target": target, "kv_ratio": kv_ratio([(r.k, r.v) for r in ranks], manifest.head_dim),
                       "perplexity": ppl})
        log.info("[validate] sweep: KV ratio %.3f -> perplexity %.2f", points[-1]["kv_ratio"], ppl)
    return points


def _assemble(dirs, manifest, io, build, settings, accuracy, sweep, backends, skipped, latency, checks, device,
              seconds) -> dict:
    from .machine import git_commit, machine, versions

    itemsize = {"fp32": 4, "fp16": 2, "bf16": 2}[io["dtype"]]
    h_kv, d = manifest.num_kv_heads, manifest.head_dim
    memory = {"kv_bytes_per_token_original": kv_bytes_per_token(h_kv, [(d, d)] * manifest.num_layers, itemsize),
              "kv_bytes_per_token_compressed": kv_bytes_per_token(h_kv, [tuple(r) for r in manifest.ranks], itemsize),
              "kv_dtype": io["dtype"], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and device.startswith("cuda"):
        memory["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    failed = [c for c in checks if not c.passed]
    return {
        "format": REPORT_FORMAT, "version": REPORT_VERSION, "model": dirs.root.name, "source": manifest.source,
        "folded_sha256": manifest.weights_sha256,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "versions": versions(), "machine": machine(), "device": device,
        "settings": dataclasses.asdict(settings),
        "compression": {"kv_ratio": manifest.kv_ratio, "rope_mode": manifest.rope_mode, "ranks": manifest.ranks,
                        "num_layers": manifest.num_layers, "num_heads": manifest.num_heads,
                        "num_kv_heads": h_kv, "head_dim": d},
        "engine": {"backend": build.get("backend"), "dir": str(dirs.engine), "note": _engine_note(build)},
        "accuracy": accuracy, "sweep": sweep, "backends": backends, "skipped": skipped, "latency": latency,
        "memory": memory,
        "sizes_bytes": {"folded": dir_bytes(dirs.folded), "onnx": dir_bytes(dirs.onnx), "engine": dir_bytes(dirs.engine)},
        "checks": [c.record() for c in checks],
        "verdict": "fail" if failed else "pass", "failed": len(failed), "passed": len(checks) - len(failed),
        "seconds": seconds,
    }


def _engine_note(build: dict) -> str | None:
    """DESIGN 7: where TensorRT could not build, the report says so instead of implying an engine exists."""
    from .build import tensorrt_unavailable

    if build.get("backend") != "onnxruntime":
        return None
    reason = tensorrt_unavailable()
    return (f"No TensorRT engine: {reason} on the machine that validated; the engine is the ONNX Runtime session."
            if reason else "The engine is the ONNX Runtime session (built with --backend onnxruntime).")


def _write(out: Path, report: dict, force: bool) -> None:
    from .report import render_markdown, render_plots

    with atomic_dir(out, force=force) as tmp:
        plots = render_plots(report, tmp)
        (tmp / REPORT_MD).write_text(render_markdown(report, plots))
        (tmp / REPORT_JSON).write_text(json.dumps(report, indent=1) + "\n")       # last: marks completion


def read_report(report_dir: str | Path) -> dict:
    path = Path(report_dir) / REPORT_JSON
    report = read_json_record(path, "run `eigen-export validate`", "re-run `eigen-export validate --force`")
    if report.get("format") != REPORT_FORMAT or report.get("version") != REPORT_VERSION:
        raise EigenExportError(f"{path} is not a version {REPORT_VERSION} eigen_export report: re-run "
                               "`eigen-export validate --force`")
    return report
