"""What every record shares: whole directories written beside the target and renamed into place when complete,
JSON read with one-line errors, a format name and version checked on load, content hashes."""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from ..errors import EigenExportError


@contextlib.contextmanager
def atomic_dir(target: str | Path, force: bool = False):
    """Yield a temp directory that replaces `target` only if the block finishes without error.

    An existing target is kept untouched unless `force`; then it is swapped out only after the new
    one is complete, so a crash never leaves a half-written artifact that a later stage would trust.
    """
    target = Path(target)
    if not force:
        refuse_existing(target)
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


def refuse_existing(target: str | Path, what: str = "") -> None:
    """Say before minutes of work, not after, that `target` holds something a stage may not replace."""
    if Path(target).exists():
        raise EigenExportError(f"{target} already exists{what}: pass --force to replace it or choose another --out")


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


def check_format(data: dict, path: str | Path, fmt: str, version: int, remake: str) -> dict:
    """A record of another kind, or written by another version of eigen_export, is refused in one line that
    names the command (`remake`) that writes it anew."""
    if data.get("format") != fmt:
        raise EigenExportError(f"{path} is not an {fmt} record (format {data.get('format')!r}): {remake}")
    if data.get("version") != version:
        raise EigenExportError(f"{path} is version {data.get('version')}, this eigen_export reads version "
                               f"{version}: {remake}")
    return data


def write_json(path: Path, data: dict, indent: int | None = 1) -> None:
    path.write_text(json.dumps(data, indent=indent) + "\n")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
