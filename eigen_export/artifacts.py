"""Stage outputs are whole directories: written beside the target, renamed into place when complete."""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

from .errors import EigenExportError


@contextlib.contextmanager
def atomic_dir(target: str | Path, force: bool = False):
    """Yield a temp directory that replaces `target` only if the block finishes without error.

    An existing target is kept untouched unless `force`; then it is swapped out only after the new
    one is complete, so a crash never leaves a half-written artifact that a later stage would trust.
    """
    target = Path(target)
    if target.exists() and not force:
        raise EigenExportError(f"{target} already exists: pass --force to replace it or choose another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{tmp.name[-8:]}")
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_json_record(path: str | Path, missing_fix: str, corrupt_fix: str) -> dict:
    """A stage's JSON record as a dict, with one-line errors that say which command remakes it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EigenExportError(f"{path} not found: {missing_fix}") from None
    except json.JSONDecodeError as e:
        raise EigenExportError(f"{path} is not valid JSON ({e}): {corrupt_fix}") from None
    if not isinstance(data, dict):
        raise EigenExportError(f"{path} must hold a JSON object: {corrupt_fix}")
    return data
