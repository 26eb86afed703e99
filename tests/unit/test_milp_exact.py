"""The MILP's optimum equals the exhaustive optimum on random small instances."""

from __future__ import annotations

import numpy as np
import pytest

from uniap.cost_model import CostTables, evaluate_assignment
from uniap.milp import solve
from uniap.search import compositions, exhaustive, heuristic


def random_tables(seed: int) -> CostTables:
    rng = np.random.default_rng(seed)
    L = int(rng.integers(3, 7))
    pp = int(rng.integers(1, min(L, 4) + 1))
    K = int(rng.integers(2, 5 if L <= 5 else 4))
    C = int(rng.integers(1, K + 1))
    c = int(rng.choice([1, 2, 3, 4, 8]))
    layout_k = rng.integers(0, C, size=K)
    layout = np.tile(layout_k, (L, 1))
    A = rng.uniform(0.1, 2.0, size=(L, K))
    allowed = []
    for u in range(L):
        ks = sorted(rng.choice(K, size=int(rng.integers(1, K + 1)), replace=False).tolist())
        allowed.append(ks)
        for k in range(K):
            if k not in ks:
                A[u, k] = np.inf
    G = rng.uniform(0.0, 1.0, size=(L, K))
    M = rng.uniform(1.0, 10.0, size=(L, K, 1)) + rng.uniform(0, 2.0, size=(L, K, pp))
    if seed % 2:  # a run of identical layers (exercises symmetry breaking and count variables)
        s0 = int(rng.integers(0, L - 2))
        for u in range(s0 + 1, min(L, s0 + 4)):
            A[u], G[u], M[u], allowed[u] = A[s0], G[s0], M[s0], list(allowed[s0])
    R = rng.uniform(0.0, 0.5, size=(max(L - 1, 0), C, C))
    for a in range(C):
        R[:, a, a] = 0.0
    Rp = rng.uniform(0.05, 1.0, size=(max(L - 1, 0), C, C))
    # A memory limit that binds: between the leanest and the median plan's peak.
    t = CostTables(pp, c, A, G, M, layout, R, Rp, 1e30, allowed)
    peaks = []
    for stage_of in compositions(L, pp):
        strat = [min(allowed[u], key=lambda k, u=u: M[u, k, 0]) for u in range(L)]
        peaks.append(max(evaluate_assignment(t, stage_of, strat).peak_memory_bytes))
        strat = [min(allowed[u], key=lambda k, u=u: A[u, k]) for u in range(L)]
        peaks.append(max(evaluate_assignment(t, stage_of, strat).peak_memory_bytes))
    lo, hi = min(peaks), max(peaks)
    t.memory_limit_bytes = float(lo + rng.uniform(0.0, 0.6) * (hi - lo))
    return t


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


@pytest.mark.parametrize("seed", range(0, 60, 3))
def test_milp_with_heuristic_incumbent_stays_exact(seed: int) -> None:
    """Warm start and incumbent cutoff never lose the optimum."""
    t = random_tables(seed)
    best, _, _ = exhaustive(t)
    inc = heuristic(t)
    sol = solve(t, incumbent=inc, time_limit_s=60)
    if not np.isfinite(best):
        assert inc is None and sol.status in ("infeasible", "cutoff")
        return
    assert sol.time_per_iteration_s == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("seed", range(0, 60, 5))
def test_bottleneck_lower_bound_is_valid(seed: int) -> None:
    """The min-max split bound never exceeds the slowest stage of any plan that fits."""
    import itertools

    from uniap.bounds import bottleneck_lower_bound

    t = random_tables(seed)
    lb = bottleneck_lower_bound(t)
    tightest = np.inf
    for stage_of in compositions(t.num_layers, t.pp):
        for strat in itertools.product(*t.allowed):
            ev = evaluate_assignment(t, stage_of, list(strat))
            if ev.fits:
                tightest = min(tightest, max(ev.stage_time_s))
    assert lb <= tightest * (1 + 1e-9)


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


@pytest.mark.parametrize("seed", range(0, 60, 2))
def test_segment_lower_bound_is_valid(seed: int) -> None:
    """The segment bound never exceeds the exhaustive optimum, whatever target it refines
    towards (with stage and step overheads and a heavier synchronisation on some instances),
    and it is never weaker than the planner's cheap candidate bound."""
    from uniap.bounds import candidate_lower_bound, segment_lower_bound

    t = random_tables(seed)
    rng = np.random.default_rng(1000 + seed)
    if seed % 4 == 2:
        t.stage_overhead_s = float(rng.uniform(0, 0.5))
        t.step_overhead_s = float(rng.uniform(0, 0.5))
        t.G = t.G * float(rng.choice([0.1, 5.0]))
    best, _, _ = exhaustive(t)
    for target in (None, best, best * 1.02, best * 1.5, best * 0.8):
        lb = segment_lower_bound(t, target)
        assert lb <= best * (1 + 1e-12)
    assert segment_lower_bound(t) >= candidate_lower_bound(t) * (1 - 2e-9)


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
            so[u] += d if (d == -1 and so[u - 1] == so[u] - 1) or (d == 1 and u + 1 < t.num_layers
                                                                    and so[u + 1] == so[u] + 1) else 0
            if so == stage_of or sorted(set(so)) != list(range(t.pp)):
                continue
            e = evaluate_assignment(t, so, strategy_of)
            assert not (e.fits and e.time_per_iteration_s < tpi * (1 - 1e-9))


@pytest.mark.parametrize("seed", range(1, 60, 4))
def test_segment_windows_hold_every_faster_assignment(seed: int) -> None:
    """Every fitting assignment faster than the target (checked one by one, over all of them)
    puts each layer on a stage its segment window allows."""
    import itertools

    from uniap.bounds import segment_windows

    t = random_tables(seed)
    if seed % 8 == 1:
        t.stage_overhead_s, t.step_overhead_s = 0.2, 0.1
    sols = []
    for stage_of in compositions(t.num_layers, t.pp):
        for strat in itertools.product(*t.allowed):
            ev = evaluate_assignment(t, stage_of, list(strat))
            if ev.fits:
                sols.append((ev.time_per_iteration_s, stage_of))
    best = min(tpi for tpi, _ in sols)
    for slack in (1e-7, 0.05, 0.5):
        window = segment_windows(t, best * (1 + slack))
        for tpi, stage_of in sols:
            if tpi < best * (1 + slack):
                assert all(stage_of[u] in window[u] for u in range(t.num_layers))


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
        return total + sum(c * t.R[u, t.layout[u, strat[u]], t.layout[u + 1, strat[u + 1]]]
                           for u in range(t.num_layers - 1) if stage_of[u] == stage_of[u + 1])

    best = min(cost(s) for s in itertools.product(*t.allowed))
    assert cost(got) == pytest.approx(best, rel=1e-12)
