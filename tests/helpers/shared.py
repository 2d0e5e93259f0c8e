"""Artifacts made once per test run, however many pytest-xdist workers share it (`make test` runs two).

Each worker is its own process with its own session fixtures; what they build on disk (a SmolLM2 fold, a tiny
model's export) is shared through the run's common temporary folder instead, the first worker to need it
building it under a file lock while the others wait and then reuse it.
"""
import os
import shutil
from pathlib import Path
from typing import Callable

from filelock import FileLock

DONE = ".complete"


def run_root(tmp_path_factory) -> Path:
    """The folder every worker of this run sees: pytest-N/ (a worker's own base temp is pytest-N/popen-gwK/)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """run_root/name, made by make(path) the first time any worker asks for it in this run.

    A make() that raised leaves no DONE marker: the next caller removes its remains and makes it again."""
    path = run_root(tmp_path_factory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        if not (path / DONE).exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            make(path)
            (path / DONE).touch()
    return path
