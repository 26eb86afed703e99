"""HiGHS without its start-up banner.

highspy 1.16 prints a copyright banner to the C-level standard output the first time a
``Highs`` object is built in a process, whatever ``output_flag`` says afterwards (PuLP's
``msg=False`` cannot reach it). A library must not write to its user's stdout (``uniap plan``
prints the plan there, and plan files must be byte-identical), so the first HiGHS object of
the process is built with file descriptor 1 pointed at ``/dev/null``; later ones print nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

__all__ = ["silence_highs_banner"]

_lock = threading.Lock()
_done = False


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to reach: nothing buffered there either
        pass


def silence_highs_banner() -> None:
    """Build (and drop) this process's first ``highspy.Highs`` with stdout discarded."""
    global _done
    if _done:
        return
    with _lock:
        if _done:
            return
        import highspy

        sys.stdout.flush()
        _flush_c_stdio()
        try:
            saved = os.dup(1)
        except OSError:  # no stdout at all: nothing to protect
            highspy.Highs()
            _done = True
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 1)
            highspy.Highs()
            _flush_c_stdio()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(devnull)
        _done = True
