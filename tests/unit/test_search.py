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


@pytest.mark.parametrize("seed", range(0, 60, 2))
def test_memory_split_assignment_fits_whenever_a_plan_does(seed: int) -> None:
    """The memory-aware split as an assignment: it fits whenever some plan fits (the knapsack
    of each stage is exact in memory), its slowest stage is at least the bound it comes from,
    and a thinned front still gives a fitting assignment or none."""
    from uniap.bounds import memory_bottleneck_bound
    from uniap.search import exhaustive, memory_split_assignment

    t = random_tables(seed)
    best, _, _ = exhaustive(t)
    got = memory_split_assignment(t)
    if not np.isfinite(best):
        assert got is None
        return
    assert got is not None
    ev = evaluate_assignment(t, *got)
    assert ev.fits and ev.time_per_iteration_s >= best * (1 - 1e-12)
    assert max(ev.stage_time_s) >= memory_bottleneck_bound(t) * (1 - 1e-12)
    thin = memory_split_assignment(t, max_points=1)
    assert thin is None or evaluate_assignment(t, *thin).fits


@pytest.mark.parametrize("seed", range(0, 200, 3))
def test_single_stage_optimum_equals_exhaustive(seed: int) -> None:
    """One stage: the label-setting pass gives the exhaustive optimum (to 1e-9), never answers
    below a bound it cannot beat, and finds the optimum again when the bound is the optimum
    itself (the planner's cutoff); random tables of 3-6 layers, half with a run of identical
    layers, a binding memory limit and an exposed sync."""
    from uniap.cost_model import CostTables
    from uniap.search import exhaustive, single_stage_optimum

    t = random_tables(seed)
    if t.pp != 1:  # the same draws on one stage: memory of stage 0
        t = CostTables(
            1, t.num_microbatches, t.A, t.G, t.M[:, :, :1].copy(), t.layout, t.R, t.Rp,
            t.memory_limit_bytes, t.allowed, F=t.F,
        )  # fmt: skip
    best, _, _ = exhaustive(t)
    got = single_stage_optimum(t)
    assert got is not None
    if not np.isfinite(best):
        assert got == (np.inf, [])
        return
    tpi, ks = got
    assert tpi == pytest.approx(best, rel=1e-9)
    ev = evaluate_assignment(t, [0] * t.num_layers, ks)
    assert ev.fits and ev.time_per_iteration_s == pytest.approx(best, rel=1e-9)
    assert single_stage_optimum(t, best)[0] == pytest.approx(best, rel=1e-9)
    assert single_stage_optimum(t, best * 0.99) == (np.inf, [])
    assert single_stage_optimum(t, max_points=0) is None


@pytest.mark.parametrize("seed", range(6))
def test_single_stage_optimum_equals_the_program_on_longer_chains(seed: int) -> None:
    """Longer one-stage chains (16-24 layers, runs of identical layers, several layouts,
    memory that binds, swept from nearly the leanest labelling to the fastest): the
    label-setting pass equals the program's optimum (HiGHS, proven) at every limit, also
    when the bound it is given is that optimum."""
    from uniap.cost_model import CostTables
    from uniap.milp import _build, _HiGHS
    from uniap.search import single_stage_optimum

    rng = np.random.default_rng(500 + seed)
    L, K = int(rng.integers(16, 25)), 5
    c = int(rng.choice([1, 4]))
    block = rng.uniform(0.1, 2.0, size=K)
    A = np.vstack([block if 2 <= u < L - 2 else rng.uniform(0.1, 2.0, size=K) for u in range(L)])
    G = rng.uniform(0.0, 0.5, size=(L, K))
    G[2 : L - 2] = G[2]
    M = rng.uniform(1.0, 10.0, size=(L, K, 1))
    M[2 : L - 2] = M[2]
    layout = np.tile(rng.integers(0, 3, size=K), (L, 1))
    R = rng.uniform(0.0, 0.5, size=(L - 1, 3, 3))
    for a in range(3):
        R[:, a, a] = 0.0
    F = rng.uniform(0.0, 1.0, size=(L, K))
    F[2 : L - 2] = F[2]
    for share in (0.05, 0.2, 0.4, 0.7, 1.0):
        limit = float(M[:, :, 0].min(axis=1).sum() + share * np.ptp(M[:, :, 0], axis=1).sum())
        allowed = [list(range(K))] * L
        t = CostTables(1, c, A, G, M, layout, R, np.zeros((L - 1, 3, 3)), limit, allowed, F=F)
        tpi, ks = single_stage_optimum(t)
        window = [[0]] * L
        prob, v, scale = _build(t, window, None)
        prob.solve(_HiGHS(msg=False, timeLimit=120, threads=1, gapRel=0.0, gapAbs=1e-12))
        assert prob.solverModel.getModelStatus().name == "kOptimal"
        stage_of, strategy_of = [0] * L, [0] * L
        for (u, _, k), var in v.x.items():
            if var.varValue > 0.5:
                strategy_of[u] = k
        program = evaluate_assignment(t, stage_of, strategy_of).time_per_iteration_s
        assert tpi == pytest.approx(program, rel=1e-7), share
        assert single_stage_optimum(t, program)[0] == pytest.approx(program, rel=1e-7), share


def test_single_stage_progress_reports_a_valid_bound() -> None:
    """The label pass's progress (what the CLI prints for a long solve): every report has the
    solver's keys, its bound is at most the optimum and its incumbent at least the optimum."""
    from uniap.cost_model import CostTables
    from uniap.search import single_stage_optimum

    checked = 0
    for seed in range(12):
        t = random_tables(seed)
        t = CostTables(
            1, t.num_microbatches, t.A, t.G, t.M[:, :, :1].copy(), t.layout, t.R, t.Rp,
            t.memory_limit_bytes, t.allowed, F=t.F,
        )  # fmt: skip
        reports: list[dict] = []
        got = single_stage_optimum(t, progress=reports.append, progress_interval_s=0.0)
        if got is None or not np.isfinite(got[0]):
            continue
        checked += 1
        assert reports
        for r in reports:
            assert set(r) == {"running_s", "incumbent", "bound", "gap", "nodes"}
            assert r["bound"] <= got[0] * (1 + 1e-9) <= r["incumbent"] * (1 + 1e-6)
    assert checked >= 3


@pytest.mark.parametrize("seed", range(1, 60, 4))
def test_run_knapsacks_are_exact(seed: int) -> None:
    """Each run of a split gets the labelling of least ``sum weight`` among those whose memory
    fits its stage (enumerated), for both weights the split's start uses: time alone, and
    ``c A + G``."""
    import itertools

    from uniap.search import _run_knapsacks, compositions

    t = random_tables(seed)
    c, limit = t.num_microbatches, t.memory_limit_bytes * (1 + 1e-9)
    stage_of = next(compositions(t.num_layers, t.num_stages))
    runs = [
        (stage_of.index(i), len(stage_of) - 1 - stage_of[::-1].index(i))
        for i in range(t.num_stages)
    ]

    def cost(weight, i, s, ks):
        w = sum(weight[u, k] for u, k in zip(range(s, s + len(ks)), ks))
        mem = sum(t.M[u, k, i] for u, k in zip(range(s, s + len(ks)), ks))
        return w if mem <= limit else np.inf

    for weight in (t.A, c * t.A + t.G):
        got = _run_knapsacks(t, runs, weight, 10**6)
        best = [
            min(
                cost(weight, i, s, ks)
                for ks in itertools.product(*(t.allowed[u] for u in range(s, e + 1)))
            )
            for i, (s, e) in enumerate(runs)
        ]
        if got is None:
            assert not all(np.isfinite(best))
            continue
        assert got[0] == stage_of
        for i, (s, e) in enumerate(runs):
            mine = cost(weight, i, s, got[1][s : e + 1])
            assert mine == pytest.approx(best[i], rel=1e-12)
