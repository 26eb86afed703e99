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

__all__ = ["exhaustive", "heuristic", "improve", "compositions", "allowed_mask"]


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


def heuristic(t: CostTables, *, starts: int = 0) -> tuple[list[int], list[int]] | None:
    """A good feasible assignment, fast: for each strategy (and for each layer's own fastest
    strategy), give it to every layer that may use it, balance the stages by binary search
    on the bottleneck with a greedy fill under the memory limit, and keep the best that fits.
    With ``starts > 0`` the best ``starts`` of them are improved by :func:`improve` first."""
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
    for _, _, stage_of, choice in found[:starts]:
        got = improve(t, stage_of, choice)
        tpi = evaluate_assignment(t, *got).time_per_iteration_s
        if tpi < best_tpi:
            best, best_tpi = list(got), tpi
    return best[0], best[1]


def improve(t: CostTables, stage_of: list[int], strategy_of: list[int], *,
            max_moves: int | None = None) -> tuple[list[int], list[int]]:
    """Steepest descent from a fitting assignment: each step makes the single move that lowers
    the time per iteration most while every stage still fits (another strategy for one
    layer, or one layer across a stage boundary), until none does or ``max_moves`` (default
    ``4 L``) were made. Every move is scored exactly (the formula of
    :func:`uniap.cost_model.evaluate_assignment`, updated for what the move changes)."""
    L, pp, c, K = t.num_layers, t.pp, t.num_microbatches, t.num_strategies
    mask = allowed_mask(t)
    A = np.where(mask, t.A, np.inf)
    lay, R, Rp, G = t.layout, t.R, t.Rp, t.G
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
            new_r = R[(u - 1)[:, None], au[u - 1][:, None], lay[u]] - R[u - 1, au[u - 1], au[u]][:, None]
            new_rp = Rp[(u - 1)[:, None], au[u - 1][:, None], lay[u]] - Rp[u - 1, au[u - 1], au[u]][:, None]
            dp[1:] += np.where(same, new_r, 0.0)
            d_prev[1:] = np.where(same, 0.0, new_rp)
            u = ar[:-1]
            same = (st[u + 1] == st[u])[:, None]
            new_r = R[u[:, None], lay[u], au[u + 1][:, None]] - R[u, au[u], au[u + 1]][:, None]
            new_rp = Rp[u[:, None], lay[u], au[u + 1][:, None]] - Rp[u, au[u], au[u + 1]][:, None]
            dp[:-1] += np.where(same, new_r, 0.0)
            d_next[:-1] = np.where(same, 0.0, new_rp)
        others_p = np.array([max((p[j] for j in range(pp) if j != i), default=neg) for i in range(pp)])
        others_s = np.array([max((sy[j] for j in range(pp) if j != i), default=neg) for i in range(pp)])
        others_o = np.array([max((o[j] for j in range(pp - 1) if j not in (i - 1, i)), default=neg)
                             for i in range(pp)])
        o_in = np.array([o[i - 1] if i >= 1 else neg for i in range(pp)])
        o_out = np.array([o[i] if i < pp - 1 else neg for i in range(pp)])
        bott = np.maximum(np.maximum(others_p[st][:, None], p[st][:, None] + dp),
                          np.maximum(others_o[st][:, None],
                                     np.maximum(o_in[st][:, None] + d_prev, o_out[st][:, None] + d_next)))
        sync = np.maximum(others_s[st][:, None], sy[st][:, None] + dg)
        with np.errstate(invalid="ignore"):  # (c - 1) * inf on strategies a layer may not use
            score = p.sum() + o.sum() + dp + d_prev + d_next + (c - 1) * bott + sync + t.step_overhead_s
        score = np.where(mask & (mem[st][:, None] + dm <= limit), score, np.inf)
        j = int(np.argmin(score))
        move_u, move_k = divmod(j, K)
        best, shift = float(score[move_u, move_k]), None
        # one layer across the boundary between stages i and i + 1
        for i in range(pp - 1):
            first = stage_of.index(i + 1)
            for u, src, dst in ((first - 1, i, i + 1), (first, i + 1, i)):
                if stage_of.count(src) < 2:
                    continue
                k, a = strategy_of[u], au[u]
                ap, an = au[u - 1], au[u + 1] if u + 1 < L else -1
                q, oo, ss, mm = p.copy(), o.copy(), sy.copy(), mem.copy()
                if dst == i + 1:  # u leaves the end of stage i
                    q[i] -= A[u, k] + R[u - 1, ap, a]
                    q[i + 1] += A[u, k] + (R[u, a, an] if u + 1 < L else 0.0)
                    oo[i] = Rp[u - 1, ap, a]
                else:  # u leaves the start of stage i + 1
                    q[i] += A[u, k] + R[u - 1, ap, a]
                    q[i + 1] -= A[u, k] + (R[u, a, an] if u + 1 < L else 0.0)
                    oo[i] = Rp[u, a, an]
                ss[src] -= G[u, k]
                ss[dst] += G[u, k]
                mm[src] -= t.M[u, k, src]
                mm[dst] += t.M[u, k, dst]
                if mm[dst] > limit:
                    continue
                tpi = q.sum() + oo.sum() + (c - 1) * max(q.max(), oo.max(initial=neg)) + ss.max() + t.step_overhead_s
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
