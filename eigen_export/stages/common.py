"""The one rule every stage follows for its output directory (DESIGN 1)."""
from __future__ import annotations

import logging
from pathlib import Path

from ..artifacts.records import refuse_existing

log = logging.getLogger("eigen_export")


def must_make(stage: str, out: Path, current: bool, force: bool, replace_stale: bool, what: str) -> bool:
    """Whether `stage` has to (re)make `out`.

    An output is current when its record holds the requested settings and its inputs' hashes (each stage's
    `is_current`): it is kept unless `force`. Anything else already at `out` is replaced only with `force`
    or `replace_stale` (`make engine` owns build/<name>/ and replaces what a change upstream made stale);
    otherwise the user is told before any work starts (`what` the output would be: "an export of this model").
    """
    if current and not force:
        log.info("[%s] skipped: %s is current (pass --force to redo it)", stage, out)
        return False
    if not (force or replace_stale):
        refuse_existing(out, f" and is not {what} with these settings")
    return True
