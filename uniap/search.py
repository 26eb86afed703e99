"""Searches over assignments that are not the MILP: the exhaustive ground truth for small
instances, and a fast heuristic that gives the MILP a warm start and an incumbent bound.

Both work on :class:`uniap.cost_model.CostTables` and score with
:func:`uniap.cost_model.evaluate_assignment`, the same function that defines the MILP's
objective, so "MILP optimum == exhaustive optimum" is a statement about the solver alone.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator

import numpy as np

from uniap.bounds import extend_front, memory_split
from uniap.cost_model import CostTables, evaluate_assignment
from uniap.schedules import schedule_dag

__all__ = [
    "compositions",
    "exhaustive",
    "frontier",
    "heuristic",
    "improve",
    "memory_split_assignment",
    "restrategize",
    "single_stage_optimum",
    "undominated_strategies",
]


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
    for stage_of in compositions(t.num_layers, t.num_stages):
        for strategy_of in itertools.product(*t.allowed):
            ev = evaluate_assignment(t, stage_of, list(strategy_of))
            if ev.fits and ev.time_per_iteration_s < best[0]:
                best = (ev.time_per_iteration_s, stage_of, list(strategy_of))
    return best


def heuristic(t: CostTables, *, starts: int = 0) -> tuple[list[int], list[int]] | None:
    """A good feasible assignment, fast: for each strategy (and for each layer's own fastest
    strategy), give it to every layer that may use it, balance the stages by binary search
    on the bottleneck with a greedy fill under the memory limit, and keep the best that fits.
    With ``starts > 0`` the best ``starts`` of them are improved by :func:`improve` first."""
    L, pp, K = t.num_layers, t.num_stages, t.num_strategies
    if L < pp:
        return None
    mask = t.allowed_mask()
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
    found = []
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
        if ev.fits:
            found.append((ev.time_per_iteration_s, len(found), stage_of, choice))
    if not found:
        return None
    found.sort()
    best_tpi, _, *best = found[0]
    if t.virtual_stages > 1:  # local search moves one stage per rank: not for interleaving
        return best[0], best[1]
    if starts:
        # the best placement with each stage's strategies chosen on their own within memory
        stage_of = found[0][2]
        choice = restrategize(t, stage_of)
        if choice is not None:
            ev = evaluate_assignment(t, stage_of, choice)
            if ev.fits:
                found.insert(0, (ev.time_per_iteration_s, -1, stage_of, choice))
    tried = set()
    for _, _, stage_of, choice in found[: starts + (found[0][1] == -1)]:
        got = improve(t, stage_of, choice)
        tpi = evaluate_assignment(t, *got).time_per_iteration_s
        if tuple(got[0]) in tried:
            if tpi < best_tpi:
                best, best_tpi = list(got), tpi
            continue
        tried.add(tuple(got[0]))
        # the strategies of the improved placement chosen again stage by stage, then improved
        again = restrategize(t, got[0])
        if again is not None and evaluate_assignment(t, got[0], again).fits:
            got2 = improve(t, got[0], again)
            tpi2 = evaluate_assignment(t, *got2).time_per_iteration_s
            if tpi2 < tpi:
                got, tpi = got2, tpi2
        if tpi < best_tpi:
            best, best_tpi = list(got), tpi
    return best[0], best[1]


def single_stage_optimum(
    t: CostTables,
    bound_s: float = float("inf"),
    *,
    max_points: int = 4096,
    progress: Callable[[dict], None] | None = None,
    progress_interval_s: float = 5.0,
) -> tuple[float, list[int]] | None:
    """The optimum of a one-stage table (``pp = 1``, no interleaving) exactly, without the
    program: ``(time per iteration, strategy_of)``, ``(inf, [])`` when nothing fits below
    ``bound_s``, or None when it gives up (a front of one layout above ``max_points`` labels,
    or host memory that binds), and the program must answer.

    With one stage ``TPI = c p + s + step``, ``p = sum A + sum R + k``, ``s = sum G + max F``
    (:func:`uniap.cost_model.evaluate_assignment`): a shortest path along the chain with a
    memory budget and a maximum. States are the layout of the last layer; labels are (cost
    ``sum (c A + G) + c sum R``, memory ``sum M``, largest ``F`` so far), each extended by each
    allowed strategy of the next layer (:func:`_chain_labels`). A label is dropped when
    another of its layout has no more cost, memory or largest ``F``; when its memory plus the
    rest's leanest exceeds the limit; or when its cost plus its ``F`` plus a Lagrangian
    completion (:func:`_to_go`) cannot beat ``bound_s``. The optimum is the smallest ``cost +
    F + c k + step`` over the last layer's labels.

    ``progress`` is called after a layer, at most every ``progress_interval_s``, with what
    :func:`uniap.milp.solve` reports: ``running_s``, ``incumbent`` (inf: a label pass has none
    before its end), ``bound`` (the Lagrangian bound of the whole chain), ``gap`` and
    ``nodes`` (labels kept so far)."""
    if t.num_stages != 1 or (t.uses_host_memory and np.isfinite(t.host_limit_bytes)):
        return None
    L, c = t.num_layers, t.num_microbatches
    mask = t.allowed_mask()
    if not mask.any(axis=1).all():
        return np.inf, []
    limit = t.memory_limit_bytes * (1 + 1e-9)
    w = np.where(mask, c * t.A + t.G, np.inf)
    M = np.where(mask, t.M[:, :, 0], np.inf)
    F = np.where(mask, t.F, np.inf)
    # a strategy another of its layer's strategies with the same layout matches or beats in
    # cost, memory and F is never needed (the same reshards either side): labels skip it
    useful = undominated_strategies(mask, t.layout, [w, M, F])
    const = c * t.stage_overhead_s + t.step_overhead_s
    goal = float(bound_s) * (1 + 1e-7) if np.isfinite(bound_s) else np.inf
    # a fitting labelling: the Lagrangian one where memory binds, polished by single moves
    ks0 = restrategize(t, [0] * L)
    if ks0 is not None and evaluate_assignment(t, [0] * L, ks0).fits:
        _, ks0 = improve(t, [0] * L, ks0)
        goal = min(goal, evaluate_assignment(t, [0] * L, ks0).time_per_iteration_s * (1 + 1e-7))
    mus, H = _to_go(w, M, c * t.R, t.layout, limit)
    floor = float(np.max(H[:, 0, 0] - _times(mus, limit))) + float(F.min(axis=1).max()) + const
    if floor > goal:
        return np.inf, []
    rest_m = np.concatenate([np.cumsum(M.min(axis=1)[::-1])[::-1][1:], [0.0]])
    report = None
    if progress is not None:
        start_s, last = time.perf_counter(), [time.perf_counter()]

        def report(kept: int) -> None:
            if time.perf_counter() - last[0] >= progress_interval_s:
                last[0] = time.perf_counter()
                progress(
                    {
                        "running_s": last[0] - start_s,
                        "incumbent": goal,
                        "bound": floor,
                        "gap": (goal - floor) / goal if np.isfinite(goal) else np.inf,
                        "nodes": kept,
                    }
                )

    # the fewer labels a pass keeps the tighter its cap: try caps just above the bound first,
    # widening them; a pass that finds a labelling below its cap has found the optimum (every
    # dropped label completes above the cap), and the last pass's cap is the goal itself
    for slack in [2.5e-4 * 1.3**i for i in range(16)] + [np.inf]:
        cap = min(goal, floor * (1 + slack))
        found = _chain_labels(
            w,
            M,
            F,
            c * t.R,
            t.layout,
            useful,
            mus,
            H,
            rest_m,
            limit,
            cap - const,
            max_points,
            report,
        )
        if found is None:
            return None
        if found[1] or cap >= goal:
            break
        floor = cap
    _, ks = found
    if not ks:
        return np.inf, []
    return float(evaluate_assignment(t, [0] * L, ks).time_per_iteration_s), ks


def undominated_strategies(
    mask: np.ndarray, layout: np.ndarray, values: list[np.ndarray]
) -> np.ndarray:
    """``(L, K)``: the allowed strategies (``mask``) of each layer that no other allowed one of
    the same layout matches or beats in every table of ``values`` (each ``(L, K)``); of equal
    ones the first. With the same layout the reshards either side are the same, so a label
    search never needs the others."""
    K = mask.shape[1]
    no_worse = (layout[:, :, None] == layout[:, None, :]) & mask[:, :, None]
    better = np.broadcast_to(np.arange(K)[:, None] < np.arange(K)[None, :], no_worse.shape)
    for v in values:
        v = np.where(mask, v, np.inf)
        no_worse = no_worse & (v[:, :, None] <= v[:, None, :])  # [u, k', k]: k' stands in
        better = better | (v[:, :, None] < v[:, None, :])
    return mask & ~(no_worse & better).any(axis=1)


def _to_go(
    w: np.ndarray,
    M: np.ndarray,
    Rc: np.ndarray,
    lay: np.ndarray,
    limit: float,
    num_mu: int = 24,
    rounds: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Lagrangian costs-to-go of the chain for prices ``mus`` on memory: ``H[m, u, a]`` is the
    smallest ``sum (w + mus[m] M) + Rc`` over layers ``u..L-1`` when layer ``u - 1`` has layout
    ``a`` (``H[m, 0, :]`` all equal, there is no layer before the first; ``H[m, L] = 0``).
    For any price ``mu >= 0`` and any labelling that fits, ``cost <= cost + mu (limit - mem)``,
    so a label ``(cost, mem)`` of layer ``u - 1`` with layout ``a`` completes to at least
    ``cost + mu mem + H[m, u, a] - mu limit``: with ``mu = 0`` the exact cheapest completion
    (reshards included), and with the price where memory binds close to the constrained one.
    The prices are 0 and a geometric grid around the ratio of cost to memory, then ``rounds -
    1`` finer grids around the best price so far (the bound ``H[m, 0, 0] - mu limit`` is
    concave in ``mu``, and a coarse grid can miss its top by percents)."""
    L, C = w.shape[0], max(int(lay.max()) + 1, Rc.shape[-1])
    fin = np.isfinite(w)
    scale = float(np.sum(np.where(fin, w, 0.0))) / max(float(np.sum(np.where(fin, M, 0.0))), 1.0)
    Mz = np.where(fin, M, 0.0)

    def table(mus: np.ndarray) -> np.ndarray:
        H = np.zeros((len(mus), L + 1, C))
        for u in range(L - 1, -1, -1):
            val = np.where(fin[u][None, :], w[u][None, :] + mus[:, None] * Mz[u][None, :], np.inf)
            val = val + H[:, u + 1, lay[u]]  # [m, k]
            g = np.full((len(mus), C), np.inf)
            for b in range(C):
                on = lay[u] == b
                if on.any():
                    g[:, b] = val[:, on].min(axis=1)
            if u:
                H[:, u] = (Rc[u - 1][None, :, :] + g[:, None, :]).min(axis=2)
            else:
                H[:, 0] = g.min(axis=1)[:, None]
        return H

    if not np.isfinite(limit):  # memory cannot bind: only the exact cost-to-go
        mus = np.zeros(1)
        return mus, table(mus)
    mus = np.concatenate([[0.0], scale * np.geomspace(1e-3, 1e2, num_mu - 1)])
    H = table(mus)
    for _ in range(rounds - 1):
        order = np.argsort(mus)
        grid, top = mus[order], int(np.argmax((H[:, 0, 0] - _times(mus, limit))[order]))
        lo, hi = grid[max(top - 1, 0)], grid[min(top + 1, len(grid) - 1)]
        if hi <= lo:
            break
        new = np.linspace(lo, hi, num_mu + 2)[1:-1]
        mus, H = np.concatenate([mus, new]), np.concatenate([H, table(new)])
    return mus, H


def _times(mu: np.ndarray, x: np.ndarray | float) -> np.ndarray:
    """``mu * x`` with ``0 * inf = 0`` (a zero price on an unbounded memory)."""
    return np.where(mu == 0, 0.0, mu * x)


def _dominated(
    cost: np.ndarray, mem: np.ndarray, f: np.ndarray, lay: np.ndarray, C: int, fvals: np.ndarray
) -> np.ndarray:
    """Which labels (sorted by layout, then cost, memory and largest ``F``) another label of
    their layout dominates: label ``i`` before ``j`` with ``mem_i <= mem_j`` and ``cost_i + f_i
    <= cost_j + f_j`` completes at least as cheaply whatever comes after (the rest's largest
    ``F`` raises ``f_i`` by no more than ``f_j``). Per level ``phi`` of ``F``, the earlier
    labels that qualify are a prefix in cost order: all before ``j`` when ``phi <= f_j``, else
    those with ``cost <= cost_j - (phi - f_j)``; so one running minimum of memory per level
    answers every label. Layouts are kept apart by offsets larger than any cost or memory, the
    first layout's memory highest, so that no prefix reaches into another layout."""
    n = len(cost)
    at = np.searchsorted(fvals, f)  # f's level among every F the chain has
    present = np.zeros(len(fvals), dtype=bool)
    present[at] = True
    levels, lv = fvals[present], (np.cumsum(present) - 1)[at]
    mspan = float(np.max(np.abs(mem))) * 2 + 1.0
    cspan = float(np.max(np.abs(cost))) * 2 + 1.0
    mkey = mem + (C - lay) * mspan
    ckey = cost + lay * cspan
    # run[l, p]: the least memory among positions < p at level l
    grid = np.where(lv[None, :] == np.arange(len(levels))[:, None], mkey[None, :], np.inf)
    run = np.concatenate(
        [np.full((len(levels), 1), np.inf), np.minimum.accumulate(grid, axis=1)], axis=1
    )
    pos = np.arange(n)
    below = np.minimum.accumulate(run, axis=0)[lv, pos]  # levels up to f_j, all before j
    out = below <= mkey
    for level in range(1, len(levels)):
        js = np.flatnonzero(lv < level)
        if not len(js):
            continue
        cut = np.searchsorted(ckey, ckey[js] - (levels[level] - f[js]), side="right")
        out[js] |= run[level, cut] <= mkey[js]
    return out


def _chain_labels(
    w: np.ndarray,
    M: np.ndarray,
    F: np.ndarray,
    Rc: np.ndarray,
    lay: np.ndarray,
    ok: np.ndarray,
    mus: np.ndarray,
    H: np.ndarray,
    rest_m: np.ndarray,
    limit: float,
    cap: float,
    max_points: int,
    report: Callable[[int], None] | None = None,
) -> tuple[float, list[int]] | None:
    """The label-setting pass of :func:`single_stage_optimum`: the smallest ``cost + F`` at
    most ``cap`` with its ``strategy_of`` (``(inf, [])`` if none), None when a layout's front
    outgrows ``max_points``. One array of labels per layer, all layouts together; per layout
    of the new layer a label is kept when no earlier one (by cost, then memory) has at most
    its memory and its largest ``F``."""
    L = w.shape[0]
    cost, mem, fm = np.zeros(1), np.zeros(1), np.zeros(1)
    last = np.full(1, -1)  # the layout of each label's last layer (-1: none yet)
    back: list[tuple[np.ndarray, np.ndarray]] = []  # per layer: (parent label, strategy)
    # the prices whose bound is highest at the start prune most, tried first; mu = 0 (exact
    # reshards) too
    start = H[:, 0, 0] - _times(mus, limit)
    pick = np.array(list(dict.fromkeys([*np.argsort(-start)[:3].tolist(), 0])))
    mus, H = mus[pick], H[pick]
    C = H.shape[2]
    fvals = np.unique(np.concatenate([[0.0], F[ok]]))  # every largest F a label can have
    for u in range(L):
        ks = np.flatnonzero(ok[u])
        bk = lay[u, ks]
        # every label extended by every strategy, as [label, strategy] grids
        c2 = cost[:, None] + w[u, ks][None, :]
        if u:
            c2 = c2 + Rc[u - 1][:, bk][last]
        m2 = mem[:, None] + M[u, ks][None, :]
        f2 = np.maximum(fm[:, None], F[u, ks][None, :])
        keep = np.flatnonzero(m2 + rest_m[u] <= limit)
        c2, m2, f2 = c2.ravel()[keep], m2.ravel()[keep], f2.ravel()[keep]
        b = bk[keep % len(ks)]
        # the completion bound at each price, on the labels the ones before left
        for i, mu in enumerate(mus):
            low = c2 + (mu * (m2 - limit) if mu else 0.0) + H[i, u + 1, b]
            on = np.flatnonzero(low + f2 <= cap)
            if len(on) < len(keep):
                keep, c2, m2, f2, b = keep[on], c2[on], m2[on], f2[on], b[on]
        if not len(keep):
            return np.inf, []
        parent, kk = keep // len(ks), ks[keep % len(ks)]
        order = np.lexsort((f2, m2, c2, b))  # by layout, then cost, memory, largest F
        c2, m2, f2, b, parent, kk = (x[order] for x in (c2, m2, f2, b, parent, kk))
        on = ~_dominated(c2, m2, f2, b, C, fvals)
        if np.bincount(b[on], minlength=C).max() > max_points:
            return None
        cost, mem, fm, last = c2[on], m2[on], f2[on], b[on]
        back.append((parent[on], kk[on]))
        if report is not None:
            report(len(cost))
    total = cost + fm
    j = int(np.argmin(total))
    ks_out = [0] * L
    for u in range(L - 1, -1, -1):
        parents, chosen = back[u]
        ks_out[u] = int(chosen[j])
        j = int(parents[j])
    return float(total[np.argmin(total)]), ks_out


def memory_split_assignment(
    t: CostTables, cap_s: float = float("inf"), *, max_points: int = 256
) -> tuple[list[int], list[int]] | None:
    """The split of :func:`uniap.bounds.memory_split` (the smallest slowest stage when each
    stage takes its fastest strategies that fit its memory) as an assignment, twice: each run
    gets the strategies of least ``sum A`` that fit its memory, or of least ``sum (c A + G)``
    (its time once and as the bottleneck ``c - 1`` times more, plus its gradient sync); the
    better of the two after :func:`improve` polishes each. Where the bottleneck dominates
    (many micro-batches, memory tight) it starts close to the bound that
    :func:`uniap.bounds.memory_bottleneck_bound` proves, which the layer-by-layer greedy of
    :func:`heuristic` can miss by a stage's worth of recomputation. Time alone cannot tell
    strategies of equal ``A`` apart, and picks the leanest (the 128-layer model on 1024 H100s,
    batch 1024, 8 stages of 8 micro-batches: FSDP on every layer, and local search from there
    stops 20 % above the optimum; ``c A + G`` starts 0.07 % above it, HSDP with one
    recomputed layer, and local search reaches it, where the heuristic's starts stop 1 %
    above). Knapsacks ignore reshards. None when no split has its runs within
    ``cap_s``, or neither assignment fits (reshard-free memory is exact, so they fit unless a
    front was thinned)."""
    if t.virtual_stages > 1:
        return None
    _, runs = memory_split(t, cap_s)
    if not runs:
        return None
    best, best_tpi = None, math.inf
    for weight in (t.A, t.num_microbatches * t.A + t.G):
        got = _run_knapsacks(t, runs, weight, max_points)
        if got is None or not evaluate_assignment(t, *got).fits:
            continue
        got = improve(t, *got)
        tpi = evaluate_assignment(t, *got).time_per_iteration_s
        if tpi < best_tpi:
            best, best_tpi = got, tpi
    return best


def _run_knapsacks(
    t: CostTables, runs: list[tuple[int, int]], weight: np.ndarray, max_points: int
) -> tuple[list[int], list[int]] | None:
    """Stage i holds layers ``runs[i]``, each run with its strategies of least ``sum weight``
    whose memory fits (an exact knapsack, its Pareto front of (weight, memory) thinned to
    ``max_points``, keeping its fastest and leanest); None when a run cannot fit."""
    mask = t.allowed_mask()
    limit = t.memory_limit_bytes * (1 + 1e-9)
    stage_of, strategy_of = [0] * t.num_layers, [0] * t.num_layers
    for i, (s, e) in enumerate(runs):
        a, m = np.zeros(1), np.zeros(1)
        back: list[tuple[np.ndarray, np.ndarray]] = []
        for u in range(s, e + 1):
            ks = np.flatnonzero(mask[u])
            a, m, idx = extend_front(a, m, weight[u, ks], t.M[u, ks, i], limit)
            if not len(a):
                return None
            if len(a) > max_points:  # thin the front, keeping its fastest and leanest
                pick = np.unique(np.linspace(0, len(a) - 1, max_points).round()).astype(np.int64)
                a, m, idx = a[pick], m[pick], idx[pick]
            back.append((idx // len(ks), ks[idx % len(ks)]))
        j = 0  # the fastest point of the front
        for u in range(e, s - 1, -1):
            parents, chosen = back[u - s]
            stage_of[u], strategy_of[u] = i, int(chosen[j])
            j = int(parents[j])
    return stage_of, strategy_of


def restrategize(t: CostTables, stage_of: list[int]) -> list[int] | None:
    """Strategies for a fixed placement: each stage on its own takes the strategies that
    minimise ``c A + G`` plus resharding ``c R`` within the memory limit, by a Lagrangian
    price on memory (a dynamic program over layouts for each price, bisected to the lowest
    price that fits); None when some stage cannot fit."""
    L, c = t.num_layers, t.num_microbatches
    mask = t.allowed_mask()
    limit = t.memory_limit_bytes
    strategy_of = [0] * L
    for i in sorted(set(stage_of)):
        us = [u for u in range(L) if stage_of[u] == i]
        ks, mem = _priced(t, mask, us, i, 0.0)
        if mem > limit:
            scale = float(np.max(np.where(mask[us], c * t.A[us] + t.G[us], 0.0))) / max(limit, 1.0)
            hi = scale
            for _ in range(40):
                ks_hi, mem_hi = _priced(t, mask, us, i, hi)
                if mem_hi <= limit:
                    break
                hi *= 8
            else:
                return None
            lo, ks = 0.0, ks_hi
            for _ in range(12):
                mid = (lo + hi) / 2
                k_mid, m_mid = _priced(t, mask, us, i, mid)
                if m_mid <= limit:
                    hi, ks = mid, k_mid
                else:
                    lo = mid
        for u, k in zip(us, ks):
            strategy_of[u] = k
    return strategy_of


def _priced(
    t: CostTables, mask: np.ndarray, us: list[int], i: int, mu: float
) -> tuple[list[int], float]:
    """Strategies of layers ``us`` (one stage, ``i``) minimising ``c A + G + mu M`` plus
    ``c R`` between neighbours (a dynamic program over layouts), and their memory."""
    c, C, n = t.num_microbatches, t.num_layouts, len(us)
    M = t.M[us, :, i]
    val = np.where(mask[us], c * t.A[us] + t.G[us] + mu * M, np.inf)
    lay = t.layout[us]
    best_k = np.zeros((n, C), dtype=np.int64)
    cost = np.full((n, C), np.inf)
    for a in range(C):
        v = np.where(lay == a, val, np.inf)
        best_k[:, a] = np.argmin(v, axis=1)
        cost[:, a] = v[np.arange(n), best_k[:, a]]
    f, back = cost[0].copy(), []
    for j in range(1, n):
        tot = f[:, None] + c * t.R[us[j] - 1]  # [a, b]
        arg = np.argmin(tot, axis=0)
        back.append(arg)
        f = tot[arg, np.arange(C)] + cost[j]
    a = int(np.argmin(f))
    ks = [0] * n
    for j in range(n - 1, -1, -1):
        ks[j] = int(best_k[j, a])
        if j:
            a = int(back[j - 1][a])
    return ks, float(M[np.arange(n), ks].sum())


def improve(
    t: CostTables, stage_of: list[int], strategy_of: list[int], *, max_moves: int | None = None
) -> tuple[list[int], list[int]]:
    """Steepest descent from a fitting assignment: each step makes the single move that lowers
    the time per iteration most while every stage still fits (another strategy for one
    layer, or one layer across a stage boundary), until none does or ``max_moves`` (default
    ``4 L``) were made. Every move is scored exactly (the formula of
    :func:`uniap.cost_model.evaluate_assignment`, updated for what the move changes)."""
    L, pp, c, K = t.num_layers, t.pp, t.num_microbatches, t.num_strategies
    mask = t.allowed_mask()
    A = np.where(mask, t.A, np.inf)
    lay, R, Rp, G, F = t.layout, t.R, t.Rp, t.G, t.F
    limit = t.memory_limit_bytes
    stage_of, strategy_of = list(stage_of), list(strategy_of)
    ev = evaluate_assignment(t, stage_of, strategy_of)
    if not ev.fits:
        return stage_of, strategy_of
    cur = ev.time_per_iteration_s
    ar = np.arange(L)
    neg = -np.inf
    for _ in range(max_moves if max_moves is not None else 4 * L):
        p, o = np.array(ev.stage_time_s), np.array(ev.link_time_s)
        sy, mem = np.array(ev.sync_time_s), np.array(ev.peak_memory_bytes)
        st, ku = np.array(stage_of), np.array(strategy_of)
        au = lay[ar, ku]
        # the stage's largest F (in sy) and, per layer, its stage's largest F without it
        fu = F[ar, ku]
        fmax, fex = np.zeros(pp), np.zeros(L)
        for i in range(pp):
            us = np.flatnonzero(st == i)
            top = us[np.argsort(-fu[us], kind="stable")]
            fmax[i] = fu[top[0]]
            fex[us] = fmax[i]
            fex[top[0]] = fu[top[1]] if len(top) > 1 else 0.0
        sy = sy - fmax
        # another strategy k for layer u (its stage i = st[u])
        dp = A - A[ar, ku][:, None]
        dg = G - G[ar, ku][:, None]
        mi = t.M[ar, :, st]
        dm = mi - mi[ar, ku][:, None]
        d_prev = np.zeros((L, K))  # change of the edge into u's stage (u first on it)
        d_next = np.zeros((L, K))  # change of the edge out of u's stage (u last on it)
        if L > 1:
            u = ar[1:]
            same = (st[u - 1] == st[u])[:, None]
            new_r = (
                R[(u - 1)[:, None], au[u - 1][:, None], lay[u]]
                - R[u - 1, au[u - 1], au[u]][:, None]
            )
            new_rp = (
                Rp[(u - 1)[:, None], au[u - 1][:, None], lay[u]]
                - Rp[u - 1, au[u - 1], au[u]][:, None]
            )
            dp[1:] += np.where(same, new_r, 0.0)
            d_prev[1:] = np.where(same, 0.0, new_rp)
            u = ar[:-1]
            same = (st[u + 1] == st[u])[:, None]
            new_r = R[u[:, None], lay[u], au[u + 1][:, None]] - R[u, au[u], au[u + 1]][:, None]
            new_rp = Rp[u[:, None], lay[u], au[u + 1][:, None]] - Rp[u, au[u], au[u + 1]][:, None]
            dp[:-1] += np.where(same, new_r, 0.0)
            d_next[:-1] = np.where(same, 0.0, new_rp)
        others_p, others_s = (
            _max_outside(p, 0, 0),
            _max_outside(sy + fmax, 0, 0),
        )  # [i]: over stages j != i
        o_ext = np.concatenate(
            [[neg], o, [neg]]
        )  # o_ext[i]: link into stage i, o_ext[i + 1]: out of it
        others_o = _max_outside(o_ext, 0, 1)[:pp]  # [i]: over links other than i - 1, i
        o_in, o_out = o_ext[:pp], o_ext[1 : pp + 1]
        bott = np.maximum(
            np.maximum(others_p[st][:, None], p[st][:, None] + dp),
            np.maximum(
                others_o[st][:, None],
                np.maximum(o_in[st][:, None] + d_prev, o_out[st][:, None] + d_next),
            ),
        )
        sync = np.maximum(others_s[st][:, None], sy[st][:, None] + dg + np.maximum(fex[:, None], F))
        with np.errstate(invalid="ignore"):  # (c - 1) * inf on strategies a layer may not use
            score = (
                p.sum() + o.sum() + dp + d_prev + d_next + (c - 1) * bott + sync + t.step_overhead_s
            )
        score = np.where(mask & (mem[st][:, None] + dm <= limit), score, np.inf)
        j = int(np.argmin(score))
        move_u, move_k = divmod(j, K)
        best, shift = float(score[move_u, move_k]), None
        # one layer across the boundary between stages i and i + 1
        sizes = np.bincount(st, minlength=pp).tolist()
        firsts = np.searchsorted(st, np.arange(pp)).tolist()
        if pp > 1:
            rest_p = _max_outside(p, 0, 1).tolist()  # [i]: max over stages other than i, i + 1
            rest_s = _max_outside(sy + fmax, 0, 1).tolist()
            rest_o = _max_outside(o, 0, 0).tolist()  # [i]: max over links other than i
            p_sum, o_sum, pl, sl, ol, ml = (
                float(p.sum()),
                float(o.sum()),
                p.tolist(),
                sy.tolist(),
                o.tolist(),
                mem.tolist(),
            )
        for i in range(pp - 1):
            first = firsts[i + 1]
            for u, src, dst in ((first - 1, i, i + 1), (first, i + 1, i)):
                if sizes[src] < 2:
                    continue
                k, a = strategy_of[u], au[u]
                ap, an = au[u - 1], au[u + 1]
                if dst == i + 1:  # u leaves the end of stage i
                    d_i = -(A[u, k] + R[u - 1, ap, a])
                    d_j = A[u, k] + R[u, a, an]
                    o_new = Rp[u - 1, ap, a]
                else:  # u leaves the start of stage i + 1
                    d_i = A[u, k] + R[u - 1, ap, a]
                    d_j = -(A[u, k] + R[u, a, an])
                    o_new = Rp[u, a, an]
                if ml[dst] + t.M[u, k, dst] > limit:
                    continue
                q_i, q_j = pl[i] + d_i, pl[i + 1] + d_j
                g = G[u, k]
                s_i, s_j = (
                    (sl[i] - g, sl[i + 1] + g) if dst == i + 1 else (sl[i] + g, sl[i + 1] - g)
                )
                f_src, f_dst = fex[u], max(fmax[dst], fu[u])
                s_i += f_src if dst == i + 1 else f_dst
                s_j += f_dst if dst == i + 1 else f_src
                tpi = (
                    p_sum
                    + d_i
                    + d_j
                    + o_sum
                    - ol[i]
                    + o_new
                    + (c - 1) * max(rest_p[i], q_i, q_j, rest_o[i], o_new)
                    + max(rest_s[i], s_i, s_j)
                    + t.step_overhead_s
                )
                if tpi < best:
                    best, shift = tpi, (u, dst)
        if not best < cur * (1 - 1e-12):
            break
        new_stage, new_strategy = list(stage_of), list(strategy_of)
        if shift is not None:
            new_stage[shift[0]] = shift[1]
        else:
            new_strategy[move_u] = move_k
        nev = evaluate_assignment(t, new_stage, new_strategy)
        if not (nev.fits and nev.time_per_iteration_s < cur):
            break  # rounding: the move does not really help
        stage_of, strategy_of, ev, cur = new_stage, new_strategy, nev, nev.time_per_iteration_s
    return stage_of, strategy_of


def _max_outside(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """``[i]``: the largest ``x[j]`` with ``j`` outside ``i + lo .. i + hi`` (``-inf`` when
    there is none)."""
    n = len(x)
    out = np.full(n, -np.inf)
    order = np.argsort(-x, kind="stable")[: hi - lo + 2].tolist()  # enough to skip the excluded
    for i in range(n):
        for j in order:
            if not i + lo <= j <= i + hi:
                out[i] = x[j]
                break
    return out


def _balance(t: CostTables, choice: list[int]) -> list[int] | None:
    L, pp = t.num_layers, t.num_stages
    idx = np.arange(L)
    w = t.A[idx, choice]
    mem = t.M[idx, choice, :]
    limit = t.memory_limit_bytes
    cw = np.concatenate([[0.0], np.cumsum(w)])
    cmem = np.vstack([np.zeros((1, pp)), np.cumsum(mem, axis=0)])
    # by_mem[u][i]: where a stage i that starts at layer u must end at the latest (memory)
    by_mem = np.stack(
        [np.searchsorted(cmem[:, i], cmem[:-1, i] + limit, side="right") - 1 for i in range(pp)],
        axis=1,
    ).tolist()
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

    if t.virtual_stages > 1:  # v stages per rank share its memory

        def greedy(cap: float) -> list[int] | None:  # noqa: F811 - the interleaved fill
            used, counts, u = [0.0] * t.pp, [], 0
            for i in range(pp):
                if u >= L:
                    break
                r, e = i % t.pp, u
                while e < L and (e == u or cw[e + 1] - cw[u] <= cap):
                    if used[r] + mem[e, i] > limit:
                        break
                    used[r] += mem[e, i]
                    e += 1
                if e == u:
                    return None
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


def frontier(t: CostTables, *, max_assignments: int = 5_000_000) -> list[tuple[float, float]]:
    """The exhaustive memory/time trade-off of one table: ``(peak_bytes, tpi_s)`` pairs, peak
    ascending and time strictly descending, such that the optimum under a memory limit ``m`` is
    the time of the last pair with ``peak_bytes <= m`` (nothing fits below the first).

    ``peak_bytes`` is the largest per-stage memory of an assignment (it fits iff that is within
    the limit), and ``t.memory_limit_bytes`` is ignored. Every placement and every strategy is
    scored, vectorised over the strategy choices of one placement, as
    :func:`uniap.cost_model.evaluate_assignment` scores it (interleaved schedules: the longest
    path through torch's order, one operation at a time); for tests and sweeps on small instances
    (``C(L-1, pp-1) * prod |allowed[u]|`` assignments, at most ``max_assignments``).
    Assignments over the host-memory limit (FSDP-offload's state) are left out."""
    L, pp, c, v, R = t.num_layers, t.num_stages, t.num_microbatches, t.virtual_stages, t.pp
    per_placement = int(np.prod([len(ks) for ks in t.allowed], dtype=np.float64))
    if len(t.allowed) < L or per_placement * math.comb(max(L - 1, 0), pp - 1) > max_assignments:
        raise ValueError(f"too many assignments for an exhaustive frontier (L={L}, pp={pp})")
    grids = np.meshgrid(*[np.asarray(ks, dtype=np.int64) for ks in t.allowed], indexing="ij")
    S = np.stack([g.reshape(-1) for g in grids], axis=1)  # (N, L) strategy of each layer
    rows = np.arange(L)[None, :]
    A, G, F = t.A[rows, S], t.G[rows, S], t.F[rows, S]
    lay = t.layout[rows, S]
    longest = t.longest_path
    if longest:
        Af, Aw = t.Af[rows, S], t.Aw[rows, S]
        dag = schedule_dag(t.schedule, R, v, c)
    peaks, times = [], []
    for stage_of in compositions(L, pp):
        st = np.asarray(stage_of)
        p = np.zeros((len(S), pp))
        o = np.zeros((len(S), max(pp - 1, 1)))
        s = np.zeros((len(S), R))  # per rank (interleaved: all of its stages)
        f = np.zeros((len(S), R))  # the rank's largest F, exposed once
        mem = np.zeros((len(S), R))
        host = np.zeros((len(S), R))
        fw = np.zeros((len(S), pp))  # longest path: forward, with half the shared time
        wg = np.zeros((len(S), pp))  # and the weight gradients (zero bubble)
        for u in range(L):
            i = st[u]
            r = i % R
            host[:, r] += t.Mh[u, S[:, u]]
            p[:, i] += A[:, u]
            s[:, r] += G[:, u]
            f[:, r] = np.maximum(f[:, r], F[:, u])
            mem[:, r] += t.M[u, S[:, u], i]
            if longest:
                fw[:, i] += Af[:, u]
                wg[:, i] += Aw[:, u]
            if u + 1 < L:
                if st[u + 1] == i:
                    reshard = t.R[u, lay[:, u], lay[:, u + 1]]
                    p[:, i] += reshard
                    if longest:
                        fw[:, i] += reshard / 2
                else:
                    o[:, i] += t.Rp[u, lay[:, u], lay[:, u + 1]]
        p += t.stage_overhead_s
        s += f
        o = o[:, : pp - 1]
        if not longest:
            bottleneck = np.maximum(p.max(axis=1), o.max(axis=1) if pp > 1 else -np.inf)
            tpi = (
                p.sum(axis=1)
                + o.sum(axis=1)
                + (c - 1) * bottleneck
                + s.max(axis=1)
                + t.step_overhead_s
            )
        else:  # interleaved: the longest path through torch's order (uniap.cost_model)
            fw += t.stage_overhead_s / 2
            dur = (fw, p - fw - wg, wg)
            end = np.zeros((len(dag), len(S)))
            for n, (kind, j, prev, dep, edge) in enumerate(dag):
                ready = end[prev] if prev >= 0 else np.zeros(len(S))
                if dep >= 0:
                    ready = np.maximum(ready, end[dep] + (o[:, edge] / 2 if edge >= 0 else 0.0))
                end[n] = ready + dur[kind][:, j]
            links = np.max(np.stack([o[:, r::R].sum(axis=1) for r in range(R)], axis=1), axis=1)
            tpi = np.maximum(end.max(axis=0), c * links) + s.max(axis=1) + t.step_overhead_s
        fits_host = (host @ t.host_ranks.T <= t.host_limit_bytes * (1 + 1e-9)).all(axis=1)
        peaks.append(mem.max(axis=1)[fits_host])
        times.append(tpi[fits_host])
    peak, tpi = np.concatenate(peaks), np.concatenate(times)
    out: list[tuple[float, float]] = []
    for j in np.lexsort((tpi, peak)):
        if not out or tpi[j] < out[-1][1]:
            out.append((float(peak[j]), float(tpi[j])))
    return out
