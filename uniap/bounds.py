"""Lower bounds and stage windows for one ``(pp, c)`` of the program (:mod:`uniap.milp`).

The planner prunes a candidate whose lower bound reaches the best time in hand, and the solver
lets layer u sit on stage i only where some assignment through it may still be faster. Every
bound here is a valid lower bound on the time per iteration of every assignment that fits
(``+inf`` only when no assignment fits), whatever the schedule: a stage's memory depends on its
index (1F1B keeps ``min(c, pp - i)`` micro-batches in flight on stage i), so every split is
checked stage by stage, never by a greedy fill. Tests check each bound against enumeration at
every memory limit where the optimum changes (``tests/unit/test_exactness.py``).

Notation: ``T* = max(max_i p_i, max_i o_i)`` the bottleneck, ``S* = max_i s_i`` the slowest
stage's synchronisation, ``k`` the per-stage overhead, ``step`` the per-iteration overhead, so
``TPI = sum_i p_i + sum_i o_i + (c - 1) T* + S* + step``.

:func:`bottleneck_lower_bound`
    ``T_split``: the min-max split of the chain into ``pp`` runs, layer u weighing
    ``min_k A[u,k]``, stage i holding ``sum min_k M[u,k,i]`` within the limit.
:func:`memory_bottleneck_bound`
    ``T_mem``: the same split with each run weighing its fastest *strategy assignment that fits
    in memory* (an exact knapsack over the run's layers, not the sum of per-layer minima),
    plus ``k``; below a cap (an incumbent's ``T*``) for speed.
:func:`min_peak_memory`
    The leanest assignment's peak memory, exactly: the min-max split of the chain with layer
    u weighing ``min_k M[u,k,i]`` on stage i (no limit).
:func:`candidate_lower_bound`
    ``S + pp k + (c - 1) (max(S / pp, T_split) + k) + Gmin / pp + step`` with
    ``S = sum_u min_k A[u,k]`` and ``Gmin = sum_u min_k G[u,k]``.
The segment bound (:class:`SegmentBound`, :func:`segment_lower_bound`)
    For a box ``T* in [Ta, Tb]``, ``S* in [Sa, Sb]``, every stage ``i`` holds a run ``s..e`` with
    ``p_i >= lb(s, e) + k`` where
    ``lb = max_(nu, mu) sum_u min_k (A + nu G + mu M) - nu Sb - mu limit`` over grids of
    ``nu, mu >= 0`` (Lagrangian bounds of "min sum A with sum G <= Sb and sum M
    within the limit"; ``nu = mu = 0`` is the sum of the fastest times), ``p_i <= Tb``,
    ``sum_u min_k G[u,k] <= Sb``, ``sum_u min_k M[u,k,i] <=`` the limit, and an outgoing edge
    ``min_ab Rp[e,a,b] <= o_i <= Tb`` (all stages but the last). So
    ``TPI >= (c - 1) Ta + Sa + F(Tb, Sb) + step`` where ``F`` is the cheapest split of the chain
    into ``pp`` such runs (a dynamic program over run ends, stage by stage, over the runs
    whose leanest memory fits the stage only: with memory tight these are short, and the
    program's work per box is their number, not ``pp L^2``). The boxes cover
    ``T* >= max(T_split, S / pp) + k`` and ``S* >= max(Gmin / pp, max_u Gmin_u)``; the box with
    the lowest bound is split until all reach the target. Results are scaled by ``1 - 1e-9``
    against rounding. When that does not settle a candidate, ``lb(s, e)`` is raised to the
    run's exact knapsack on stage i (:meth:`SegmentBound.floor_runs`: the fastest strategies
    whose memory fits, each layer's time-memory Pareto strategies, reshards left out; one stage
    per rank only), which the prices can miss by a recomputed layer or more: on the 128-layer
    model at 8 devices, batch 64, fp32, the pp = 4 candidate's bound rises from 104.4 s to the
    plan's 113.1 s.
Interleaved schedules (``v`` stages per rank, ``T*``, ``S*`` per rank; the time is the
longest path through the schedule's operations, :func:`uniap.schedules.schedule_makespan`):
the chain is split into ``pp * v`` runs; each stage's time, edge, sync and memory are at most
its rank's, so the runs above stay valid stage by stage, ``T* >= sum_u min_k A[u,k] / pp + v
k`` (the busiest rank's share and its ``v`` overheads), and ``TPI >= c T* + S* + step`` only
(the busiest rank runs its ``c`` micro-batches' operations one after the other); no fill
term.
Windows (:func:`stage_windows`, :func:`segment_windows`)
    With an incumbent of time ``T``: a layer may sit on stage i only if stages 0..i can reach it
    and stages i..pp-1 can cover the rest with each stage's compute and memory lower bounds
    (``total_min + (c - 1) seg <= T``), and only if some run through it on stage i keeps the
    segment bound below ``T``. They remove only assignments that cannot beat ``T``.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

from uniap.cost_model import CostTables

__all__ = [
    "bottleneck_lower_bound",
    "candidate_lower_bound",
    "coarsen_front",
    "extend_front",
    "knapsack_runs",
    "memory_bottleneck_bound",
    "memory_split",
    "min_max_split",
    "min_peak_memory",
    "segment_lower_bound",
    "segment_windows",
    "stage_windows",
    "SegmentBound",
]


def candidate_lower_bound(t: CostTables) -> float:
    """The cheap bound of a candidate (see the module docstring); ``inf`` when nothing fits."""
    amin, gmin, _ = t.minima()
    s = float(amin.sum())
    k = t.stage_overhead_s  # every stage pays it, the bottleneck one too
    split = bottleneck_lower_bound(t)
    if not np.isfinite(split):
        return float("inf")  # no split of the chain fits in memory
    v = t.virtual_stages
    # the busiest rank holds v stages (each paying k) and at least its share of the compute
    bottleneck = max(s / t.pp + v * k, split + k)
    if t.longest_path:  # c T* alone: the busiest rank runs all of its operations one by one
        return t.num_microbatches * bottleneck + float(gmin.sum()) / t.pp + t.step_overhead_s
    return (
        (s + t.num_stages * k) / v
        + (t.num_microbatches - 1 / v) * bottleneck
        + float(gmin.sum()) / t.pp
        + t.step_overhead_s
    )


def bottleneck_lower_bound(t: CostTables) -> float:
    """A lower bound on the slowest stage ``max_i p_i`` of any assignment that fits: the min-max
    split of the chain into ``pp`` contiguous, non-empty stages where layer u weighs
    ``min_k A[u,k]`` and stage i must hold ``sum min_k M[u,k,i]`` within the memory limit
    (``inf`` only if no split fits, i.e. the candidate has no feasible assignment).

    Validity: an assignment that fits splits the chain into such runs; each of its stages
    takes at least the sum of its layers' fastest times and holds at least the sum of their
    smallest memories *on that stage*, so its split is feasible here and its bottleneck is at
    least this one. Exactness of the split: bisection on the bottleneck ``cap``, and for each
    ``cap`` a dynamic program over split points, stage by stage (which run ends are reachable
    by stages ``0..i``). A sub-run of a run that fits also fits (weights and memories are
    non-negative), so from each reachable start the allowed ends form one interval and a
    stage is one pass over starts. A greedy fill ("each stage as far as it goes") is NOT
    valid here: memory depends on the stage (1F1B keeps ``min(c, pp - i)`` micro-batches on
    stage i), so a longer stage i can push a large layer onto a stage where it no longer
    fits while a shorter stage i would have worked."""
    L, pp = t.num_layers, t.num_stages
    if L < pp:
        return float("inf")
    amin, _, mmin = t.minima()
    limit = t.memory_limit_bytes * (1 + 1e-9)

    ca = np.concatenate([[0.0], np.cumsum(amin)])
    cm = np.vstack([np.zeros((1, pp)), np.cumsum(mmin, axis=0)])
    # Sums of runs are differences of prefix sums: allow for their rounding so that a run that
    # fits is never judged too big (the bound must stay below the true one).
    t_slack = 1e-12 * float(ca[-1])
    m_slack = 1e-12 * float(np.nanmax(np.where(np.isfinite(cm[-1]), cm[-1], 0.0)))
    # by_mem[i][s]: the largest end e (exclusive) with layers s..e-1 within memory on stage i.
    by_mem = [
        np.searchsorted(cm[:, i], cm[:-1, i] + limit + m_slack, side="right") - 1 for i in range(pp)
    ]
    starts = np.arange(L)
    # every layer alone fits every stage's memory: then (with every layer within the cap) the
    # ends stage i reaches are one interval, as the allowed ends grow with the start
    alone = all(bool((by_mem[i] >= starts + 1).all()) for i in range(pp))
    mem_lists = [m.tolist() for m in by_mem]

    def fits(cap: float) -> bool:
        by_time = np.searchsorted(ca, ca[:-1] + cap + t_slack, side="right") - 1
        if alone and (by_time >= starts + 1).all():
            first, last = 0, 0  # the starts stage i may take: first..last
            times = by_time.tolist()
            for i in range(pp):
                top = min(last, L - pp + i)  # it must leave a layer to each later stage
                if first > top:
                    return False
                first, last = first + 1, min(times[top], mem_lists[i][top], L - (pp - 1 - i))
            return first <= L <= last
        reach = np.zeros(L + 1, dtype=bool)  # reach[s]: stages 0..i-1 cover layers 0..s-1
        reach[0] = True
        for i in range(pp):
            # Stage i runs from a reachable start s to an end in s+1..hi[s]; it must leave at
            # least one layer to each later stage.
            hi = np.minimum(np.minimum(by_time, by_mem[i]), L - (pp - 1 - i))
            ok = reach[:L] & (hi >= starts + 1)
            if not ok.any():
                return False
            diff = np.bincount(starts[ok] + 1, minlength=L + 2) - np.bincount(
                hi[ok] + 1, minlength=L + 2
            )
            reach = np.cumsum(diff)[: L + 1] > 0
        return bool(reach[L])

    lo, hi = float(amin.max()), float(amin.sum())
    if not np.isfinite(hi) or not fits(hi * (1 + 1e-12)):
        return float("inf")
    if pp == 1:
        return hi * (1 - 1e-9)
    # The bottleneck of the best split is the weight of one of its runs: bisection over the
    # sorted run weights (about 2 log2 L steps) instead of over the reals.
    runs = (ca[None, 1:] - ca[:-1, None])[np.triu_indices(L)]
    runs = np.unique(runs[(runs >= lo * (1 - 1e-12)) & (runs <= hi * (1 + 1e-12))])
    a, b = 0, len(runs) - 1  # fits(runs[b]) holds (runs[-1] is the whole chain, hi)
    while a < b:
        mid = (a + b) // 2
        if fits(runs[mid]):
            b = mid
        else:
            a = mid + 1
    return float(runs[b]) * (1 - 1e-9)


def memory_bottleneck_bound(
    t: CostTables, cap_s: float = float("inf"), *, max_points: int | None = None
) -> float:
    """A lower bound on the slowest stage ``T* >= max_i p_i`` (stage overhead ``k`` included)
    of every assignment that fits with ``T* <= cap_s``; ``cap_s`` itself when no such split
    exists (so ``min(T*, cap_s)`` is bounded for every assignment that fits). One stage per
    rank only (interleaved tables: the fastest-times split, :func:`bottleneck_lower_bound`).

    Stage i holding the run ``s..e`` takes at least ``k`` plus the fastest sum of ``A`` over
    the strategy choices of its layers whose memory ``sum M[u, k_u, i]`` fits the limit
    (reshard times are >= 0): the exact multiple-choice knapsack of the run, found as the
    Pareto front of (time, memory) sums, layer by layer (runs of equal layers share their
    fronts). :func:`bottleneck_lower_bound` weighs each layer by its fastest strategy and each
    run's memory by its leanest, separately: with memory tight (a stage must recompute some
    of its layers) ``T_mem`` is the larger, by the recomputation the stage cannot avoid.
    The min-max split over these run times is a dynamic program over run ends, stage by
    stage. Runs whose fastest times alone exceed ``cap_s`` are left out (an assignment with
    ``T* <= cap_s`` has none). A front larger than ``max_points`` (default
    :data:`KNAPSACK_POINTS`) is coarsened from below (:func:`coarsen_front`): that run's time
    and its extensions' are then at most their exact knapsacks (smaller, still valid)."""
    L, pp = t.num_layers, t.num_stages
    cap = float(cap_s)
    if L < pp or t.virtual_stages > 1:
        return min(cap, bottleneck_lower_bound(t) + t.stage_overhead_s)
    best, _ = memory_split(t, cap, max_points=max_points)
    return min(cap, best * (1 - 1e-9)) if np.isfinite(best) else cap


def memory_split(
    t: CostTables, cap_s: float = float("inf"), *, max_points: int | None = None
) -> tuple[float, list[tuple[int, int]]]:
    """The split behind :func:`memory_bottleneck_bound` (one stage per rank): its bottleneck
    (``k`` included; inf when no split has every run within ``cap_s``) and its runs ``(s, e)``
    per stage (empty when none)."""
    L, pp = t.num_layers, t.num_stages
    if L < pp:
        return float("inf"), []
    k = t.stage_overhead_s
    mask = t.allowed_mask()
    amin, _, mmin = t.minima()
    limit = t.memory_limit_bytes * (1 + 1e-9)
    ca = np.concatenate([[0.0], np.cumsum(amin)])
    t_slack = 1e-12 * float(ca[-1])
    budget = float(cap_s) - k + t_slack if np.isfinite(cap_s) else np.inf
    allowed = [np.flatnonzero(mask[u]) for u in range(L)]
    run_time: dict[bytes, np.ndarray] = {}  # per distinct memory table: [s, e]
    stage_runs = []
    for i in range(pp):
        Mi = np.ascontiguousarray(t.M[:, :, i])
        key = Mi.tobytes()
        if key not in run_time:
            run_time[key] = knapsack_runs(
                t.A, Mi, allowed, amin, mmin[:, i], limit, budget, max_points or KNAPSACK_POINTS
            )
        stage_runs.append(run_time[key])
    best, runs = min_max_split(stage_runs)
    return (best + k, runs) if np.isfinite(best) else (float("inf"), [])


def min_max_split(stage_runs: list[np.ndarray]) -> tuple[float, list[tuple[int, int]]]:
    """The split of layers ``0..L-1`` into ``len(stage_runs)`` contiguous, non-empty runs, one
    per stage, whose largest ``stage_runs[i][s, e]`` is least: that value (inf when every
    split has an infinite run) and the runs ``(s, e)`` per stage (empty when inf). A dynamic
    program over run ends, stage by stage."""
    pp, L = len(stage_runs), stage_runs[0].shape[0]
    # g[i][e]: the smallest largest run of stages 0..i covering layers 0..e
    g = [stage_runs[0][0].copy()]
    arg: list[np.ndarray] = [np.zeros(L, dtype=np.int64)]
    for i in range(1, pp):
        prev = np.concatenate([[np.inf], g[-1][:-1]])  # prev[s]: stages 0..i-1 end at s - 1
        tot = np.maximum(prev[:, None], stage_runs[i])
        arg.append(tot.argmin(axis=0))
        g.append(tot.min(axis=0))
    best = float(g[-1][L - 1])
    if not np.isfinite(best):
        return float("inf"), []
    runs, e = [], L - 1
    for i in range(pp - 1, -1, -1):
        s = int(arg[i][e]) if i else 0
        runs.append((s, e))
        e = s - 1
    return best, runs[::-1]


def extend_front(
    a: np.ndarray, m: np.ndarray, ra: np.ndarray, rm: np.ndarray, limit: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (time, memory) Pareto front of every point of the front ``(a, m)`` extended by
    every option ``(ra, rm)`` of the next layer, within ``limit``: its times ascending (its
    memories descending) and each point's index into the ``len(a) x len(ra)`` grid (its
    parent ``idx // len(ra)``, its option ``idx % len(ra)``). Of equal points the first."""
    a2 = (a[:, None] + ra[None, :]).ravel()
    m2 = (m[:, None] + rm[None, :]).ravel()
    idx = np.flatnonzero(m2 <= limit)
    # by time, then memory, then index: a stable sort of complex keys (numpy orders them by
    # real part, then imaginary), 1.8 times faster than a lexsort of the two keys
    key = np.empty(len(idx), dtype=np.complex128)
    key.real, key.imag = a2[idx], m2[idx]
    idx = idx[np.argsort(key, kind="stable")]
    mo = m2[idx]
    # a point stays when it needs less memory than every faster one
    idx = idx[mo < np.concatenate([[np.inf], np.minimum.accumulate(mo)[:-1]])]
    return a2[idx], m2[idx], idx


def coarsen_front(a: np.ndarray, m: np.ndarray, points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``points`` points that cover the front ``(a, m)`` (times ascending, memories
    descending) from below: its points cut into ``points`` consecutive groups, each replaced by
    its fastest time with its leanest memory (the group's first time, its last memory). Every
    point of ``(a, m)`` is matched or beaten in both by one of them, and so is every extension
    of it by the same extension of that one: a knapsack over coarsened fronts is never above
    the exact one."""
    points = max(points, 1)
    if len(a) <= points:
        return a, m
    starts = np.linspace(0, len(a), points, endpoint=False).astype(np.int64)
    ends = np.concatenate([starts[1:], [len(a)]]) - 1
    return a[starts], m[ends]


KNAPSACK_POINTS = 1024
"""Points per front of the runs' knapsacks (:func:`knapsack_runs`) that the bounds and the
pipelined label search ask for, the same everywhere so that they share the answers; a larger
front is coarsened (:data:`COARSE_POINTS`)."""

COARSE_POINTS = 64
"""Points a run's knapsack front is coarsened to (:func:`coarsen_front`) when it outgrows
``max_points``: its runs' times stay valid lower bounds, and close to exact where the fastest
times alone (what such runs had before) miss the memory by several recomputed layers. The
128-layer model on 64 H100s, fp32, batch 512: the bottleneck split's start for 8 stages of
64 micro-batches went from 7 % above the optimum (its first stage's run counted at its fastest
times, 13 % below what fits) to 0.001 %, and the search from 17 s to 4.6-6 s. A coarsened
front's extensions are coarsened too (to 64 points whenever they have more), so the runs past
the overflow cost 64 points per strategy: the 128-layer model at 32 devices, fp32, batch 256,
3.2 s with the fastest-times fallback, 3.7 s re-coarsening only above 1,024 points, 2.9 s
so (medians of three)."""

_Answer = tuple[float, np.ndarray, np.ndarray, np.ndarray]
_KNAPSACK_MEMO: OrderedDict[bytes, _Answer] = OrderedDict()
""":func:`knapsack_runs` answers by their arguments' contents (the latest 32): the bounds and
the label search of one plan ask for the same runs under different budgets. Each entry keeps
its budget, its answer, its runs' fastest times and its fronts' fastest times (for
``max_fronts``): a hit answers exactly what a fresh computation would, so the memo changes no
plan, whatever was planned before in the process."""
_KNAPSACK_LOCK = threading.Lock()


def knapsack_runs(
    A: np.ndarray,
    M: np.ndarray,
    allowed: list[np.ndarray],
    amin: np.ndarray,
    mmin: np.ndarray,
    limit: float,
    budget: float,
    max_points: int,
    max_fronts: int | None = None,
) -> np.ndarray | None:
    """``[s, e]``: the fastest sum of ``A`` over layers ``s..e`` with ``sum M <= limit`` (inf
    when nothing fits or the fastest times alone exceed ``budget``; at most that sum, and at
    least the fastest times, where a front outgrew ``max_points`` and was coarsened); see
    :func:`memory_bottleneck_bound`. An answer for a budget at least as large is reused: its
    runs within ``budget`` are the same. None when it would build more than ``max_fronts``
    fronts (distinct sequences of layer classes: about ``3 L`` for a stack of equal blocks,
    ``L^2 / 2`` for layers that all differ)."""
    digest = hashlib.sha1()
    for part in (A, M, amin, mmin, np.array([limit, max_points], dtype=np.float64)):
        digest.update(np.ascontiguousarray(part).tobytes())
    for ks in allowed:
        digest.update(np.asarray(ks, dtype=np.int64).tobytes() + b"|")
    key = digest.digest()
    with _KNAPSACK_LOCK:
        hit = _KNAPSACK_MEMO.get(key)
        if hit is not None and hit[0] >= budget:
            _KNAPSACK_MEMO.move_to_end(key)
        else:
            hit = None
    if hit is not None:
        # a fresh computation would build the root and every front whose run is within budget
        if max_fronts is not None and 1 + np.count_nonzero(hit[3] <= budget) > max_fronts:
            return None
        return np.where(hit[2] <= budget, hit[1], np.inf)
    got = _knapsack_runs(A, M, allowed, amin, mmin, limit, budget, max_points, max_fronts)
    if got is None:
        return None
    out, fast, front_fast = got
    with _KNAPSACK_LOCK:
        _KNAPSACK_MEMO[key] = (budget, out, fast, front_fast)
        if len(_KNAPSACK_MEMO) > 32:
            _KNAPSACK_MEMO.popitem(last=False)
    return out.copy()


def _knapsack_runs(
    A: np.ndarray,
    M: np.ndarray,
    allowed: list[np.ndarray],
    amin: np.ndarray,
    mmin: np.ndarray,
    limit: float,
    budget: float,
    max_points: int,
    max_fronts: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """:func:`knapsack_runs`, ``[s, e]`` the fastest times' sum of each run it answered (inf
    for the others), and each front's fastest times (those of its runs, equal layers summed in
    the same order); None above ``max_fronts`` fronts (the empty run's included)."""
    L = A.shape[0]
    # a strategy another of its layer matches or beats in time and memory never helps a front;
    # layers with equal rows are one class (found once): runs with equal class sequences share
    # their fronts, found in a trie of class sequences (node 0: the empty run)
    ids: dict[bytes, int] = {}
    cls, rows = [], []
    for u in range(L):
        ks = np.asarray(allowed[u])
        key = ks.tobytes() + A[u].tobytes() + M[u].tobytes()
        if key not in ids:
            ids[key] = len(rows)
            a, m = A[u, ks], M[u, ks]
            beaten = (a[None, :] <= a[:, None]) & (m[None, :] <= m[:, None])  # k' beats k
            beaten &= (
                (a[None, :] < a[:, None])
                | (m[None, :] < m[:, None])
                | np.tri(len(ks), k=-1, dtype=bool)
            )  # strictly, or equal and listed first
            ks = ks[~beaten.any(axis=1)]
            rows.append((A[u, ks], M[u, ks]))
        cls.append(ids[key])
    amin_l, mmin_l = amin.tolist(), mmin.tolist()
    child: dict[tuple[int, int], int] = {}
    fronts: list[tuple[np.ndarray, np.ndarray, bool] | None] = [(np.zeros(1), np.zeros(1), False)]
    front_fast: list[float] = []  # per front but the root's
    where_s: list[int] = []
    where_e: list[int] = []
    best: list[float] = []
    fasts: list[float] = []
    for s in range(L):
        node = 0
        front = fronts[0]
        fast = 0.0
        lean = 0.0
        for e in range(s, L):
            fast += amin_l[e]
            lean += mmin_l[e]
            if fast > budget or lean > limit:
                break  # longer runs are slower still, or fit no better
            nxt = child.get((node, cls[e]))
            if nxt is not None:
                node, front = nxt, fronts[nxt]
            else:
                if front is not None:
                    a, m, _ = extend_front(front[0], front[1], *rows[cls[e]], limit)
                    # a coarsened front's extensions stay coarse: it lost its exactness
                    # already, and its points stay few (64 times the layer's strategies)
                    coarse = front[2] or len(a) > max_points
                    if coarse:
                        a, m = coarsen_front(a, m, min(COARSE_POINTS, max_points))
                    front = (a, m, coarse) if len(a) else None
                child[(node, cls[e])] = len(fronts)
                node = len(fronts)
                fronts.append(front)
                front_fast.append(fast)
                if max_fronts is not None and len(fronts) > max_fronts:
                    return None
            where_s.append(s)
            where_e.append(e)
            best.append(float(front[0][0]) if front is not None else fast)
            fasts.append(fast)
    out = np.full((L, L), np.inf)
    fast_of = np.full((L, L), np.inf)
    out[where_s, where_e] = best
    fast_of[where_s, where_e] = fasts
    return out, fast_of, np.array(front_fast)


def segment_lower_bound(
    t: CostTables, target: float | None = None, *, max_evals: int = 48
) -> float:
    """A lower bound on the time per iteration of every assignment that fits, stronger than
    the candidate bound of the planner: it keeps the stages contiguous and every stage's own
    compute, gradient synchronisation, memory and outgoing edge together. When ``target`` is
    given it refines until the bound reaches it (the candidate cannot beat ``target``) or
    ``max_evals`` dynamic programs were run; the value is valid either way.

    With ``T* = max(max_i p_i, max_i o_i)`` and ``S* = max_i s_i`` of an assignment,
    ``TPI = sum_i p_i + sum_i o_i + (c - 1) T* + S* + step``. For a box
    ``T* in [Ta, Tb]``, ``S* in [Sa, Sb]``: every stage ``i`` holds a run ``s..e`` with

    - ``p_i >= lb(s, e) + k`` where ``lb = max_nu sum_u min_k (A + nu G) - nu Sb`` over a grid
      of ``nu >= 0`` (Lagrangian bound of "min sum A with sum G <= Sb"; ``nu = 0`` is the sum of
      the fastest times), and ``p_i <= Tb``;
    - ``sum_u min_k G[u,k] <= Sb`` and ``sum_u min_k M[u,k,i] <=`` the memory limit;
    - an outgoing edge ``o_i >= min_ab Rp[e,a,b]``, ``o_i <= Tb`` (all stages but the last).

    So ``TPI >= (c - 1) Ta + Sa + F(Tb, Sb) + step`` where ``F`` is the cheapest split of the
    chain into ``pp`` such runs (a dynamic program over run ends, stage by stage). The boxes
    cover ``T* >= T0`` (the min-max split bound plus the stage overhead) and
    ``S* >= max(sum G_min / pp, max G_min)``; the box with the lowest bound is split until all
    reach ``target``. The result is scaled by ``1 - 1e-9`` against rounding."""
    return SegmentBound(t).lower_bound(target, max_evals=max_evals)


def segment_windows(t: CostTables, target: float, *, max_evals: int = 48) -> list[list[int]]:
    """For each layer, the stages it may sit on in any assignment faster than ``target``: the
    runs ``s..e`` on stage ``i`` whose segment bound (:func:`segment_lower_bound`, the best
    split through that run, in every box of ``(T*, S*)`` the refinement leaves) stays below
    ``target``. Empty lists when nothing can be faster."""
    return SegmentBound(t).windows(target, max_evals=max_evals)


_FLOOR_FRONTS = 2000
"""Fronts the run floor may build per stage group (a stack of equal blocks needs about three
per layer); above it the floor is left out."""


class SegmentBound:
    """The dynamic program behind :func:`segment_lower_bound` and :func:`segment_windows` for
    one table (built once, asked again for other targets; the table must not change)."""

    def __init__(self, t: CostTables) -> None:
        L, pp, c, v = t.num_layers, t.num_stages, t.num_microbatches, t.virtual_stages
        self.t, self.L, self.pp = t, L, pp
        # TPI = fill + (c - 1) T* + S* (one stage per rank); interleaved (v stages per rank,
        # T* and S* per rank): every stage's p_j, o_j is at most T*, its sync and memory at
        # most its rank's, so the runs below stay valid per stage
        self.k, self.step, self.w, self.fscale = (
            t.stage_overhead_s,
            t.step_overhead_s,
            c - 1 / v,
            1 / v,
        )
        if t.longest_path:  # TPI >= c T* + S*: no fill term (the split's cost does not count)
            self.w, self.fscale = c, 0.0
        self.split = bottleneck_lower_bound(t) if L >= pp else float("inf")
        if not np.isfinite(self.split):
            return
        k = self.k
        amin, gmin, mmin = t.minima()
        mask = t.allowed_mask()
        self.T0 = max(self.split + k, float(amin.sum()) / t.pp + v * k)
        self.S0 = max(float(gmin.sum()) / t.pp, float(gmin.max()))
        # Stages with the same memory rows (1F1B: all that hold c micro-batches) share their runs.
        self.group_of, reps = [], []
        seen: dict[bytes, int] = {}
        for i in range(pp):
            j = seen.setdefault(np.ascontiguousarray(t.M[:, :, i]).tobytes(), len(reps))
            if j == len(reps):
                reps.append(i)
            self.group_of.append(j)
        # Multiplier grids: the exchange rates between the layers' strategies of time and
        # synchronisation (nu) and of time and memory (mu), at a few quantiles.
        nus = _rates(t.A, t.G, mask, 12)
        budget = 3_000_000  # floats per table of runs: fewer memory multipliers on big programs
        n_mu = int(max(1, min(8, budget // (len(nus) * len(reps) * L * L))))
        mus = _rates(t.A, t.M[:, :, 0], mask, n_mu - 1) if n_mu > 1 else np.zeros(1)
        self.nus = nus
        self.nu_of = np.repeat(nus, len(mus))
        self.mu_of = np.tile(mus, len(nus))
        self.upper = np.triu(np.ones((L, L), dtype=bool))
        cg = np.concatenate([[0.0], np.cumsum(gmin)])
        self.seg_g = cg[None, 1:] - cg[:-1, None]
        cm = np.vstack([np.zeros((1, pp)), np.cumsum(mmin, axis=0)])
        slack_m = 1e-12 * float(cm[-1].max())
        self.limit = t.memory_limit_bytes * (1 + 1e-9) + slack_m
        self.mem_ok = np.stack(
            [self.upper & (cm[None, 1:, i] - cm[:-1, None, i] <= self.limit) for i in range(pp)]
        )
        # The runs a stage may hold (within memory), per stage group: their starts and ends,
        # sorted by end, with each end's first position (the split's minimum per end).
        self.pairs = []
        for i in reps:
            s_of, e_of = np.nonzero(self.mem_ok[i])
            order = np.lexsort((s_of, e_of))
            s_of, e_of = s_of[order], e_of[order]
            ends, firsts = np.unique(e_of, return_index=True)
            self.pairs.append((s_of, e_of, ends, firsts))
        self.run_g = [self.seg_g[s_of, e_of] for s_of, e_of, _, _ in self.pairs]
        # per stage group and run: [nu, run] = max over mu of (sum over u in s..e of min_k
        # (A + nu G + mu M)) - mu limit
        self.seg_h = []
        self.slack_t = 1e-300
        priced = np.where(self.mu_of == 0, 0.0, self.mu_of * self.limit)  # 0 * inf = 0
        for i, (s_of, e_of, _, _) in zip(reps, self.pairs):
            h = np.where(
                mask[None],
                t.A[None]
                + self.nu_of[:, None, None] * t.G[None]
                + self.mu_of[:, None, None] * t.M[None, :, :, i],
                np.inf,
            ).min(axis=2)
            H = np.concatenate([np.zeros((len(self.nu_of), 1)), np.cumsum(h, axis=1)], axis=1)
            self.slack_t = max(self.slack_t, 1e-12 * float(np.max(np.abs(H))))
            seg = H[:, e_of + 1] - H[:, s_of]
            # the memory multipliers' side does not depend on S*: per nu, their best, once
            self.seg_h.append(
                np.stack(
                    [
                        (seg[on] - priced[on][:, None]).max(axis=0)
                        for on in (self.nu_of == nu for nu in nus)
                    ]
                )
            )
        self.reps, self.knap, self.floor_tried = reps, None, False
        self.cut = np.full(L, np.inf)
        if L > 1:
            self.cut[:-1] = t.Rp.reshape(L - 1, -1).min(axis=1)
        self.run_cache: dict[float, list[np.ndarray]] = {}
        self.evals = 0

    def floor_runs(self, budget: float) -> bool:
        """Floor each run's time at its exact knapsack (one stage per rank): the fastest
        strategies whose memory fits on the stage, reshards left out, which the Lagrangian
        prices can miss by a recomputed layer or more (:func:`knapsack_runs`; runs whose
        fastest times exceed ``budget``, the slowest stage that can still beat the target,
        keep those times as their floor; a run past a coarsened front, at most its knapsack).
        Tried once; True when the floor was added (the runs have few distinct sequences of
        layer classes, as stacks of equal blocks do)."""
        t = self.t
        if self.floor_tried or t.virtual_stages > 1 or t.longest_path:
            return False
        self.floor_tried = True
        L = self.L
        mask = t.allowed_mask()
        amin, _, mmin = t.minima()
        allowed = [np.flatnonzero(mask[u]) for u in range(L)]
        ca = np.concatenate([[0.0], np.cumsum(amin)])
        fast = ca[None, 1:] - ca[:-1, None]  # [s, e]: the fastest times of s..e
        floors = []
        for i in self.reps:
            knap = knapsack_runs(
                t.A,
                np.ascontiguousarray(t.M[:, :, i]),
                allowed,
                amin,
                mmin[:, i],
                t.memory_limit_bytes * (1 + 1e-9),
                budget - self.k,
                KNAPSACK_POINTS,
                _FLOOR_FRONTS,
            )
            if knap is None:
                return False
            s_of, e_of, _, _ = self.pairs[len(floors)]
            floors.append(np.where(np.isfinite(knap), knap, fast)[s_of, e_of])
        self.knap = floors
        self.run_cache.clear()
        return True

    def floor_bottleneck(self, floor_s: float) -> None:
        """Raise the smallest ``T*`` the boxes cover to ``floor_s``, a lower bound on every
        fitting assignment's slowest stage (:func:`memory_bottleneck_bound`)."""
        self.T0 = max(self.T0, floor_s)

    def lower_bound(self, target: float | None = None, *, max_evals: int = 48) -> float:
        """See :func:`segment_lower_bound`."""
        return self.refine(target, max_evals)[0]

    def windows(self, target: float, *, max_evals: int = 48) -> list[list[int]]:
        """See :func:`segment_windows`."""
        lb, boxes = self.refine(target, max_evals)
        cover = np.zeros((self.L, self.pp), dtype=bool)
        if lb < target:
            for box in boxes:
                cover |= self.covering(box, target)
        return [[i for i in range(self.pp) if cover[u, i]] for u in range(self.L)]

    def run_time(self, Sb: float) -> list[np.ndarray]:
        """Per stage group, for each of its runs ``s..e`` (:attr:`pairs`): a lower bound on
        the stage time of those layers (compute, within memory, with sync <= Sb)."""
        if Sb not in self.run_cache:
            finite = np.isfinite(Sb)
            use = slice(None) if finite else self.nus == 0  # an unbounded S*: nu = 0 only
            off = (self.nus * (Sb if finite else 0.0))[use][:, None]
            out = []
            for j, sh in enumerate(self.seg_h):
                v = (sh[use] - off).max(axis=0)
                if self.knap is not None:
                    v = np.maximum(v, self.knap[j])
                if finite:
                    v = np.where(self.run_g[j] <= Sb * (1 + 1e-12) + self.slack_t, v, np.inf)
                out.append(v - self.slack_t + self.k)
            self.run_cache[Sb] = out
        return self.run_cache[Sb]

    def run_costs(self, Tb: float, Sb: float) -> list[np.ndarray]:
        """Per stage, for each run of its group (:attr:`pairs`): the cost of the run as that
        stage (its time bound and outgoing edge), inf where it cannot be (above Tb)."""
        runs = self.run_time(Sb)
        cut_ok = self.cut <= Tb
        out = []
        for i in range(self.pp):
            j = self.group_of[i]
            val = runs[j]
            if i < self.pp - 1:
                e_of = self.pairs[j][1]
                out.append(np.where((val <= Tb) & cut_ok[e_of], val + self.cut[e_of], np.inf))
            else:
                out.append(np.where(val <= Tb, val, np.inf))
        return out

    def stage_costs(self, Tb: float, Sb: float) -> list[np.ndarray]:
        """Per stage, [s, e]: :meth:`run_costs` as a matrix, inf where the run cannot be that
        stage (memory, or above Tb)."""
        out = []
        for i, cost in enumerate(self.run_costs(Tb, Sb)):
            s_of, e_of, _, _ = self.pairs[self.group_of[i]]
            add = np.full((self.L, self.L), np.inf)
            add[s_of, e_of] = cost
            out.append(add)
        return out

    def cheapest_split(self, Tb: float, Sb: float) -> float:
        """F(Tb, Sb): the cheapest split of the chain into pp runs (stage by stage over run
        ends)."""
        self.evals += 1
        inf = np.inf
        f = np.full(self.L, inf)
        for i, cost in enumerate(self.run_costs(Tb, Sb)):
            s_of, _, ends, firsts = self.pairs[self.group_of[i]]
            if not len(s_of):
                return inf
            if i == 0:
                total = np.where(s_of == 0, cost, inf)
            else:
                prev = np.concatenate([[inf], f[:-1]])  # prev[s]: stages 0..i-1 end at s - 1
                total = prev[s_of] + cost
            f = np.full(self.L, inf)
            f[ends] = np.minimum.reduceat(total, firsts)
        return float(f[self.L - 1])

    def bound(self, Ta: float, Sa: float, F: float) -> float:
        if not self.fscale:  # zero bubble: the split only says whether the box has one
            return self.w * Ta + Sa + (0.0 if F < np.inf else np.inf) + self.step
        return self.w * Ta + Sa + F * self.fscale + self.step

    def refine(self, target: float | None, max_evals: int) -> tuple[float, list[tuple]]:
        """The bound, and the boxes ``(Ta, Tb, Sa, Sb)`` left below ``target`` (see
        :func:`segment_lower_bound`)."""
        import heapq

        inf = float("inf")
        if not np.isfinite(self.split):
            return inf, []
        self.evals = 0
        w = self.w  # with one micro-batch T* does not count: its side of the boxes stays open
        F0 = self.cheapest_split(inf, inf)
        b0 = self.bound(self.T0, self.S0, F0)
        first = (self.T0, inf, self.S0, inf)
        if target is None or not np.isfinite(b0) or b0 * (1 - 1e-9) >= target:
            return b0 * (1 - 1e-9), (
                [first] if target is not None and b0 * (1 - 1e-9) < target else []
            )
        goal = float(target)
        aim = goal * (1 + 2e-9)  # where the unbounded sides are cut: just above the goal
        heap = [(b0, 0, *first, F0)]
        tick = 1

        def left(b: float, box: tuple) -> tuple[float, list[tuple]]:
            return b * (1 - 1e-9), [box] + [h[2:6] for h in heap if h[0] * (1 - 1e-9) < goal]

        while True:
            b, _, Ta, Tb, Sa, Sb, F = heapq.heappop(heap)
            if not np.isfinite(b) or b * (1 - 1e-9) >= goal:
                return b * (1 - 1e-9), []
            if self.evals >= max_evals:
                return left(b, (Ta, Tb, Sa, Sb))
            cells = []
            if w and not np.isfinite(Tb):  # T* so large that (c - 1) T* alone reaches the goal
                Ts = max(Ta, (aim - self.step - Sa - F * self.fscale) / w)
                cells += [(Ts, Tb, Sa, Sb, F), (Ta, Ts, Sa, Sb, None)]
            elif not np.isfinite(Sb):  # likewise S*
                Ss = max(Sa, aim - self.step - w * Ta - F * self.fscale)
                cells += [(Ta, Tb, Ss, Sb, F), (Ta, Tb, Sa, Ss, None)]
            else:
                wt, ws = (w * (Tb - Ta) if w else 0.0), Sb - Sa
                if max(wt, ws) <= 1e-9 * b:  # the box is as small as it gets
                    return left(b, (Ta, Tb, Sa, Sb))
                if wt >= ws:
                    m = (Ta + Tb) / 2
                    cells += [(m, Tb, Sa, Sb, F), (Ta, m, Sa, Sb, None)]
                else:
                    m = (Sa + Sb) / 2
                    cells += [(Ta, Tb, m, Sb, F), (Ta, Tb, Sa, m, None)]
            for Ta2, Tb2, Sa2, Sb2, F2 in cells:
                if F2 is None:
                    F2 = self.cheapest_split(Tb2, Sb2)
                heapq.heappush(heap, (self.bound(Ta2, Sa2, F2), tick, Ta2, Tb2, Sa2, Sb2, F2))
                tick += 1

    def covering(self, box: tuple, goal: float) -> np.ndarray:
        """``(L, pp)``: layer u may sit on stage i in an assignment of this box faster than
        ``goal``: some run s..e on stage i holds u and the best split through it, plus the
        box's ``(c - 1) Ta + Sa + step``, stays below ``goal``."""
        Ta, Tb, Sa, Sb = box
        L, pp = self.L, self.pp
        adds = self.stage_costs(Tb, Sb)
        fw = []  # fw[i][e]: stages 0..i cover layers 0..e
        for i, add in enumerate(adds):
            if i == 0:
                fw.append(add[0].copy())
            else:
                prev = np.concatenate([[np.inf], fw[-1][:-1]])
                fw.append((prev[:, None] + add).min(axis=0))
        bw: list[np.ndarray] = [np.empty(0)] * pp  # bw[i][s]: stages i..pp-1 cover s..L-1
        for i in range(pp - 1, -1, -1):
            if i == pp - 1:
                bw[i] = adds[i][:, L - 1].copy()
            else:
                nxt = np.concatenate([bw[i + 1][1:], [np.inf]])  # nxt[e] = bw[i + 1][e + 1]
                bw[i] = (adds[i] + nxt[None, :]).min(axis=1)
        start = np.full(L, np.inf)
        start[0] = 0.0
        end = np.full(L, np.inf)
        end[L - 1] = 0.0
        slack = goal * (1 + 1e-9) - self.bound(Ta, Sa, 0.0)
        if self.fscale:
            budget = slack / self.fscale
        else:  # zero bubble: every run within memory, if the box is below the goal at all
            budget = np.inf if slack > 0 else -np.inf
        cover = np.zeros((L, pp), dtype=bool)
        idx = np.arange(L)
        for i in range(pp):
            pre = (
                np.concatenate([[np.inf], fw[i - 1][:-1]]) if i else start
            )  # pre[s]: before run s..
            post = (
                np.concatenate([bw[i + 1][1:], [np.inf]]) if i < pp - 1 else end
            )  # post[e]: after ..e
            good = (pre[:, None] + adds[i] + post[None, :]) < budget
            last = np.where(
                good.any(axis=1), L - 1 - np.argmax(good[:, ::-1], axis=1), -1
            )  # furthest e per s
            cover[:, i] = np.maximum.accumulate(last) >= idx
        return cover


def _rates(A: np.ndarray, B: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """0 and ``n`` quantiles of the positive exchange rates ``(A_j - A_k) / (B_k - B_j)``
    between two allowed strategies of a layer (time saved per unit of ``B`` spent)."""
    a, b = np.where(mask, A, np.nan), np.where(mask, B, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a[:, :, None] - a[:, None, :]) / (b[:, None, :] - b[:, :, None])
    r = r[np.isfinite(r) & (r > 0)]
    q = np.quantile(r, np.linspace(0.0, 1.0, n)) if r.size and n > 0 else []
    return np.unique(np.concatenate([[0.0], q]))


def min_peak_memory(t: CostTables) -> float:
    """The smallest per-device peak memory of any assignment of these tables, ignoring the
    memory limit (what an infeasibility error reports as the memory needed), exactly.

    A layer's memory depends only on its own strategy and its stage (``M[u, k, i]``), so the
    leanest assignment gives every layer its leanest allowed strategy on its stage,
    ``m[u, i] = min_k M[u, k, i]``, and splits the chain into ``pp`` non-empty runs minimising
    the largest stage sum: a dynamic program over run ends, stage by stage,
    ``f[i][e] = min_s max(f[i - 1][s - 1], sum_{u = s..e} m[u, i])``, ``O(pp L^2)``."""
    if t.virtual_stages > 1:
        raise ValueError(
            "min_peak_memory splits one stage per rank; interleaved tables (a rank's memory "
            "sums its stages) need uniap.milp.min_peak_memory"
        )
    L, pp = t.num_layers, t.pp
    _, _, mmin = t.minima()
    cm = np.vstack([np.zeros((1, pp)), np.cumsum(mmin, axis=0)])  # cm[j, i]: layers 0..j-1
    f = cm[1:, 0].copy()  # f[e]: stage 0 holds layers 0..e
    for i in range(1, pp):
        g = np.full(L, np.inf)
        for e in range(i, L):
            s = np.arange(i, e + 1)  # stage i holds s..e, stages 0..i-1 hold 0..s-1
            g[e] = np.min(np.maximum(f[s - 1], cm[e + 1, i] - cm[s, i]))
        f = g
    return float(f[L - 1])


def stage_windows(t: CostTables, bound: float | None) -> list[list[int]]:
    """For each layer, the stages it may sit on: ``i <= u`` and ``pp - 1 - i <= L - 1 - u``;
    with a ``bound`` (an incumbent's time), also only if stages 0..i can reach u and stages
    i..pp-1 can cover u..L-1 with every stage's compute lower bound ``seg`` satisfying
    ``total_min + (c - 1) seg <= bound`` and its memory lower bound within the limit."""
    L, pp, c, v = t.num_layers, t.num_stages, t.num_microbatches, t.virtual_stages
    lo = [max(0, pp - L + u) for u in range(L)]
    hi = [min(u, pp - 1) for u in range(L)]
    amin, _, mmin = t.minima()
    limit = t.memory_limit_bytes * (1 + 1e-9)
    # one stage per rank: TPI >= total + (c - 1) seg, seg <= T*
    total = float(amin.sum()) / v
    w = c - 1 / v
    if t.longest_path:  # TPI >= c seg (uniap.milp's zb_links)
        total, w = 0.0, float(c)
    cap = float("inf")
    if bound is not None and w > 0:
        cap = (bound * (1 + 1e-9) - total) / w
    elif bound is not None and bound * (1 + 1e-9) < total:
        cap = -1.0

    ca = np.concatenate([[0.0], np.cumsum(amin)])
    cm = np.vstack([np.zeros((1, pp)), np.cumsum(mmin, axis=0)])

    def min_start(i: int) -> list[int]:
        """For each end e, the first start s with layers s..e fitting on stage i (L if none)."""
        out, s = [], 0
        for e in range(L):
            s = max(s, 0)
            while s <= e and not (
                ca[e + 1] - ca[s] <= cap + 1e-15 and cm[e + 1, i] - cm[s, i] <= limit
            ):
                s += 1
            out.append(s if s <= e else L)
            if s > e:
                s = e + 1
        return out

    ms = [min_start(i) for i in range(pp)]
    # F[i][e]: stages 0..i can exactly cover layers 0..e; B[i][s]: stages i..pp-1 cover s..L-1.
    F = np.zeros((pp, L), dtype=bool)
    B = np.zeros((pp, L + 1), dtype=bool)
    for i in range(pp):
        if i == 0:
            F[0] = [ms[0][e] == 0 for e in range(L)]
            continue
        cnt = np.concatenate([[0], np.cumsum(F[i - 1])])  # cnt[j] = #F[i-1][0..j-1]
        for e in range(L):
            lo_s = max(ms[i][e], 1)
            if lo_s <= e and cnt[e] - cnt[lo_s - 1] > 0:  # some F[i-1][s-1], s in [lo_s, e]
                F[i, e] = True
    for i in range(pp - 1, -1, -1):
        for s in range(L):
            if i == pp - 1:
                B[i, s] = ms[i][L - 1] <= s
            else:
                B[i, s] = any(B[i + 1, e + 1] for e in range(s, L - 1) if ms[i][e] <= s)
    out = []
    for u in range(L):
        w = []
        for i in range(lo[u], hi[u] + 1):
            end_ok = any(
                F[i, e] and (B[i + 1, e + 1] if i + 1 < pp else e == L - 1) for e in range(u, L)
            )
            start_ok = any(
                B[i, s] and (F[i - 1, s - 1] if i > 0 else s == 0) for s in range(0, u + 1)
            )
            if end_ok and start_ok:
                w.append(i)
        out.append(w)
    return out
