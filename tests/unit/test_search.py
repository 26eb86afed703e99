"""The heuristic search: local search ends in a local optimum; re-planned strategies fit and are
optimal when memory is free."""

from __future__ import annotations

import numpy as np
import pytest
from _tables import random_tables

from uniap.cost_model import evaluate_assignment
from uniap.search import heuristic


@pytest.mark.parametrize("seed", range(0, 60, 3))
def test_local_search_ends_in_a_local_optimum(seed: int) -> None:
    """improve() returns a fitting assignment no slower than its start, from which no single
    move it considers (another strategy for one layer, one layer across a stage boundary)
    is faster by evaluate_assignment: its incremental move scores are exact."""
    from uniap.search import improve

    t = random_tables(seed)
    rng = np.random.default_rng(seed)
    t.stage_overhead_s = float(rng.uniform(0, 0.3))
    t.step_overhead_s = float(rng.uniform(0, 0.3))
    start = heuristic(t)
    if start is None:
        pytest.skip("nothing fits")
    stage_of, strategy_of = improve(t, *start)
    ev = evaluate_assignment(t, stage_of, strategy_of)
    assert ev.fits
    assert ev.time_per_iteration_s <= evaluate_assignment(t, *start).time_per_iteration_s
    tpi = ev.time_per_iteration_s
    for u in range(t.num_layers):
        for k in t.allowed[u]:
            s = list(strategy_of)
            s[u] = k
            e = evaluate_assignment(t, stage_of, s)
            assert not (e.fits and e.time_per_iteration_s < tpi * (1 - 1e-9))
    for u in range(1, t.num_layers):
        for d in (-1, 1):  # u to the stage before / after
            so = list(stage_of)
            so[u] += (
                d
                if (d == -1 and so[u - 1] == so[u] - 1)
                or (d == 1 and u + 1 < t.num_layers and so[u + 1] == so[u] + 1)
                else 0
            )
            if so == stage_of or sorted(set(so)) != list(range(t.pp)):
                continue
            e = evaluate_assignment(t, so, strategy_of)
            assert not (e.fits and e.time_per_iteration_s < tpi * (1 - 1e-9))


@pytest.mark.parametrize("seed", range(0, 60, 5))
def test_restrategize_fits_and_minimises_with_free_memory(seed: int) -> None:
    """restrategize() keeps the placement, gives every layer an allowed strategy and fits;
    with memory not binding it finds each stage's cheapest c A + G + c R (brute force)."""
    import dataclasses
    import itertools

    from uniap.search import restrategize

    t = random_tables(seed)
    start = heuristic(t)
    if start is None:
        pytest.skip("nothing fits")
    stage_of = start[0]
    got = restrategize(t, stage_of)
    assert got is not None
    assert all(k in t.allowed[u] for u, k in enumerate(got))
    assert evaluate_assignment(t, stage_of, got).fits
    free = dataclasses.replace(t, memory_limit_bytes=1e30)
    got = restrategize(free, stage_of)
    c = t.num_microbatches

    def cost(strat) -> float:
        total = sum(c * t.A[u, k] + t.G[u, k] for u, k in enumerate(strat))
        return total + sum(
            c * t.R[u, t.layout[u, strat[u]], t.layout[u + 1, strat[u + 1]]]
            for u in range(t.num_layers - 1)
            if stage_of[u] == stage_of[u + 1]
        )

    best = min(cost(s) for s in itertools.product(*t.allowed))
    assert cost(got) == pytest.approx(best, rel=1e-12)
