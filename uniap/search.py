"""Searches over assignments that are not the MILP: the exhaustive ground truth for small
instances, and a fast heuristic that gives the MILP a warm start and an incumbent bound.

Both work on :class:`uniap.cost_model.CostTables` and score with
:func:`uniap.cost_model.evaluate_assignment`, the same function that defines the MILP's
objective, so "MILP optimum == exhaustive optimum" is a statement about the solver alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

from uniap.cost_model import CostTables, evaluate_assignment

__all__ = ["exhaustive", "heuristic", "compositions"]


def compositions(num_layers: int, pp: int) -> Iterator[list[int]]:
    """Every ``stage_of`` list that splits ``num_layers`` layers into ``pp`` contiguous,
    ordered, non-empty stages."""
    for cuts in itertools.combinations(range(1, num_layers), pp - 1):
        stage_of, i, cut = [], 0, list(cuts) + [num_layers]
        for u in range(num_layers):
            if u >= cut[i]:
                i += 1
            stage_of.append(i)
        yield stage_of


def exhaustive(t: CostTables) -> tuple[float, list[int], list[int]]:
    """The optimum over every placement and every strategy (``inf`` if nothing fits).

    Cost grows as ``C(L-1, pp-1) * K^L``: for tests on small instances only."""
    best = (float("inf"), [], [])
    for stage_of in compositions(t.num_layers, t.pp):
        for strategy_of in itertools.product(*t.allowed):
            ev = evaluate_assignment(t, stage_of, list(strategy_of))
            if ev.fits and ev.time_per_iteration_s < best[0]:
                best = (ev.time_per_iteration_s, stage_of, list(strategy_of))
    return best


def heuristic(t: CostTables) -> tuple[list[int], list[int]] | None:
    """A good feasible assignment, fast: for each strategy (and for each layer's own fastest
    strategy), give it to every layer that may use it, balance the stages by binary search
    on the bottleneck with a greedy fill under the memory limit, and keep the best that fits."""
    L, pp = t.num_layers, t.pp
    if L < pp:
        return None
    choices: list[list[int]] = []
    for k in range(t.num_strategies):
        choice = []
        for u in range(L):
            if k in t.allowed[u]:
                choice.append(k)
            else:
                same = [j for j in t.allowed[u] if t.layout[u, j] == t.layout[u, k]] or t.allowed[u]
                choice.append(min(same, key=lambda j: t.A[u, j]))
        choices.append(choice)
    # Memory-lean choice: each layer's smallest-memory strategy.
    choices.append([min(t.allowed[u], key=lambda j: t.M[u, j, 0]) for u in range(L)])
    best, best_tpi = None, float("inf")
    seen = set()
    for choice in choices:
        key = tuple(choice)
        if key in seen:
            continue
        seen.add(key)
        stage_of = _balance(t, choice)
        if stage_of is None:
            continue
        ev = evaluate_assignment(t, stage_of, choice)
        if ev.fits and ev.time_per_iteration_s < best_tpi:
            best, best_tpi = (stage_of, choice), ev.time_per_iteration_s
    return best


def _balance(t: CostTables, choice: list[int]) -> list[int] | None:
    L, pp = t.num_layers, t.pp
    w = np.array([t.A[u, k] for u, k in enumerate(choice)])
    mem = np.array([[t.M[u, k, i] for i in range(pp)] for u, k in enumerate(choice)])
    limit = t.memory_limit_bytes

    def greedy(cap: float) -> list[int] | None:
        stage_of, i, seg_t, seg_m = [], 0, 0.0, 0.0
        for u in range(L):
            if stage_of and (seg_t + w[u] > cap or seg_m + mem[u, i] > limit):
                i += 1
                seg_t, seg_m = 0.0, 0.0
                if i >= pp:
                    return None
            if mem[u, i] > limit:
                return None
            seg_t += w[u]
            seg_m += mem[u, i]
            stage_of.append(i)
        return _fill(stage_of, pp)

    lo, hi = float(w.max()), float(w.sum())
    best = greedy(hi)
    if best is None:
        return None
    for _ in range(40):
        mid = (lo + hi) / 2
        got = greedy(mid)
        if got is None:
            lo = mid
        else:
            hi, best = mid, got
        if hi - lo <= 1e-9 * hi:
            break
    return best


def _fill(stage_of: list[int], pp: int) -> list[int]:
    """Split the longest stages until there are exactly ``pp`` non-empty ones."""
    while stage_of[-1] + 1 < pp:
        counts = np.bincount(stage_of)
        i = int(np.argmax(counts))
        if counts[i] < 2:
            break
        first = stage_of.index(i)
        half = first + counts[i] // 2
        stage_of = [s if u < half else s + 1 for u, s in enumerate(stage_of)]
    return stage_of
