"""tests/helpers/shared.py: what the xdist workers share is built once, and a failed build is not trusted."""
import multiprocessing
from pathlib import Path

import pytest

from tests.helpers.shared import DONE, built_once, run_root


class _Factory:
    """The one tmp_path_factory method built_once uses, picklable for a spawned process. Under xdist the run's
    root is the parent of the base: base is a folder inside the test's own tmp_path either way."""

    def __init__(self, tmp_path):
        self.base = tmp_path / "base"

    def getbasetemp(self):
        return self.base


def _count_and_wait(path):
    import time

    with open(path.parent.parent / "calls", "a") as f:
        f.write("x")
    time.sleep(0.5)                 # a second caller arrives while this one is building
    (path / "out").write_text("made")


def _build(base):
    return str(built_once(_Factory(Path(base)), "shared/thing", _count_and_wait))


def test_two_processes_build_once_and_see_the_same_result(tmp_path):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        paths = pool.map(_build, [tmp_path, tmp_path])
    assert paths[0] == paths[1] and (Path(paths[0]) / "out").read_text() == "made"
    assert (run_root(_Factory(tmp_path)) / "calls").read_text() == "x"


def test_a_build_that_failed_is_made_again(tmp_path):
    def broken(path):
        (path / "half").write_text("written before the failure")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError):
        built_once(_Factory(tmp_path), "thing", broken)
    assert not (run_root(_Factory(tmp_path)) / "thing" / DONE).exists()
    path = built_once(_Factory(tmp_path), "thing", lambda p: (p / "out").write_text("made"))
    assert sorted(q.name for q in path.iterdir()) == [DONE, "out"]     # the failed attempt's file is gone
