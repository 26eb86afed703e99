"""Baseline searches for the comparison with uniap, all on uniap's cost tables and scored by
uniap's evaluation (so only the search differs):

- :func:`galvatron`: Galvatron (VLDB'22): fixed stage split, per-stage DP under memory.
- :func:`alpa`: Alpa (OSDI'22): stage DP over boundaries, per-stage intra-op ILP.
- :func:`handset`: hand-set plans: pure DDP, pure FSDP, Megatron/torchtitan 3D.
- :func:`exhaustive_search`: every assignment of every ``(pp, c)`` (tiny instances only).
- :func:`uniap_search`: uniap's own planner, in the same result record.
"""

from __future__ import annotations

from .alpa import alpa
from .common import BaselineResult, candidate_tables, score, to_plan
from .galvatron import galvatron
from .handset import HANDSET_METHODS, handset
from .reference import exhaustive_search, uniap_search

__all__ = [
    "BaselineResult",
    "HANDSET_METHODS",
    "alpa",
    "candidate_tables",
    "exhaustive_search",
    "galvatron",
    "handset",
    "score",
    "to_plan",
    "uniap_search",
]
