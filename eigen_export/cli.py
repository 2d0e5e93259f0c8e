"""eigen-export: one verb per stage; flags are the stage function's keyword arguments (STYLE 10).

Heavy imports happen inside each verb so that --help is instant.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import EigenExportError

log = logging.getLogger("eigen_export")


def _calib_flags(p):
    p.add_argument("--dataset", default="ptb", help="ptb | wikitext2 | c4 | path/to/file.txt (default: ptb)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rope-mode", choices=("pre", "post"), default="pre",
                   help="RoPE models: basis before (paper, default) or after rotation (faster decode, but on "
                        "SmolLM2 it did not hold past the calibration length)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--error-samples", type=int, default=2, help="samples used for the block-error curves")
    p.add_argument("--rank-multiple", type=int, default=1, help="round ranks up to a multiple (kernel efficiency)")


def _fold_flags(p):
    p.add_argument("--kv-ratio", type=float, help="fraction of the original KV cache to keep, e.g. 0.7")
    p.add_argument("--error-budget", type=float, help="per-layer relative block-output error budget instead")
    p.add_argument("--allocation", choices=("energy", "error", "update_error"), default="energy",
                   help="how --kv-ratio spreads ranks over layers: one energy threshold (default) or the "
                        "smallest worst-layer calibrated block error")


def _run_flags(p):
    p.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16")
    p.add_argument("--device", default="cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eigen-export", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("-q", "--quiet", action="store_true")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("calibrate", help="measure bases and error curves (writes calib/)")
    p.add_argument("model", help="recipe name, local HF directory or hub id")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    _calib_flags(p)
    _run_flags(p)

    p = verbs.add_parser("fold", help="choose ranks and fold the bases into the weights (writes folded/)")
    p.add_argument("model")
    p.add_argument("--calib", required=True, help="directory written by `calibrate`")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p.add_argument("--dtype", default="float32")
    _fold_flags(p)

    p = verbs.add_parser("compress", help="calibrate + fold into OUT/calib and OUT/folded")
    p.add_argument("model")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    _calib_flags(p)
    _fold_flags(p)
    _run_flags(p)

    p = verbs.add_parser("merge-heads", help="merge KV heads, MHA -> GQA, from calibration caches (writes a GQA model)")
    p.add_argument("model")
    p.add_argument("--out", required=True)
    p.add_argument("--kv-heads", type=int, required=True, help="KV heads to keep (a divisor of the current count)")
    p.add_argument("--merge-method", choices=("svd", "mean"), default="svd",
                   help="svd: eigenvectors of the group caches (default); mean: mean-pool baseline")
    p.add_argument("--dataset", default="ptb")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--force", action="store_true")
    _run_flags(p)

    p = verbs.add_parser("export", help="export a folded or original model to ONNX (writes onnx/model.onnx, io.json)")
    p.add_argument("model", help="folded directory, original HF directory or recipe name")
    p.add_argument("--out", help="ONNX directory (default: onnx/ beside folded/, else MODEL/onnx)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="fp16/bf16 keep softmax and norms in fp32 (default: fp32)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--no-plugin", dest="plugin", action="store_false",
                   help="skip model_plugin.onnx (the graph whose attention cores are plugin nodes, for TensorRT)")
    p.add_argument("--force", action="store_true")

    p = verbs.add_parser("build", help="build the engine from an ONNX export (TensorRT plan, or the ONNX Runtime "
                                       "session where TensorRT or a GPU is missing; writes engine/)")
    p.add_argument("model", help="ONNX export directory, or the build/<name> or folded directory it belongs to")
    p.add_argument("--out", help="engine directory (default: engine/ beside onnx/)")
    p.add_argument("--backend", choices=("auto", "tensorrt", "onnxruntime"), default="auto",
                   help="auto: TensorRT where it is installed and a CUDA GPU is present, else ONNX Runtime")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-context", type=int, default=4096, help="past + new tokens the engine accepts")
    p.add_argument("--force", action="store_true")

    p = verbs.add_parser("perplexity", help="perplexity of a folded or original model on held-out text")
    p.add_argument("model")
    p.add_argument("--dataset", default="ptb")
    p.add_argument("--split", default="test")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    _run_flags(p)

    p = verbs.add_parser("generate", help="generate text with a folded or original model")
    p.add_argument("model")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch (left padded)")
    p.add_argument("--backend", choices=("auto", "torch", "onnxruntime", "tensorrt"), default="auto",
                   help="auto: a build/<name> directory runs its engine, a model directory runs in PyTorch; "
                        "onnxruntime/tensorrt run the export/engine (their dtype applies, not --dtype)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    _run_flags(p)

    p = verbs.add_parser("validate", help="parity report: accuracy, backend parity, latency (writes report/)")
    p.add_argument("build", help="build/<name> directory holding folded/, onnx/ and engine/")
    p.add_argument("--recipe", help="recipe whose [validate] settings apply (default: the directory's name, "
                                    "else the defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one [validate] setting, e.g. --set backend_max_abs=1e-2 (repeatable)")
    p.add_argument("--out", help="report directory (default: BUILD/report)")
    p.add_argument("--device", default=None, help="torch device for the PyTorch side (default: the recipe's)")
    p.add_argument("--force", action="store_true", help="replace a report of another model")

    p = verbs.add_parser("engine", help="every stage for a recipe, skipping stages whose outputs are current")
    p.add_argument("model", help="recipe name (models/<name>.toml) or local HF directory")
    p.add_argument("--build-dir", default="build")
    p.add_argument("--force", action="store_true")
    p.add_argument("--device", default=None, help="torch device for calibration and validation "
                                                  "(default: the recipe's, auto = CUDA when available)")
    return parser


def _fold_target(args):
    if args.kv_ratio is None and args.error_budget is None:
        args.kv_ratio = 0.7
    return args.kv_ratio, args.error_budget


def _calibrate_kwargs(args) -> dict:
    return dict(dataset=args.dataset, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                rope_mode=args.rope_mode, dtype=args.dtype, device=args.device, batch_size=args.batch_size,
                error_samples=args.error_samples, rank_multiple=args.rank_multiple, force=args.force)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s")
    try:
        return _dispatch(args) or 0
    except EigenExportError as e:
        print(f"eigen-export: error: {e}", file=sys.stderr)
        return 2


def _dispatch(args):
    from .recipes import resolve_model

    if args.verb == "engine":
        from .engine import run_engine

        return run_engine(args.model, build_dir=Path(args.build_dir), force=args.force, device=args.device)
    if args.verb == "validate":
        return _validate(args)
    source = resolve_model(args.model)
    if args.verb == "calibrate":
        from .calibrate import run_calibrate

        run_calibrate(source, args.out, **_calibrate_kwargs(args))
        print(f"calibration written to {args.out}")
    elif args.verb == "fold":
        from .fold import run_fold

        kv, budget = _fold_target(args)
        manifest = run_fold(source, args.calib, args.out, kv, budget, dtype=args.dtype, force=args.force,
                            allocation=args.allocation)
        print(f"folded model written to {args.out}: KV ratio {manifest.kv_ratio:.3f}")
    elif args.verb == "compress":
        from .calibrate import run_calibrate
        from .fold import run_fold

        out = Path(args.out)
        run_calibrate(source, out / "calib", **_calibrate_kwargs(args))
        kv, budget = _fold_target(args)
        manifest = run_fold(source, out / "calib", out / "folded", kv, budget, force=args.force,
                            allocation=args.allocation)
        print(f"folded model written to {out / 'folded'}: KV ratio {manifest.kv_ratio:.3f}")
    elif args.verb == "merge-heads":
        from .merge import run_merge

        record = run_merge(source, args.out, args.kv_heads, method=args.merge_method, dataset=args.dataset,
                           nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, batch_size=args.batch_size,
                           dtype=args.dtype, device=args.device, force=args.force, progress=not args.quiet)
        print(f"merged model written to {args.out}: {record['kv_heads_before']} -> {record['kv_heads']} KV heads")
    elif args.verb == "export":
        from .export import export_onnx

        out = export_onnx(source, args.out, dtype=args.dtype, opset=args.opset, force=args.force, plugin=args.plugin)
        print(f"ONNX export written to {out}")
    elif args.verb == "build":
        from .build import build, read_build
        from .export import find_onnx_dir

        out = build(find_onnx_dir(source), args.out, backend=args.backend, max_batch=args.max_batch,
                    max_context=args.max_context, force=args.force)
        print(f"engine written to {out} ({read_build(out)['backend']})")
    elif args.verb == "perplexity":
        print(json.dumps(_perplexity(source, args)))
    elif args.verb == "generate":
        _generate(source, args)


def _validate(args) -> int:
    from .recipes import ValidationSettings, find_recipe, resolve_device
    from .validate import validate

    recipe = find_recipe(args.recipe or Path(args.build).resolve().name)
    if args.recipe and recipe is None:
        raise EigenExportError(f"--recipe {args.recipe}: no models/{args.recipe}.toml")
    settings = override_settings(recipe.validation if recipe else ValidationSettings(), args.set)
    device = resolve_device(args.device or (recipe.device if recipe else "auto"))
    report = validate(args.build, settings, out=args.out, device=device, force=args.force)
    out = Path(args.out) if args.out else Path(args.build) / "report"
    print(f"parity report {report['verdict'].upper()}: {report['passed']} passed, {report['failed']} failed"
          f"{', ' + str(len(report['skipped'])) + ' backend(s) skipped' if report['skipped'] else ''} -> "
          f"{out / 'report.md'}")
    return 0 if report["verdict"] == "pass" else 1


def override_settings(settings, assignments: list[str]):
    """--set key=value on a frozen settings dataclass; values are parsed as the field's current type."""
    import dataclasses

    known = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    changes = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep or key not in known:
            raise EigenExportError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(known)}")
        current = known[key]
        try:
            if isinstance(current, tuple):
                changes[key] = tuple(type(current[0] if current else 0.0)(v) for v in text.split(",") if v)
            else:
                changes[key] = type(current)(text)
        except ValueError:
            raise EigenExportError(f"--set {item!r}: {text!r} is not a {type(current).__name__}") from None
    return dataclasses.replace(settings, **changes)


def _tokenizer(source):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as e:
        raise EigenExportError(f"no tokenizer in {source} ({str(e).splitlines()[0]}): "
                               "fold with a model directory that has one") from None


def _perplexity(source, args) -> dict:
    from . import load
    from .data import eval_windows
    from .runtime import TorchBackend, perplexity

    model = load(source, dtype=args.dtype, device=args.device)
    windows = eval_windows(_tokenizer(source), args.dataset, args.seqlen, split=args.split,
                           max_windows=args.max_windows)
    ppl = perplexity(TorchBackend(model), windows, batch_size=args.batch_size, progress=True)
    return {"model": str(source), "dataset": args.dataset, "split": args.split, "seqlen": args.seqlen,
            "windows": int(windows.shape[0]), "perplexity": round(ppl, 4)}


def _generation_backend(source, args):
    """(backend, directory with the tokenizer) for MODEL: a build/<name> directory (its folded model, export
    and engine), a folded or original model directory, or an ONNX export / engine directory."""
    from .build import BUILD_JSON, read_build
    from .export import IO_JSON, find_onnx_dir, read_io
    from .fold import MANIFEST

    path = Path(source)
    folded = path / "folded" if (path / "folded" / MANIFEST).exists() else path
    engine = path / "engine" if (path / "engine" / BUILD_JSON).exists() else path
    built = read_build(engine)["backend"] if (engine / BUILD_JSON).exists() else None
    backend = args.backend if args.backend != "auto" else built or "torch"
    if backend == "torch":
        from . import load
        from .runtime import TorchBackend

        return TorchBackend(load(folded, dtype=args.dtype, device=args.device)), folded
    if backend == "tensorrt":
        from .runtime import TensorRTBackend

        if built != "tensorrt":
            raise EigenExportError(f"no TensorRT engine for {source}: run `eigen-export build --backend tensorrt` "
                                   "on a machine with an NVIDIA GPU and TensorRT")
        runner = TensorRTBackend(engine)
    else:
        from .runtime import OnnxRuntimeBackend

        runner = OnnxRuntimeBackend(engine if built == "onnxruntime" else find_onnx_dir(source), threads=args.threads)
    tokenizer_dir = folded if (folded / MANIFEST).exists() or not (path / IO_JSON).exists() else \
        read_io(path)["source"]
    return runner, tokenizer_dir


class _Streamer:
    """Prints each new token's text. Decoding the whole continuation and printing what it added keeps the
    spaces that BPE/SentencePiece tokenizers attach to the next token (decoding one token drops them)."""

    def __init__(self, tokenizer, prompt_ids: list[int]):
        # the prompt is decoded too: the first new token's leading space only shows after it
        self.tokenizer, self.tokens = tokenizer, list(prompt_ids)
        self.shown = tokenizer.decode(self.tokens, skip_special_tokens=True)

    def __call__(self, token):
        self.tokens.append(int(token[0]))
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        print(text[len(self.shown):] if text.startswith(self.shown) else text, end="", flush=True)
        self.shown = text


def _generate(source, args) -> None:
    from .runtime import generate

    backend, tokenizer_dir = _generation_backend(source, args)
    tokenizer = _tokenizer(tokenizer_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:     # padded positions are masked out: any token id will do
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)
    batch = tokenizer(args.prompt, return_tensors="pt", padding=True)
    single = len(args.prompt) == 1
    stream = _Streamer(tokenizer, batch["input_ids"][0].tolist()) if single else None
    if single:
        print(args.prompt[0], end="", flush=True)
    tokens = generate(backend, batch["input_ids"], batch["attention_mask"],
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed, on_token=stream,
                      stop_tokens=(tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else (),
                      pad_token_id=tokenizer.pad_token_id or 0)
    if single:
        print()
    else:
        for prompt, row in zip(args.prompt, tokens):
            print(prompt + tokenizer.decode(row, skip_special_tokens=True))


if __name__ == "__main__":
    sys.exit(main())
