"""eigen-export: one verb per stage; flags map onto the stage's settings object (settings.py) in one place,
`_settings`, so each setting keeps the one default and the one validation its dataclass gives it (STYLE 10)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from .artifacts.engine import read_build
from .artifacts.folded import load_model
from .artifacts.layout import REPORT_DIR, REPORT_MD, engine_of, folded_of, is_engine, is_folded, is_onnx_export
from .artifacts.onnx_io import read_io
from .backends import OnnxRuntimeBackend, TensorRTBackend, TorchBackend, generate, perplexity
from .data import eval_windows
from .errors import EigenExportError
from .loading import load_hf_config, load_tokenizer
from .machine import return_freed_memory
from .pipeline import run_engine
from .settings import (BuildSettings, CalibrationSettings, ExportSettings, FoldSettings, MergeSettings,
                       ValidationSettings, find_recipe, override, resolve_device, resolve_model)
from .stages.build import run_build
from .stages.calibrate import run_calibrate
from .stages.export import find_onnx_dir, run_export
from .stages.fold import run_fold
from .stages.merge import run_merge
from .stages.validate import run_validate

log = logging.getLogger("eigen_export")
UNSET = argparse.SUPPRESS       # a flag not given leaves its setting to the settings dataclass


def _default(cls, name: str) -> str:
    """The dataclass's default, for --help: the flag itself has none."""
    return f"(default: {next(f.default for f in dataclasses.fields(cls) if f.name == name)})"


def _calib_flags(p):
    c = CalibrationSettings
    p.add_argument("--dataset", default=UNSET,
                   help="ptb | pycode (Python's stdlib source) | wikitext2 | c4 | path/to/file.txt, or a mix with "
                        f"equal shares, e.g. ptb+pycode {_default(c, 'dataset')}")
    p.add_argument("--nsamples", type=int, default=UNSET, help=_default(c, "nsamples"))
    p.add_argument("--seqlen", type=int, default=UNSET, help=_default(c, "seqlen"))
    p.add_argument("--seed", type=int, default=UNSET, help=_default(c, "seed"))
    p.add_argument("--rope-mode", default=UNSET,
                   help="RoPE models: pre (basis before rotation, the paper; exact at every position) or post "
                        "(faster decode, but on SmolLM2 it needs many more key dimensions for the same perplexity) "
                        f"{_default(c, 'rope_mode')}")
    p.add_argument("--basis", default=UNSET,
                   help="loss (bases fitted to keep the calibration loss, weighted by its gradients) or energy (the "
                        f"paper's eigenbases of the K(+Q) and V Grams) {_default(c, 'basis')}")
    p.add_argument("--grad-samples", type=int, default=UNSET,
                   help="samples (of --nsamples) the loss gradients are measured on; each costs a backward pass "
                        f"and keeps every layer's input {_default(c, 'grad_samples')}")
    p.add_argument("--rope-positions", type=int, default=UNSET,
                   help="post mode: the key basis is fitted to keys and queries turned to every position below this "
                        "(default: the model's max context); 0 fits the calibration windows' positions only")
    p.add_argument("--batch-size", type=int, default=UNSET, help=_default(c, "batch_size"))
    p.add_argument("--error-samples", type=int, default=UNSET,
                   help="samples for the block-error curves that --allocation error / --error-budget read; 0 "
                        f"measures none {_default(c, 'error_samples')}")
    p.add_argument("--rank-multiple", type=int, default=UNSET,
                   help=f"round ranks up to a multiple (kernel efficiency) {_default(c, 'rank_multiple')}")
    p.add_argument("--latents", default=UNSET,
                   help="heads (a latent per KV head), joint (one latent per layer side over all its KV heads, "
                        "ranks up to H_kv x head_dim: half the perplexity cost on SmolLM2, attention FLOPs grow "
                        "with the latent width; pre mode / no RoPE, loss basis) or auto (joint where H_kv x "
                        f"head_dim <= 256 and the other settings allow it) {_default(c, 'latents')}")


def _fold_flags(p):
    p.add_argument("--kv-ratio", type=float, default=UNSET,
                   help=f"fraction of the original KV cache to keep {_default(FoldSettings, 'kv_ratio')}")
    p.add_argument("--error-budget", type=float, default=UNSET,
                   help="per-layer relative block-output error budget instead")
    p.add_argument("--allocation", default=UNSET,
                   help="how --kv-ratio spreads ranks over layers and K/V: loss (drop the directions that cost the "
                        "calibration loss least), energy (one energy threshold) or error / update_error (the "
                        "smallest worst-layer calibrated block error; calibrate with --error-samples) "
                        f"{_default(FoldSettings, 'allocation')}")
    p.add_argument("--kv-dtype", choices=("int8", "int4", "mixed"), default=UNSET,
                   help="quantize the latent cache per token (one fp16 scale per vector); mixed: 8, 4 or 2 bits per "
                        "latent number by the calibrated spectrum, --kv-bits on average (default: the model's dtype)")
    p.add_argument("--kv-bits", type=float, default=UNSET,
                   help="with --kv-dtype mixed: mean bits per cached number (default: 4, the bytes of int4)")
    p.add_argument("--no-kv-rotation", dest="kv_rotation", action="store_false", default=UNSET,
                   help="with --kv-dtype int8: do not fold the outlier-spreading rotation into the bases (int4 and "
                        "mixed codes need it)")


def _run_flags(p):
    p.add_argument("--dtype", default=UNSET, help="float32 | float16 | bfloat16 (default: float32)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda (default: auto)")


def _settings(cls, args, **renamed):
    """The settings object of a verb from the flags given (argparse names, or `renamed` {field: flag attr})."""
    names = {f.name: renamed.get(f.name, f.name) for f in dataclasses.fields(cls)}
    given = {field: getattr(args, attr) for field, attr in names.items() if hasattr(args, attr)}
    if cls is FoldSettings:
        return FoldSettings.target(**given)
    return cls(**given)


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
    p.add_argument("--dtype", default=UNSET, help="float32 | float16 | bfloat16 (default: float32)")
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
    p.add_argument("--merge-method", default=UNSET,
                   help="svd: eigenvectors of the group caches; mean: mean-pool baseline "
                        f"{_default(MergeSettings, 'method')}")
    for flag in ("--nsamples", "--seqlen", "--seed", "--batch-size"):
        p.add_argument(flag, type=int, default=UNSET)
    p.add_argument("--dataset", default=UNSET)
    p.add_argument("--force", action="store_true")
    _run_flags(p)

    p = verbs.add_parser("export", help="export a folded or original model to ONNX (writes onnx/model.onnx, io.json)")
    p.add_argument("model", help="folded directory, original HF directory or recipe name")
    p.add_argument("--out", help="ONNX directory (default: onnx/ beside folded/, else MODEL/onnx)")
    p.add_argument("--dtype", default=UNSET,
                   help="fp32 | fp16 | bf16; fp16/bf16 keep softmax and norms in fp32 "
                        f"{_default(ExportSettings, 'dtype')}")
    p.add_argument("--opset", type=int, default=UNSET, help=_default(ExportSettings, "opset"))
    p.add_argument("--no-plugin", dest="plugin", action="store_false", default=UNSET,
                   help="skip model_plugin.onnx (the graph whose attention cores are plugin nodes, for TensorRT)")
    p.add_argument("--force", action="store_true")

    p = verbs.add_parser("build", help="build the engine from an ONNX export (TensorRT plan, or the ONNX Runtime "
                                       "session where TensorRT or a GPU is missing; writes engine/)")
    p.add_argument("model", help="ONNX export directory, or the build/<name> or folded directory it belongs to")
    p.add_argument("--out", help="engine directory (default: engine/ beside onnx/)")
    p.add_argument("--backend", default=UNSET, help="auto: TensorRT where it is installed and a CUDA GPU is present, "
                                                    "else ONNX Runtime | tensorrt | onnxruntime (default: auto)")
    p.add_argument("--max-batch", type=int, default=UNSET, help=_default(BuildSettings, "max_batch"))
    p.add_argument("--max-context", type=int, default=UNSET,
                   help=f"past + new tokens the engine accepts {_default(BuildSettings, 'max_context')}")
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
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip exporting and building the uncompressed model (the report's baseline engine): "
                        "for machines short of disk")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s")
    return_freed_memory()
    try:
        return _dispatch(args) or 0
    except EigenExportError as e:
        print(f"eigen-export: error: {e}", file=sys.stderr)
        return 2


def _dispatch(args):
    if args.verb == "engine":
        return run_engine(args.model, build_dir=Path(args.build_dir), force=args.force, device=args.device,
                          baseline=args.baseline)
    if args.verb == "validate":
        return _validate(args)
    # every setting is checked before a model is resolved or loaded
    if args.verb in ("calibrate", "compress"):
        calib = _settings(CalibrationSettings, args)
    if args.verb in ("fold", "compress"):
        fold = _settings(FoldSettings, args)
    if args.verb == "merge-heads":
        merge = _settings(MergeSettings, args, method="merge_method")
    if args.verb == "export":
        export = _settings(ExportSettings, args)
    if args.verb == "build":
        build = _settings(BuildSettings, args)
    source = resolve_model(args.model)
    if args.verb == "calibrate":
        run_calibrate(source, args.out, calib, device=args.device, force=args.force)
        print(f"calibration written to {args.out}")
    elif args.verb == "fold":
        manifest = run_fold(source, args.calib, args.out, fold, force=args.force)
        print(f"folded model written to {args.out}: KV ratio {manifest.kv_ratio:.3f}")
    elif args.verb == "compress":
        out = Path(args.out)
        run_calibrate(source, out / "calib", calib, device=args.device, force=args.force)
        manifest = run_fold(source, out / "calib", out / "folded", fold, force=args.force)
        print(f"folded model written to {out / 'folded'}: KV ratio {manifest.kv_ratio:.3f}")
    elif args.verb == "merge-heads":
        record = run_merge(source, args.out, merge, device=args.device, force=args.force, progress=not args.quiet)
        print(f"merged model written to {args.out}: {record['kv_heads_before']} -> {record['kv_heads']} KV heads")
    elif args.verb == "export":
        print(f"ONNX export written to {run_export(source, export, args.out, force=args.force)}")
    elif args.verb == "build":
        out = run_build(find_onnx_dir(source), build, args.out, force=args.force)
        print(f"engine written to {out} ({read_build(out)['backend']})")
    elif args.verb == "perplexity":
        print(json.dumps(_perplexity(source, args)))
    elif args.verb == "generate":
        _generate(source, args)


def _validate(args) -> int:
    recipe = find_recipe(args.recipe or Path(args.build).resolve().name)
    if args.recipe and recipe is None:
        raise EigenExportError(f"--recipe {args.recipe}: no models/{args.recipe}.toml")
    settings = override(recipe.validation if recipe else ValidationSettings(), args.set)
    device = resolve_device(args.device or (recipe.device if recipe else "auto"))
    report = run_validate(args.build, settings, out=args.out, device=device, force=args.force, measure_again=True)
    out = Path(args.out) if args.out else Path(args.build) / REPORT_DIR
    print(f"parity report {report['verdict'].upper()}: {report['passed']} passed, {report['failed']} failed"
          f"{', ' + str(len(report['skipped'])) + ' backend(s) skipped' if report['skipped'] else ''} -> "
          f"{out / REPORT_MD}")
    return 0 if report["verdict"] == "pass" else 1


def _perplexity(source, args) -> dict:
    load_hf_config(source)          # a directory without a model is a one-line error before anything loads
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype=getattr(args, "dtype", "float32"), device=resolve_device(args.device))
    windows = eval_windows(tokenizer, args.dataset, args.seqlen, split=args.split, max_windows=args.max_windows)
    ppl = perplexity(TorchBackend(model), windows, batch_size=args.batch_size, progress=True)
    return {"model": str(source), "dataset": args.dataset, "split": args.split, "seqlen": args.seqlen,
            "windows": int(windows.shape[0]), "perplexity": round(ppl, 4)}


def _generation_backend(source, args):
    """(backend, directory with the tokenizer) for MODEL: a build/<name> directory (its folded model, export
    and engine), a folded or original model directory, or an ONNX export / engine directory."""
    path = Path(source)
    folded, engine = folded_of(path), engine_of(path)
    built = read_build(engine)["backend"] if is_engine(engine) else None
    backend = args.backend if args.backend != "auto" else built or "torch"
    if backend == "torch":
        load_hf_config(folded)      # a directory without a model is a one-line error before anything loads
        return TorchBackend(load_model(folded, dtype=getattr(args, "dtype", "float32"),
                                       device=resolve_device(args.device))), folded
    if backend == "tensorrt":
        if built != "tensorrt":
            raise EigenExportError(f"no TensorRT engine for {source}: run `eigen-export build --backend tensorrt` "
                                   "on a machine with an NVIDIA GPU and TensorRT")
        runner = TensorRTBackend(engine)
    else:
        runner = OnnxRuntimeBackend(engine if built == "onnxruntime" else find_onnx_dir(source), threads=args.threads)
    tokenizer_dir = folded if is_folded(folded) or not is_onnx_export(path) else Path(read_io(path).source)
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
    backend, tokenizer_dir = _generation_backend(source, args)
    tokenizer = load_tokenizer(tokenizer_dir)
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
