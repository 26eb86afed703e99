"""The MILP's optimum equals the exhaustive optimum on random small instances, and its warm start
satisfies every row."""

from __future__ import annotations

import numpy as np
import pytest
from _tables import random_tables

from uniap.cost_model import evaluate_assignment
from uniap.milp import solve
from uniap.search import exhaustive, heuristic


@pytest.mark.parametrize("seed", range(60))
def test_milp_equals_exhaustive(seed: int) -> None:
    """MILP TPI == exhaustive optimum (1e-9 relative), and == evaluate() of its assignment."""
    t = random_tables(seed)
    best, _, _ = exhaustive(t)
    sol = solve(t, time_limit_s=60)
    if not np.isfinite(best):
        assert sol.status == "infeasible"
        return
    assert sol.status == "optimal"
    assert sol.time_per_iteration_s == pytest.approx(best, rel=1e-9)
    assert sol.objective_s == pytest.approx(sol.time_per_iteration_s, rel=1e-7)
    assert evaluate_assignment(t, sol.stage_of, sol.strategy_of).fits


@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("seed", range(0, 60, 3))
def test_milp_with_heuristic_incumbent_stays_exact(seed: int, labels: bool) -> None:
    """Warm start and incumbent cutoff never lose the optimum (the program alone, and with the
    label searches that answer first where they apply)."""
    t = random_tables(seed)
    best, _, _ = exhaustive(t)
    inc = heuristic(t)
    sol = solve(t, incumbent=inc, time_limit_s=60, labels=labels)
    if not np.isfinite(best):
        assert inc is None and sol.status in ("infeasible", "cutoff")
        return
    assert sol.time_per_iteration_s == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("seed", range(1, 60, 2))
def test_milp_with_the_memory_bottleneck_row_stays_exact(seed: int, labels: bool) -> None:
    """The bottleneck row at the memory-aware bound (every instance has a run of identical
    layers and a binding memory limit; some a stage overhead), with the planner's segment
    bound floored at it and the heuristic's incumbent: still the exhaustive optimum."""
    from uniap.bounds import SegmentBound, memory_bottleneck_bound

    t = random_tables(seed)
    if seed % 4 == 1:
        t.stage_overhead_s = 0.2
    best, _, _ = exhaustive(t)
    floor = memory_bottleneck_bound(t)
    segments = SegmentBound(t)
    if np.isfinite(segments.split):
        segments.floor_bottleneck(floor)
    inc = heuristic(t)
    sol = solve(
        t, incumbent=inc, segments=segments, bottleneck_s=floor, time_limit_s=60, labels=labels
    )
    if not np.isfinite(best):
        assert sol.status in ("infeasible", "cutoff")
        return
    assert sol.time_per_iteration_s == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("seed", [1, 3, 5, 7, 9, 11])
def test_start_values_satisfy_every_row(seed: int) -> None:
    """The warm start handed to HiGHS (heuristic assignment, sorted for the symmetry rows, with
    its count variables) satisfies every constraint of the program, so HiGHS accepts it."""
    import pulp

    from uniap.bounds import stage_windows
    from uniap.milp import _build, _start_values

    t = random_tables(seed)
    inc = heuristic(t)
    if inc is None:
        pytest.skip("nothing fits")
    window = stage_windows(t, None)
    prob, v, scale = _build(t, window, None)
    assert v.counts, "the instance has a run of identical layers"
    start = _start_values(t, v, inc, scale)
    assert start
    for var in prob.variables():
        var.varValue = start.get(var.name, 0.0)
    bad = [row.name for row in prob.constraints() if not row.valid(1e-9)]
    assert not bad
    for var in prob.variables():
        if var.cat == pulp.LpInteger:
            assert var.varValue == round(var.varValue)
    # same time as the heuristic's own assignment (the reordering changes nothing)
    tpi = evaluate_assignment(t, *inc).time_per_iteration_s
    assert pulp.value(prob.objective) * scale == pytest.approx(tpi, rel=1e-9)
