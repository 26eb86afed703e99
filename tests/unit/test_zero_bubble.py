"""Interleaved zero bubble (torch's ``ScheduleInterleavedZeroBubble``, v = 2): its order of
operations against torch's, its time (the longest path through that order) and in-flight
memory, the solver and the bounds against enumeration, and plans that use it."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from uniap.bounds import SegmentBound, bottleneck_lower_bound, candidate_lower_bound, stage_windows
from uniap.cost_model import CostTables, evaluate_assignment
from uniap.milp import solve
from uniap.schedules import (
    get_schedule,
    inflight_microbatches,
    zero_bubble_makespan,
    zero_bubble_order,
)
from uniap.search import compositions, exhaustive, heuristic

ZB = "InterleavedZeroBubble"
SHAPES = [(2, 2, 2), (2, 2, 4), (4, 2, 4), (4, 2, 8), (4, 2, 12), (3, 2, 6), (2, 1, 4)]


def _torch_order(pp: int, v: int, c: int) -> dict[int, list[tuple[str, int, int]]]:
    """torch's own ``pipeline_order`` of ``ScheduleInterleavedZeroBubble`` for ``(pp, v, c)``,
    built by the class's own methods without stages or a process group."""
    from torch.distributed.pipelining.schedules import (
        ScheduleInterleavedZeroBubble,
        _ComputationType,
    )

    kind = {
        _ComputationType.FORWARD: "F",
        _ComputationType.BACKWARD_INPUT: "B",
        _ComputationType.BACKWARD_WEIGHT: "W",
    }
    s = object.__new__(ScheduleInterleavedZeroBubble)
    s.pp_group_size, s.n_local_stages, s._n_microbatches = pp, v, c
    s.number_of_rounds = max(1, c // pp)
    s.microbatches_per_round = c // s.number_of_rounds
    s.pipeline_order = {r: s._calculate_single_rank_operations(r) for r in range(pp)}
    s.pipeline_order = s._add_bubbles_to_actions(pp * v)
    return {
        r: [(kind[a.computation_type], a.microbatch_index, a.stage_index) for a in ops if a]
        for r, ops in s.pipeline_order.items()
    }


@pytest.mark.parametrize("pp,v,c", SHAPES)
def test_order_and_inflight_follow_torchs_schedule(pp: int, v: int, c: int) -> None:
    """Each rank's operations are torch's, in torch's order; each stage's in-flight count is
    the most micro-batches between their forward and their weight gradient in that order."""
    torch_order = _torch_order(pp, v, c)
    for r in range(pp):
        assert zero_bubble_order(pp, v, c, r) == torch_order[r]
    for j in range(pp * v):
        alive, peak = 0, 0
        for kind, _, stage in torch_order[j % pp]:
            if stage == j:
                alive += {"F": 1, "B": 0, "W": -1}[kind]
                peak = max(peak, alive)
        assert inflight_microbatches(ZB, j, pp, c, v) == peak


def _brute_makespan(pp, v, c, f, b, w, link) -> float:
    """Each rank runs torch's order, an operation starting when its rank is free and its
    input is there: repeated relaxation until nothing moves (independent of the DAG code)."""
    orders = _torch_order(pp, v, c)
    S = pp * v
    end: dict[tuple[str, int, int], float] = {}
    pos = [0] * pp
    free = [0.0] * pp
    while any(pos[r] < len(orders[r]) for r in range(pp)):
        moved = False
        for r in range(pp):
            while pos[r] < len(orders[r]):
                kind, m, j = orders[r][pos[r]]
                if kind == "F":
                    need = [(("F", m, j - 1), link[j - 1] / 2)] if j else []
                elif kind == "B":
                    need = [(("B", m, j + 1), link[j] / 2)] if j < S - 1 else [(("F", m, j), 0)]
                else:
                    need = [(("B", m, j), 0.0)]
                if any(n not in end for n, _ in need):
                    break
                start = max([free[r]] + [end[n] + d for n, d in need])
                end[kind, m, j] = free[r] = start + {"F": f, "B": b, "W": w}[kind][j]
                pos[r] += 1
                moved = True
        assert moved, "deadlock"
    return max(free)


@pytest.mark.parametrize("pp,v,c", SHAPES)
def test_makespan_is_the_simulated_schedule(pp: int, v: int, c: int) -> None:
    """The longest path equals an independent simulation of torch's order with random stage
    times; equal stages give c v (F + B + W) + (pp - 1) (F + B - W) when F = B = W (the zero
    bubble paper's ZB-H1 bubble), a third of interleaved 1F1B's (pp - 1)(F + B + W)."""
    rng = np.random.default_rng(pp * 100 + v * 10 + c)
    S = pp * v
    for _ in range(10):
        f, b, w = (rng.uniform(0.1, 2.0, S).tolist() for _ in range(3))
        link = rng.uniform(0.0, 0.5, S - 1).tolist()
        assert zero_bubble_makespan(pp, v, c, f, b, w, link) == pytest.approx(
            _brute_makespan(pp, v, c, f, b, w, link)
        )
    one = [1.0] * S
    assert zero_bubble_makespan(pp, v, c, one, one, one) == pytest.approx(3 * v * c + pp - 1)


def _random_zb(seed: int) -> CostTables:
    """Small random tables with v = 2 stages per rank, a split backward and a binding memory
    limit."""
    rng = np.random.default_rng(seed)
    pp, v = 2, 2
    L = int(rng.integers(4, 7))
    K = int(rng.integers(2, 4))
    C = int(rng.integers(1, K + 1))
    c = int(rng.choice([2, 4]))
    layout = np.tile(rng.integers(0, C, size=K), (L, 1))
    A = rng.uniform(0.3, 2.0, size=(L, K))
    allowed = []
    for u in range(L):
        ks = sorted(rng.choice(K, size=int(rng.integers(1, K + 1)), replace=False).tolist())
        allowed.append(ks)
        A[u, [k for k in range(K) if k not in ks]] = np.inf
    Af = np.where(np.isfinite(A), A * rng.uniform(0.2, 0.4, size=(L, K)), 0.0)
    Aw = np.where(np.isfinite(A), A * rng.uniform(0.0, 0.4, size=(L, K)), 0.0)
    if seed % 2:  # a run of identical layers (symmetry rows)
        for u in range(2, L):
            A[u], Af[u], Aw[u], allowed[u] = A[1], Af[1], Aw[1], list(allowed[1])
    G = rng.uniform(0.0, 1.0, size=(L, K))
    F = rng.uniform(0.0, 0.5, size=(L, K)) * (seed % 3 != 2)
    M = rng.uniform(1.0, 10.0, size=(L, K, 1)) + rng.uniform(0, 2.0, size=(L, K, pp * v))
    if seed % 2:
        for u in range(2, L):
            G[u], F[u], M[u] = G[1], F[1], M[1]
    R = rng.uniform(0.0, 0.5, size=(L - 1, C, C))
    for a in range(C):
        R[:, a, a] = 0.0
    Rp = rng.uniform(0.05, 1.0, size=(L - 1, C, C))
    t = CostTables(
        pp, c, A, G, M, layout, R, Rp, 1e30, allowed, F=F, schedule=ZB, virtual_stages=v,
        Af=Af, Aw=Aw, stage_overhead_s=0.01 * (seed % 2),
    )  # fmt: skip
    peaks = [
        max(evaluate_assignment(t, st, [min(allowed[u]) for u in range(L)]).peak_memory_bytes)
        for st in compositions(L, pp * v)
    ]
    t.memory_limit_bytes = float(min(peaks) + rng.uniform(0.0, 0.6) * (max(peaks) - min(peaks)))
    return t


@pytest.mark.parametrize("seed", range(10))
def test_solver_and_bounds_equal_enumeration(seed: int) -> None:
    """The program (cold, and warm-started with a cutoff) equals exhaustive search over every
    split into pp * v stages and every strategy; its objective is the longest path of the
    returned assignment; every bound stays below the optimum and every window keeps every
    faster assignment."""
    t = _random_zb(seed)
    opt, stage_of, _ = exhaustive(t)
    sol = solve(t)
    if math.isinf(opt):
        assert sol.status == "infeasible"
        return
    assert sol.status == "optimal"
    assert sol.time_per_iteration_s == pytest.approx(opt, rel=1e-9)
    assert sol.objective_s == pytest.approx(opt, rel=1e-6)
    start = heuristic(t)
    warm = solve(t, incumbent=start, incumbent_tpi_s=opt * 1.02)
    assert warm.time_per_iteration_s == pytest.approx(opt, rel=1e-9)
    assert candidate_lower_bound(t) <= opt * (1 + 1e-12)
    seg = SegmentBound(t)
    for target in (None, opt * 0.999, opt, opt * 1.5):
        assert seg.lower_bound(target) <= opt * (1 + 1e-12)
    assert bottleneck_lower_bound(t) <= max(
        evaluate_assignment(t, stage_of, sol.strategy_of).stage_time_s
    )
    target = opt * 1.05
    win, runs = stage_windows(t, target), seg.windows(target)
    for st in compositions(t.num_layers, t.num_stages):
        for ks in itertools.product(*t.allowed):
            ev = evaluate_assignment(t, st, list(ks))
            if ev.fits and ev.time_per_iteration_s < target:
                assert all(i in win[u] and i in runs[u] for u, i in enumerate(st))


def test_spec() -> None:
    """The spec names torch's class, two stages per rank and c a multiple of pp."""
    spec = get_schedule(ZB)
    assert spec.torch_class == "ScheduleInterleavedZeroBubble" and spec.split_backward
    assert spec.stages_per_rank == (2,) and spec.interleaved
    assert "multiple of the pipeline degree (2)" in spec.why_not(2, 2, 3)
