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

import collections
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from eigen_export_plugins.lowrank_attention.kv_codec import cache_values

from ..artifacts.calib import read_calibration
from ..artifacts.engine import read_build
from ..artifacts.folded import Manifest, load_model
from ..artifacts.layout import BUILD_JSON, CALIB_JSON, IO_JSON, MANIFEST, BuildLayout, is_engine
from ..artifacts.onnx_io import OnnxIO, read_io
from ..artifacts.report import read_report, report_owner, write_report
from ..backends import OnnxRuntimeBackend, TensorRTBackend, TorchBackend, generate, perplexity
from ..backends.tensorrt_backend import tensorrt_unavailable
from ..data import eval_windows
from ..dtypes import dtype as dtype_of
from ..errors import EigenExportError
from ..loading import build_decoder, load_hf_config, load_tokenizer
from ..machine import git_commit, machine, versions
from ..method.decompose import kv_bytes_per_token, kv_ratio
from ..method.fold import fold_to_target
from ..method.metrics import LOGIT_CHUNK, chunked_logit_metrics, combined_logit_metrics, logit_metrics, \
    next_token_nll, percentiles, present_max_abs, relative_errors
from ..modeling import default_position_ids
from ..settings import ValidationSettings
from .common import must_make

log = logging.getLogger("eigen_export")

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


# -- layer 1: folded vs original ----------------------------------------------------------------------------
@torch.no_grad()
def hidden_states(model, ids: torch.Tensor) -> Iterator[torch.Tensor]:
    """The hidden state after each decoder layer in turn, for a full-length prefill of ids [B, S] (no cache)."""
    mask = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    x = model.embed_tokens(ids, positions)
    ctx = model.context(mask, positions, x.dtype)
    for layer in model.layers:
        x, _ = layer(x, ctx)
        yield x


def layer_outputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    return list(hidden_states(model, ids))


@torch.no_grad()
def accuracy_numbers(original, folded, windows: torch.Tensor) -> dict:
    """Perplexity and next-token accuracy of both, top-1 agreement and KL per token over the windows (one at a
    time: two models' logits of a batch would take more memory than the models); per-layer output errors."""
    nll = {"original": 0.0, "folded": 0.0}
    correct = {"original": 0, "folded": 0}
    parts = []
    device = next(original.parameters()).device
    for ids in windows.split(1):
        ids = ids.to(device)
        logits = {}
        for name, model in (("original", original), ("folded", folded)):
            logits[name] = model(ids)[0][:, :-1]
            window_nll, window_correct = next_token_nll(logits[name], ids)
            nll[name] += window_nll
            correct[name] += window_correct
        parts.append(chunked_logit_metrics(logits["original"], logits["folded"]))
    m = combined_logit_metrics(parts)
    tokens = m["positions"]
    probe = windows[:1].to(device)
    errors = relative_errors(layer_outputs(original, probe), layer_outputs(folded, probe))
    return {"perplexity_original": math.exp(nll["original"] / tokens),
            "perplexity_folded": math.exp(nll["folded"] / tokens),
            "top1_accuracy_original": correct["original"] / tokens, "top1_accuracy_folded": correct["folded"] / tokens,
            "top1_agreement": m["top1"], "kl": m["kl"], "layer_errors": errors,
            "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1])}


@torch.no_grad()
def long_context_perplexity(model, windows: torch.Tensor) -> float:
    """Perplexity on windows as long as the engine serves, one window at a time, its logits made LOGIT_CHUNK
    positions at a time from the last hidden states: a 2048-token window's logits alone take 400 MB at
    SmolLM2's vocabulary."""
    nll, tokens = 0.0, 0
    device = next(model.parameters()).device
    for ids in windows.split(1):
        ids = ids.to(device)
        x = collections.deque(hidden_states(model, ids), maxlen=1)[0]
        for start in range(0, ids.shape[1] - 1, LOGIT_CHUNK):
            stop = min(start + LOGIT_CHUNK, ids.shape[1] - 1)
            nll += next_token_nll(model.head(x[:, start:stop]), ids[:, start:stop + 1])[0]
        tokens += ids.shape[1] - 1
    return math.exp(nll / tokens)


@torch.no_grad()
def continuations(model, windows: torch.Tensor, s: ValidationSettings) -> torch.Tensor:
    """Greedy continuations [P, continuation_tokens] of real-text prompts: each window's first prompt_tokens."""
    return generate(TorchBackend(model), windows[:s.continuation_prompts, :s.prompt_tokens],
                    max_new_tokens=s.continuation_tokens)


def continuation_numbers(want: torch.Tensor, got: torch.Tensor, s: ValidationSettings) -> dict:
    """How many leading tokens of the original's continuations (want) the folded model's (got) agree on."""
    prefix = (want == got).long().cumprod(1).sum(1)                        # leading tokens equal, per prompt
    return {"prompts": int(want.shape[0]), "prompt_tokens": s.prompt_tokens,
            "tokens": s.continuation_tokens, "matching_prefix": prefix.tolist(),
            "mean_matching_prefix": prefix.float().mean().item()}


def accuracy_checks(numbers: dict, s: ValidationSettings) -> list[Check]:
    ratio = numbers["perplexity_folded"] / numbers["perplexity_original"]
    long = numbers["long_context"]
    cont = numbers["continuations"]
    return [Check("accuracy", f"perplexity ratio folded/original at {numbers['seqlen']} tokens", ratio, "<=",
                  s.max_ppl_ratio),
            Check("accuracy", f"perplexity ratio folded/original at {long['seqlen']} tokens (the engine's context)",
                  long["perplexity_folded"] / long["perplexity_original"], "<=", s.max_ppl_ratio),
            Check("accuracy", "top-1 agreement with the original", numbers["top1_agreement"], ">=", s.min_top1),
            Check("accuracy", "next-token accuracy drop (original - folded)",
                  numbers["top1_accuracy_original"] - numbers["top1_accuracy_folded"], "<=", s.max_top1_drop),
            Check("accuracy", f"greedy continuations: mean tokens agreed (of {cont['tokens']})",
                  cont["mean_matching_prefix"], ">=", s.min_continuation_prefix),
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
def parity_run(backend, ids: torch.Tensor, mask: torch.Tensor, steps: int, token: torch.Tensor | None = None,
               manifest: Manifest | None = None) -> dict:
    """What layer 2 compares, from one backend: prefill logits and caches (as numbers: a quantized cache is
    decoded with the manifest's ranks), the logits of one decode step (of `token`, default this backend's own
    next token) and `steps` greedy tokens. Tensors on the CPU."""
    dev = backend.device
    positions = default_position_ids(mask, 0)
    logits, past = backend.forward(ids.to(dev), mask.to(dev), positions.to(dev), None)
    token = logits[:, -1:].float().argmax(-1).cpu() if token is None else token
    step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    step_logits, _ = backend.forward(token.to(dev), step_mask.to(dev), (positions[:, -1:] + 1).to(dev), past)
    kv_dtype = manifest.kv_dtype if manifest else None
    ranks = manifest.ranks if manifest else [(layer[0].shape[-1], layer[1].shape[-1]) for layer in past]
    layout = (manifest.kv_layout if manifest else None) or [None] * len(ranks)
    values = [cache_values(tuple(t.cpu() for t in layer), r_k, r_v, kv_dtype, layout=counts)
              for layer, (r_k, r_v), counts in zip(past, ranks, layout)]
    return {"logits": logits.cpu(), "past": values, "token": token,
            "step_logits": step_logits.cpu(), "tokens": generate(backend, ids, mask, max_new_tokens=steps).cpu()}


def parity_numbers(reference: dict, run: dict, mask: torch.Tensor) -> dict:
    """A backend's `parity_run` against the reference's (the backend's decode step fed the reference's token)."""
    return {"prefill": logit_metrics(reference["logits"], run["logits"], mask.bool()),
            "decode": logit_metrics(reference["step_logits"], run["step_logits"]),
            "present_max_abs": present_max_abs(reference["past"], run["past"], mask),
            "greedy_match": (reference["tokens"] == run["tokens"]).float().mean().item(),
            "greedy_steps": int(run["tokens"].shape[1]), "batch": int(mask.shape[0]),
            "prompt_lengths": mask.sum(1).tolist()}


def parity_checks(backend: str, n: dict, s: ValidationSettings, effect: dict | None = None) -> list[Check]:
    """The layer-2 checks of one backend. effect: with a quantized cache, the same numbers between the quantized
    reference and the reference with a float cache (quantization_effect); each limit then admits that much.

    Why: a code is a rounding of a float, and two correct implementations (ORT's or TensorRT's sums against
    torch's) put a value on either side of a rounding boundary now and then; the changed code moves everything
    after it by a code step, which moves more values across boundaries, layer after layer. A backend's cache
    is then another draw of the same quantization noise, and what can be asked of it is to stay as close to the
    reference as the quantization's own effect (a wrong scale, packing or mask lands far outside it)."""
    layer = f"parity: {backend}"

    def check(name, keys, op, limit):
        value = _dig(n, keys)
        if effect is not None:
            limit = max(limit, _dig(effect, keys)) if op == "<=" else min(limit, _dig(effect, keys))
            name += " (limit: at least the quantized cache's own effect)"
        return Check(layer, name, value, op, limit)

    checks = []
    for phase in ("prefill", "decode"):
        checks += [check(f"{phase} logits max abs error", (phase, "max_abs"), "<=", s.backend_max_abs),
                   check(f"{phase} logits min cosine", (phase, "cosine"), ">=", s.backend_min_cosine),
                   check(f"{phase} top-1 agreement", (phase, "top1"), ">=", s.backend_min_top1),
                   check(f"{phase} KL per token", (phase, "kl"), "<=", s.backend_max_kl)]
    return checks + [check("present caches max abs error", ("present_max_abs",), "<=", s.backend_present_max_abs),
                     check(f"greedy tokens equal ({n['greedy_steps']} steps)", ("greedy_match",), ">=",
                           s.backend_min_greedy)]


def _dig(numbers: dict, keys: tuple[str, ...]) -> float:
    for key in keys:
        numbers = numbers[key]
    return numbers


def quantization_effect(folded, reference_run: dict, ids, mask, steps: int) -> dict:
    """parity_numbers between the quantized reference's run and the same model with a float cache: how far
    quantizing the cache alone moves the outputs (parity_checks' allowance for a quantized backend)."""
    with folded.cache_format(None):
        float_run = parity_run(TorchBackend(folded), ids, mask, steps, token=reference_run["token"])
    return parity_numbers(reference_run, float_run, mask)


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
    past = backend.forward(ids[:, :start], mask[:, :start], positions[:, :start], None)[1]   # its logits freed now
    decode = []
    for t in range(start, context):
        token, step_mask, pos = ids[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1]
        holder = {}
        ms = _elapsed_ms(lambda: holder.update(out=backend.forward(token, step_mask, pos, past)), device)
        past = holder["out"][1]
        decode.append(ms)
    return {"batch": batch, "context": context, "prefill_ms": percentiles(prefill[1:]),
            "decode_ms": percentiles(decode[2:] or decode)}


# -- the stages this report reads ---------------------------------------------------------------------------
def find_build(root: str | Path) -> BuildLayout:
    """build/<name> with every stage validate reads, or a one-line error naming the command that makes it."""
    layout = BuildLayout(Path(root))
    if not layout.root.is_dir():
        raise EigenExportError(f"{layout.root} is not a build directory: run `make engine MODEL=...` or "
                               "`eigen-export engine MODEL` first")
    for path, record, command in ((layout.folded, MANIFEST, f"eigen-export fold MODEL --calib {layout.calib} "
                                   f"--out {layout.folded}"),
                                  (layout.onnx, IO_JSON, f"eigen-export export {layout.folded}"),
                                  (layout.engine, BUILD_JSON, f"eigen-export build {layout.onnx}")):
        if not (path / record).exists():
            raise EigenExportError(f"{path / record} is missing: validate needs every earlier stage; "
                                   f"make it with `{command}` (or `eigen-export engine`)")
    return layout


def available_backends(layout: BuildLayout, build: dict, io: OnnxIO) -> tuple[dict, dict]:
    """({name: factory}, {name: reason it is skipped}) for the backends this build (its build.json and io.json)
    can be validated on."""
    runnable, skipped = {}, {}
    kind = build["backend"]
    if kind == "onnxruntime":
        runnable["onnxruntime"] = lambda: OnnxRuntimeBackend(layout.engine)
    else:
        reason = tensorrt_unavailable()
        if reason:
            skipped["tensorrt"] = f"{reason} on this machine: the engine in {layout.engine} was not run"
        else:
            runnable["tensorrt"] = lambda: TensorRTBackend(layout.engine)
    if not io.plugin_model:
        skipped["onnxruntime (plugin graph)"] = io.plugin_model_reason or "the export has no plugin graph"
    elif io.dtype != "fp32":
        skipped["onnxruntime (plugin graph)"] = f"ONNX Runtime runs the plugin graph in fp32 only ({io.dtype} export)"
    else:
        runnable["onnxruntime (plugin graph)"] = lambda: OnnxRuntimeBackend(layout.onnx, plugin=True)
    return runnable, skipped


def baseline_engine(layout: BuildLayout, build: dict, manifest: Manifest):
    """(factory of the uncompressed model's engine backend, or None; why there is none). It counts only where
    it was built from this fold's source, by the same backend as the compressed engine: engine against engine."""
    if not is_engine(layout.baseline_engine):
        return None, f"no baseline engine in {layout.baseline_engine} (make engine builds it unless --no-baseline)"
    theirs = read_build(layout.baseline_engine)
    source = read_io(layout.baseline_engine).source
    if theirs["backend"] != build["backend"] or Path(source).resolve() != Path(manifest.source).resolve():
        return None, (f"the engine in {layout.baseline_engine} is a {theirs['backend']} build of {source}, not a "
                      f"{build['backend']} build of {manifest.source}: re-run `eigen-export engine`")
    if build["backend"] == "tensorrt":
        reason = tensorrt_unavailable()
        if reason:
            return None, f"{reason} on this machine: the baseline engine was not run"
        return lambda: TensorRTBackend(layout.baseline_engine), None
    return lambda: OnnxRuntimeBackend(layout.baseline_engine), None


# -- the report -----------------------------------------------------------------------------------------------
def report_inputs(layout: BuildLayout, settings: ValidationSettings) -> dict:
    """What a report was measured on: any change (a refold, a re-export, a rebuild, other settings) makes it stale."""
    records = [("io_json_sha256", layout.onnx, IO_JSON), ("build_json_sha256", layout.engine, BUILD_JSON)]
    if is_engine(layout.baseline_engine):
        records.append(("baseline_build_json_sha256", layout.baseline_engine, BUILD_JSON))
    digest = {name: hashlib.sha256((path / record).read_bytes()).hexdigest() for name, path, record in records}
    return {"folded_sha256": Manifest.read(layout.folded).weights_sha256, **digest,
            "settings": json.loads(json.dumps(dataclasses.asdict(settings)))}


def is_current(out: Path, layout: BuildLayout, settings: ValidationSettings) -> bool:
    """report.json was measured on exactly these stage outputs and settings."""
    try:
        return read_report(out).get("inputs") == report_inputs(layout, settings)
    except EigenExportError:
        return False


def run_validate(root: str | Path, settings: ValidationSettings = ValidationSettings(), out: str | Path | None = None,
                 device: str = "cpu", force: bool = False, replace_stale: bool = False,
                 calib: str | Path | None = None, measure_again: bool = False) -> dict:
    """Measure everything, write report/ atomically, return the report (its "verdict" is pass or fail).

    A report directory belongs to one folded model: a stale report of the same model is replaced, another
    model's only with `force`. measure_again: measure even when the report is current (`eigen-export validate`
    is a request to measure; `make engine` keeps a current report)."""
    layout = find_build(root)
    out = Path(out) if out is not None else layout.report
    manifest = Manifest.read(layout.folded)
    owner = report_owner(out)
    same_model = owner is not None and owner["folded_sha256"] == manifest.weights_sha256
    if owner is not None and not (same_model or force or replace_stale):
        raise EigenExportError(f"{out} holds the report of another model ({owner['model']}): pass "
                               "--force to replace it or choose another --out")
    current = not measure_again and is_current(out, layout, settings)
    if not must_make("validate", out, current, force, replace_stale or same_model, "a report of these stage outputs"):
        return read_report(out)
    build, io = read_build(layout.engine), read_io(layout.onnx)
    available, skipped = available_backends(layout, build, io)
    baseline, baseline_note = baseline_engine(layout, build, manifest)
    # (factory, name for the parity checks, name in the latency table): the plugin graph on ONNX Runtime runs a
    # Python op, so its wiring is checked and its speed means nothing
    engines = [(factory, name, None if "plugin" in name else f"{name} compressed") for name, factory in available.items()]
    if baseline is not None:
        engines.append((baseline, None, f"{build['backend']} original"))
    for factory, _, _ in engines:
        factory()           # a damaged engine fails now, not after minutes of measuring (and is closed again)
    started, seconds = time.perf_counter(), collections.Counter()

    tokenizer = load_tokenizer(layout.folded)
    windows = eval_windows(tokenizer, settings.dataset, settings.seqlen, split="test", max_windows=settings.windows)
    long_windows = eval_windows(tokenizer, settings.dataset, build["max_context"], split="test",
                                max_windows=settings.long_windows)
    vocab = load_hf_config(layout.folded).vocab_size
    latency = []

    def time_backend(name: str, backend) -> None:
        phase = time.perf_counter()
        for batch in settings.latency_batches:
            for context in settings.latency_contexts:
                log.info("[validate] latency: %s, batch %d, context %d", name, batch, context)
                latency.append({"backend": name, **measure_latency(backend, vocab, batch, context,
                                                                   settings.latency_repeats, settings.decode_steps)})
        seconds["latency"] += time.perf_counter() - phase

    # One model or engine in memory at a time, except original and folded together for the per-token comparison
    # (KL, top-1 agreement); each is freed before the next loads. The fold's dtype (fp16 for the GPU recipes).
    phase = time.perf_counter()
    original = load_model(manifest.source, dtype=manifest.dtype, device=device)
    log.info("[validate] accuracy of the original at the engine's context: %d x %d tokens", *long_windows.shape)
    long_original = long_context_perplexity(original, long_windows)
    want = continuations(original, windows, settings)
    seconds["accuracy"] += time.perf_counter() - phase
    phase = time.perf_counter()
    sweep = _sweep(manifest, original, windows, settings.sweep, Path(calib) if calib else layout.calib, device)
    seconds["sweep"] += time.perf_counter() - phase
    time_backend("pytorch original", TorchBackend(original))
    phase = time.perf_counter()
    folded = load_model(layout.folded, dtype=manifest.dtype, device=device)
    log.info("[validate] accuracy: %d x %d tokens of %s", *windows.shape, settings.dataset)
    accuracy = accuracy_numbers(original, folded, windows)
    seconds["accuracy"] += time.perf_counter() - phase
    del original

    phase = time.perf_counter()
    log.info("[validate] accuracy of the folded model at the engine's context")
    accuracy["long_context"] = {"perplexity_original": long_original,
                                "perplexity_folded": long_context_perplexity(folded, long_windows),
                                "windows": int(long_windows.shape[0]), "seqlen": int(long_windows.shape[1])}
    accuracy["continuations"] = continuation_numbers(want, continuations(folded, windows, settings), settings)
    accuracy["kv_ratio"] = manifest.kv_ratio
    checks = accuracy_checks(accuracy, settings)
    seconds["accuracy"] += time.perf_counter() - phase
    ids, mask = parity_batch(windows)
    reference_run = parity_run(TorchBackend(folded), ids, mask, settings.generate_steps, manifest=manifest) \
        if available else None
    effect = quantization_effect(folded, reference_run, ids, mask, settings.generate_steps) \
        if available and manifest.kv_dtype else None
    time_backend("pytorch compressed", TorchBackend(folded))
    del folded

    backends = {}
    for factory, name, timed_as in engines:
        backend = factory()
        if name is not None:
            log.info("[validate] parity: %s", name)
            phase = time.perf_counter()
            run = parity_run(backend, ids, mask, settings.generate_steps, token=reference_run["token"],
                             manifest=manifest)
            backends[name] = parity_numbers(reference_run, run, mask)
            if effect is not None:
                backends[name]["quantization_effect"] = effect
            checks += parity_checks(name, backends[name], settings, effect)
            seconds[f"parity: {name}"] += time.perf_counter() - phase
        if timed_as is not None:
            time_backend(timed_as, backend)
        del backend
    seconds["total"] = time.perf_counter() - started
    report = _assemble(layout, manifest, io, build, settings, accuracy, sweep, backends, skipped, latency, checks,
                       device, {k: round(v, 1) for k, v in seconds.items()}, baseline_note)
    report["inputs"] = report_inputs(layout, settings)
    return json.loads(json.dumps(write_report(out, report)))     # as a later read_report returns it: JSON types


def _sweep(manifest, original, windows, ratios, calib_dir: Path, device: str) -> list[dict]:
    """Perplexity at other KV ratios, folded in memory from the same calibration (for the plot)."""
    if not ratios:
        return []
    if not (calib_dir / CALIB_JSON).exists():
        raise EigenExportError(f"[validate] sweep needs the calibration in {calib_dir}: run `eigen-export calibrate` "
                               "or remove `sweep` from the recipe")
    layers, calib = read_calibration(calib_dir)
    config = load_hf_config(manifest.source)
    points = []
    for target in ratios:
        # the folded model's cache dtype too: the plot compares rank cuts of the deployed kind
        kv_bits = manifest.calibration.get("allocation", {}).get("kv_bits") if manifest.kv_dtype == "mixed" else None
        ranks, _, found, state = fold_to_target(original, layers, calib.rope_mode, target,
                                                rank_multiple=calib.rank_multiple, rotate=manifest.kv_rotation,
                                                kv_bits=kv_bits, latents=calib.latents)
        model = build_decoder(config, state, ranks, calib.rope_mode, device=device, kv_dtype=manifest.kv_dtype,
                              kv_layout=found.get("kv_layout"), latents=calib.latents)
        ppl = perplexity(TorchBackend(model), windows, batch_size=2)
        points.append({"target": target, "kv_ratio": kv_ratio([(r.k, r.v) for r in ranks], manifest.latent_width),
                       "perplexity": ppl})
        log.info("[validate] sweep: KV ratio %.3f -> perplexity %.2f", points[-1]["kv_ratio"], ppl)
    return points


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).exists() else 0


def _assemble(layout, manifest, io, build, settings, accuracy, sweep, backends, skipped, latency, checks, device,
              seconds, baseline_note) -> dict:
    itemsize = dtype_of(io.dtype).torch.itemsize
    h_kv, d = manifest.num_kv_heads, manifest.head_dim
    memory = {"kv_bytes_per_token_original": kv_bytes_per_token([(d, d)] * manifest.num_layers, h_kv, itemsize),
              "kv_bytes_per_token_compressed": kv_bytes_per_token([tuple(r) for r in manifest.ranks],
                                                                  manifest.cache_heads, itemsize,
                                                                  manifest.kv_dtype, manifest.kv_layout),
              # the original's cache is in the export dtype; the compressed one's codes + fp16 scales if quantized
              "kv_dtype": io.dtype if manifest.kv_dtype is None else f"{manifest.kv_dtype} + fp16 scales", "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and device.startswith("cuda"):
        memory["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    failed = [c for c in checks if not c.passed]
    return {
        "model": layout.root.name, "source": manifest.source,
        "folded_sha256": manifest.weights_sha256,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "versions": versions(), "machine": machine(), "device": device,
        "settings": dataclasses.asdict(settings),
        "compression": {"kv_ratio": manifest.kv_ratio, "rope_mode": manifest.rope_mode, "ranks": manifest.ranks,
                        "kv_dtype": manifest.kv_dtype, "kv_rotation": manifest.kv_rotation,
                        "kv_layout": manifest.kv_layout, "latents": manifest.latents,
                        "num_layers": manifest.num_layers, "num_heads": manifest.num_heads,
                        "num_kv_heads": h_kv, "head_dim": d},
        "engine": {"backend": build["backend"], "dir": str(layout.engine), "note": _engine_note(build),
                   "baseline_note": baseline_note},
        "accuracy": accuracy, "sweep": sweep, "backends": backends, "skipped": skipped, "latency": latency,
        "memory": memory,
        "sizes_bytes": {"folded": dir_bytes(layout.folded), "onnx": dir_bytes(layout.onnx),
                        "engine": dir_bytes(layout.engine), "baseline_engine": dir_bytes(layout.baseline_engine)},
        "checks": [c.record() for c in checks],
        "verdict": "fail" if failed else "pass", "failed": len(failed), "passed": len(checks) - len(failed),
        "seconds": seconds,
    }


def _engine_note(build: dict) -> str | None:
    """DESIGN 7: where TensorRT could not build, the report says so instead of implying an engine exists."""
    if build["backend"] != "onnxruntime":
        return None
    reason = tensorrt_unavailable()
    return (f"No TensorRT engine: {reason} on the machine that validated; the engine is the ONNX Runtime session."
            if reason else "The engine is the ONNX Runtime session (built with --backend onnxruntime).")
