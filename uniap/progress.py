"""Progress of a long plan search, as log lines.

The planner writes one line per program solved and, while HiGHS works on one, every few
seconds (``progress_interval_s``) the candidate, the incumbent (best time per iteration found
in this program), the bound (no assignment of this candidate is faster) and the gap. Lines
go to the ``uniap.progress`` logger at INFO, so they show wherever INFO logging is on::

    logging.basicConfig(level=logging.INFO)            # everything uniap decides, progress too
    logging.getLogger("uniap.progress").setLevel(logging.INFO)   # or just the progress

``uniap.plan(..., progress=True)`` shows them on stderr without configuring logging; the
``uniap`` command line prints them unless ``-q``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Callable, Iterator

__all__ = ["LOGGER_NAME", "progress_lines", "solve_progress"]

LOGGER_NAME = "uniap.progress"
log = logging.getLogger(LOGGER_NAME)


@contextlib.contextmanager
def progress_lines(
    progress: Callable[[str], None] | bool | None,
) -> Iterator[Callable[[str], None] | None]:
    """The function that emits one progress line, or None when nobody would see it.

    ``progress``: None/False: the ``uniap.progress`` logger alone (if INFO is enabled for it);
    True: that logger, shown on stderr for this call when it has no handler; a callable: the
    logger and the callable."""
    handler, level = None, log.level
    if progress is True:
        if not log.hasHandlers():
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(handler)
        if not log.isEnabledFor(logging.INFO):
            log.setLevel(logging.INFO)
    try:
        if callable(progress):

            def say(line: str) -> None:
                log.info(line)
                progress(line)

            yield say
        else:
            yield log.info if log.isEnabledFor(logging.INFO) else None
    finally:
        if handler is not None:
            log.removeHandler(handler)
        log.setLevel(level)


def solve_progress(
    say: Callable[[str], None], label: str, cutoff_s: float
) -> Callable[[dict], None]:
    """Formats the solver's periodic report (see :func:`uniap.milp.solve`) as one line."""
    from uniap.report import fmt_seconds

    def report(d: dict) -> None:
        inc, bound, gap = d["incumbent"], d["bound"], d["gap"]
        inc_text = fmt_seconds(inc) if math.isfinite(inc) and abs(inc) < 1e30 else "none yet"
        if inc_text == "none yet" and math.isfinite(cutoff_s):
            inc_text += f" (must beat {fmt_seconds(cutoff_s)})"
        bound_text = fmt_seconds(bound) if math.isfinite(bound) and abs(bound) < 1e30 else "-"
        gap_text = f"{100 * gap:.1f}%" if math.isfinite(gap) and gap < 1e6 else "-"
        say(
            f"{label}: solving for {d['running_s']:.0f} s, incumbent {inc_text}, bound "
            f"{bound_text}, gap {gap_text}, {d['nodes']} nodes"
        )

    return report
