"""Every bound is valid on random tables: never above the exhaustive optimum, windows keep every
faster assignment."""

from __future__ import annotations

import numpy as np
import pytest
from _tables import random_tables

from uniap.cost_model import evaluate_assignment
from uniap.search import compositions, exhaustive


def _fitting(t) -> list:
    """``(stage_of, evaluation)`` of every assignment of ``t`` that fits, by enumeration."""
    import itertools

    return [
        (stage_of, ev)
        for stage_of in compositions(t.num_layers, t.num_stages)
        for strat in itertools.product(*t.allowed)
        if (ev := evaluate_assignment(t, stage_of, list(strat))).fits
    ]


@pytest.mark.parametrize("seed", range(0, 60, 5))
def test_bottleneck_lower_bound_is_valid(seed: int) -> None:
    """The min-max split bound never exceeds the slowest stage of any plan that fits."""
    from uniap.bounds import bottleneck_lower_bound

    t = random_tables(seed)
    assert bottleneck_lower_bound(t) <= _slowest_stage_optimum(t) * (1 + 1e-9)


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


@pytest.mark.parametrize("seed", range(1, 60, 4))
def test_segment_windows_hold_every_faster_assignment(seed: int) -> None:
    """Every fitting assignment faster than the target (checked one by one, over all of them)
    puts each layer on a stage its segment window allows."""
    from uniap.bounds import segment_windows

    t = random_tables(seed)
    if seed % 8 == 1:
        t.stage_overhead_s, t.step_overhead_s = 0.2, 0.1
    sols = [(ev.time_per_iteration_s, stage_of) for stage_of, ev in _fitting(t)]
    best = min(tpi for tpi, _ in sols)
    for slack in (1e-7, 0.05, 0.5):
        window = segment_windows(t, best * (1 + slack))
        for tpi, stage_of in sols:
            if tpi < best * (1 + slack):
                assert all(stage_of[u] in window[u] for u in range(t.num_layers))


@pytest.mark.parametrize("seed", range(0, 60, 3))
def test_min_peak_memory_equals_enumeration(seed: int) -> None:
    """The leanest assignment's peak memory (the split dynamic program) equals the smallest
    peak over every split and strategy assignment, on random tables of 1 to 4 stages with
    stage-dependent memory."""
    import itertools

    from uniap.bounds import min_peak_memory

    t = random_tables(seed)
    brute = min(
        max(evaluate_assignment(t, stage_of, list(strat)).peak_memory_bytes)
        for stage_of in compositions(t.num_layers, t.pp)
        for strat in itertools.product(*t.allowed)
    )
    assert min_peak_memory(t) == pytest.approx(brute, rel=1e-12)


def _slowest_stage_optimum(t) -> float:
    """The smallest slowest stage (overhead and reshards included) of any fitting assignment."""
    return min((max(ev.stage_time_s) for _, ev in _fitting(t)), default=np.inf)


@pytest.mark.parametrize("seed", range(0, 60, 3))
def test_memory_bottleneck_bound_is_valid_and_exact_without_reshards(seed: int) -> None:
    """The memory-aware bottleneck bound never exceeds the slowest stage of any fitting plan,
    under any cap (capped at the cap), beats the fastest-times split, falls back validly when
    its fronts are cut short, and equals the enumerated optimum when reshards cost nothing
    (then a stage's time is its knapsack, exactly)."""
    import dataclasses

    from uniap.bounds import bottleneck_lower_bound, memory_bottleneck_bound

    t = random_tables(seed)
    if seed % 2:
        t.stage_overhead_s = 0.3
    best = _slowest_stage_optimum(t)
    bound = memory_bottleneck_bound(t)
    assert bound <= best * (1 + 1e-12)
    assert np.isinf(bound) == np.isinf(best)
    if np.isfinite(best):
        assert bound >= (bottleneck_lower_bound(t) + t.stage_overhead_s) * (1 - 1e-8)
        for cap in (best * 0.5, best, best * 2):
            assert memory_bottleneck_bound(t, cap) <= min(cap, best) * (1 + 1e-12)
        assert memory_bottleneck_bound(t, max_points=1) <= best * (1 + 1e-12)
    flat = dataclasses.replace(t, R=np.zeros_like(t.R))
    exact = _slowest_stage_optimum(flat)
    assert memory_bottleneck_bound(flat) == pytest.approx(exact, rel=1e-8, abs=0)


@pytest.mark.parametrize("seed", range(0, 40, 4))
def test_knapsack_runs_reuses_a_larger_budgets_answer_exactly(seed: int) -> None:
    """knapsack_runs answers a smaller budget from the runs it found under a larger one (and
    a larger budget afresh), exactly as a fresh computation would, including giving up (None)
    above ``max_fronts`` fronts: what was asked before never changes an answer."""
    from uniap import bounds

    t = random_tables(seed)
    mask = t.allowed_mask()
    amin, _, mmin = t.minima()
    allowed = [np.flatnonzero(mask[u]) for u in range(t.num_layers)]
    args = (t.A, np.ascontiguousarray(t.M[:, :, 0]), allowed, amin, mmin[:, 0])
    limit = t.memory_limit_bytes * (1 + 1e-9)
    bounds._KNAPSACK_MEMO.clear()
    gave_up = answered = 0
    for budget in (np.inf, float(amin.sum()) * 0.6, float(amin.sum()) * 0.3, np.inf, 0.0):
        for max_fronts in (None, 2, 4, 6, 10):
            got = bounds.knapsack_runs(*args, limit, budget, 256, max_fronts)
            fresh = bounds._knapsack_runs(*args, limit, budget, 256, max_fronts)
            if fresh is None:
                assert got is None
                gave_up += 1
                continue
            assert got is not None and np.array_equal(got, fresh[0])
            got[0, 0] = -1.0  # the caller's copy: the memo is untouched
            answered += max_fronts is not None
    assert len(bounds._KNAPSACK_MEMO) == 1
    assert gave_up and answered  # both sides of max_fronts were asked from the memo


@pytest.mark.parametrize("seed", range(0, 40, 4))
def test_coarsened_knapsack_fronts_stay_between_fastest_times_and_exact(seed: int) -> None:
    """A front coarsened to a few points covers every point of the exact front from below;
    runs whose fronts outgrow ``max_points`` get a time between their fastest times and their
    exact knapsack (enumerated), and exactly the knapsack while no front was coarsened."""
    import itertools

    from uniap import bounds

    rng = np.random.default_rng(seed)
    a = np.sort(rng.random(40))
    m = np.sort(rng.random(40))[::-1]
    for points in (0, 1, 3, 7, 40, 50):
        ca, cm = bounds.coarsen_front(a, m, points)
        assert len(ca) == len(cm) == min(max(points, 1), 40)
        assert ((ca[None, :] <= a[:, None]) & (cm[None, :] <= m[:, None])).any(axis=1).all()
    t = random_tables(seed)
    mask = t.allowed_mask()
    amin, _, mmin = t.minima()
    allowed = [np.flatnonzero(mask[u]) for u in range(t.num_layers)]
    M0 = np.ascontiguousarray(t.M[:, :, 0])
    limit = t.memory_limit_bytes * (1 + 1e-9)
    L = t.num_layers
    exact = np.full((L, L), np.inf)
    for s in range(L):
        for e in range(s, L):
            for ks in itertools.product(*(allowed[u] for u in range(s, e + 1))):
                us = range(s, e + 1)
                if sum(M0[u, k] for u, k in zip(us, ks)) <= limit:
                    exact[s, e] = min(exact[s, e], sum(t.A[u, k] for u, k in zip(us, ks)))
    ca = np.concatenate([[0.0], np.cumsum(amin)])
    fast = ca[None, 1:] - ca[:-1, None]
    coarsened = 0
    for max_points in (1, 2, 3, 1024):
        got = bounds._knapsack_runs(t.A, M0, allowed, amin, mmin[:, 0], limit, np.inf, max_points)[
            0
        ]
        for s in range(L):
            for e in range(s, L):
                if np.isinf(exact[s, e]):
                    assert np.isinf(got[s, e]) or got[s, e] <= fast[s, e] * (1 + 1e-12)
                    continue
                assert fast[s, e] * (1 - 1e-12) <= got[s, e] <= exact[s, e] * (1 + 1e-12)
                if max_points == 1024:
                    assert got[s, e] == pytest.approx(exact[s, e], rel=1e-12)
                coarsened += max_points < 1024 and got[s, e] < exact[s, e] * (1 - 1e-9)
    assert seed or coarsened  # the first seed's coarsened fronts do lose something


@pytest.mark.parametrize("seed", range(0, 80, 3))
def test_runs_floored_at_their_knapsack_keep_the_bound_and_windows_valid(seed: int) -> None:
    """With each run's time floored at its exact knapsack (SegmentBound.floor_runs, under no
    budget and under the bottleneck cap of the target), the segment bound stays at or below
    the exhaustive optimum for any target, at least as high as without the floor, and its
    windows still hold every fitting assignment faster than the target."""
    from uniap.bounds import SegmentBound

    t = random_tables(seed)
    if seed % 4 == 1:
        t.stage_overhead_s, t.step_overhead_s = 0.2, 0.1
    sols = [(ev.time_per_iteration_s, stage_of) for stage_of, ev in _fitting(t)]
    best = min((tpi for tpi, _ in sols), default=np.inf)
    if not np.isfinite(best):
        return
    amin, _, _ = t.minima()
    for target in (best * (1 + 1e-7), best * 1.05, best * 1.5):
        w = t.num_microbatches - 1
        cap = (target - amin.sum() - t.pp * t.stage_overhead_s) / w * (1 + 1e-9) if w else np.inf
        for budget in (np.inf, cap):
            plain, floored = SegmentBound(t), SegmentBound(t)
            added = floored.floor_runs(budget)
            assert added == (t.virtual_stages == 1 and not t.zero_bubble)
            assert floored.floor_runs(budget) is False  # tried once
            for goal in (None, best, target):
                lb = floored.lower_bound(goal)
                assert lb <= best * (1 + 1e-12)
                assert lb >= plain.lower_bound(goal) * (1 - 1e-9)
            window = floored.windows(target)
            for tpi, stage_of in sols:
                if tpi < target:
                    assert all(stage_of[u] in window[u] for u in range(t.num_layers))


@pytest.mark.parametrize("seed", range(8))
def test_extend_front_equals_the_pareto_front_of_every_extension(seed: int) -> None:
    """The extended front is, point by point, the (time, memory) Pareto front of the grid of
    every front point plus every option within the limit, by brute force: times ascending,
    memories strictly descending, each point's grid index the first of its equal points (small
    integers, so that equal sums and equal times with different memories occur)."""
    from uniap.bounds import extend_front

    rng = np.random.default_rng(seed)
    a = np.sort(rng.choice(30, size=12, replace=False)).astype(float)  # a front: times up,
    m = np.sort(rng.choice(30, size=12, replace=False))[::-1].astype(float)  # memories down
    ra = rng.integers(0, 6, size=5).astype(float)
    rm = rng.integers(0, 6, size=5).astype(float)
    limit = 28.0
    got_a, got_m, got_idx = extend_front(a, m, ra, rm, limit)
    grid = [
        (a[p] + ra[j], m[p] + rm[j], p * len(ra) + j)
        for p in range(len(a))
        for j in range(len(ra))
        if m[p] + rm[j] <= limit
    ]
    want = [
        (x, y, i)
        for x, y, i in grid
        # no other point is at least as good in both and better in one, nor equal and first
        if not any(
            (x2 <= x and y2 <= y and (x2 < x or y2 < y)) or (x2 == x and y2 == y and i2 < i)
            for x2, y2, i2 in grid
        )
    ]
    want.sort()
    assert [(float(x), float(y), int(i)) for x, y, i in zip(got_a, got_m, got_idx)] == want
    assert len(want) > 1 and np.all(np.diff(got_m) < 0)
