"""The machine line every benchmark prints with its figures."""

from __future__ import annotations

import os
import platform

import torch

from uniap.profiles.measured import cpu_name


def machine(*extra: str) -> str:
    """CPU model, cores, Python, torch and OS of this machine, then ``extra`` (threads, load)."""
    return ", ".join(
        [
            cpu_name(),
            f"{os.cpu_count()} cores",
            f"Python {platform.python_version()}",
            f"torch {torch.__version__}",
            f"{platform.system()} {platform.release()}",
            *extra,
        ]
    )


def omp_threads() -> str:
    """``OMP_NUM_THREADS`` as this process sees it."""
    return f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
