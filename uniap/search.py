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

__all__ = ["exhaustive", "heuristic", "compositions", "allowed_mask"]


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
    L, pp, K = t.num_layers, t.pp, t.num_strategies
    if L < pp:
        return None
    mask = allowed_mask(t)
    A = np.where(mask, t.A, np.inf)
    # fastest[u, a]: the fastest strategy of layer u with layout a (first index on ties), or
    # its fastest strategy overall when none of that layout is allowed.
    C = int(t.layout.max()) + 1
    fastest = np.empty((L, C), dtype=np.int64)
    any_fastest = np.argmin(A, axis=1)
    for a in range(C):
        in_class = np.where(t.layout == a, A, np.inf)
        best = np.argmin(in_class, axis=1)
        has = np.isfinite(in_class[np.arange(L), best])
        fastest[:, a] = np.where(has, best, any_fastest)
    choices: list[list[int]] = []
    for k in range(K):
        alt = fastest[np.arange(L), t.layout[:, k]]
        choices.append(np.where(mask[:, k], k, alt).tolist())
    # Memory-lean choice: each layer's smallest-memory strategy.
    choices.append(np.argmin(np.where(mask, t.M[:, :, 0], np.inf), axis=1).tolist())
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


def allowed_mask(t: CostTables) -> np.ndarray:
    """``(L, K)`` booleans: layer u may use strategy k."""
    mask = np.zeros((t.num_layers, t.num_strategies), dtype=bool)
    for u, ks in enumerate(t.allowed):
        mask[u, ks] = True
    return mask


def _balance(t: CostTables, choice: list[int]) -> list[int] | None:
    L, pp = t.num_layers, t.pp
    idx = np.arange(L)
    w = t.A[idx, choice]
    mem = t.M[idx, choice, :]
    limit = t.memory_limit_bytes
    cw = np.concatenate([[0.0], np.cumsum(w)])
    cmem = np.vstack([np.zeros((1, pp)), np.cumsum(mem, axis=0)])
    # by_mem[u][i]: where a stage i that starts at layer u must end at the latest (memory)
    by_mem = np.stack([np.searchsorted(cmem[:, i], cmem[:-1, i] + limit, side="right") - 1
                       for i in range(pp)], axis=1).tolist()
    too_big = (mem > limit).tolist()

    def greedy(cap: float) -> list[int] | None:
        """Fill each stage while its time stays within ``cap`` and its memory within the limit
        (every stage takes at least one layer); the number of layers of each stage."""
        by_time = (np.searchsorted(cw, cw[:-1] + cap, side="right") - 1).tolist()
        counts, u = [], 0
        for i in range(pp):
            if u >= L:
                break
            if too_big[u][i]:
                return None
            e = max(min(by_time[u], by_mem[u][i]), u + 1)
            counts.append(e - u)
            u = e
        return counts if u >= L else None

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
    return _fill([i for i, n in enumerate(best) for _ in range(n)], pp)


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
