"""Alpa-style two-level search (Zheng et al., "Alpa: Automating Inter- and Intra-Operator
Parallelism for Distributed Deep Learning", OSDI 2022), on uniap's cost tables.

Inter-operator level (Alpa's Section 5.2): a dynamic program over contiguous stage boundaries.
In uniap's model every stage of a ``pp``-stage pipeline gets ``N / pp`` devices, so choosing the
submesh sizes is choosing ``pp``; the DP then places the boundaries. With ``t_i`` the latency of
stage ``i`` for one micro-batch, Alpa minimises

    ``T* = min_{t_max} ( sum_i t_i + (c - 1) t_max )``  subject to ``t_i <= t_max``,

enumerating ``t_max`` over every profiled stage latency in increasing order and stopping once
``(c - 1) t_max`` alone exceeds the best ``T*`` (Alpa's early pruning). For a given ``t_max``,
``F(s, k) = min_e t(s..e, k) + F(e + 1, k - 1)`` over the ``k`` stages that remain, with stages
that do not fit in memory at their position excluded.

Intra-operator level (Alpa's Section 4): for every candidate stage (layers ``s..e`` on a
submesh), an ILP chooses the layers' strategies minimising the stage latency
``sum_u A[u,k_u] + sum_u R[u,k_u,k_{u+1}] + sum_u G[u,k_u] / c`` (per micro-batch; the
gradient synchronisation amortised over the micro-batches) within the memory limit, memory
counted with the micro-batches the stage holds in flight at its position (``min(c, pp - i)``
under 1F1B). Alpa compiles a stage once and derives how many following stages it can afford
(``max_n_succ_stages``); likewise one ILP answer is reused for every deeper position where it
still fits, and a new ILP is solved only where it does not. Every stage ILP is built with PuLP
and solved with HiGHS: Alpa's cost is many small ILPs, which is the point of the comparison.

Each ``(pp, c)`` gives one plan (Alpa's optimum of ``T*``); the plans are scored by uniap's
evaluation and the best that fits is kept. Candidates are visited round-robin over ``pp``
(every ``pp`` with its first ``c``, then every ``pp`` with its second ``c``, ...), so that a
capped run has looked at every pipeline degree rather than only the small ones. Stage ILPs
are solved to the gap uniap's MILP uses (``gapRel = 0``, ``gapAbs = 1e-12``). The search stops
at ``time_cap_s`` (``inf``: never) and returns the best plan so far, marked ``capped``, with
how many candidates it finished (``candidates_done / candidates_total``).
"""

from __future__ import annotations

import hashlib
import math
import time

import numpy as np
import pulp

from uniap._highs import silence_highs_banner
from uniap.cost_model import CostModel, CostTables
from uniap.strategies import divisors

from .common import BaselineResult, candidate_tables, score

__all__ = ["alpa", "stage_ilp", "inter_op_dp", "candidate_order"]


class _Capped(Exception):
    """The wall-time cap was reached."""


def stage_ilp(
    t: CostTables, s: int, e: int, stage: int, time_limit_s: float | None = None
) -> tuple[float, list[int]] | None:
    """Alpa's intra-op ILP for layers ``s..e`` on stage ``stage``: ``(latency_s, strategies)``,
    or None when no choice fits in memory."""
    c = t.num_microbatches
    layers = range(s, e + 1)
    prob = pulp.LpProblem("alpa_stage", pulp.LpMinimize)
    x = {
        (u, k): prob.add_variable(f"x_{u}_{k}", cat=pulp.LpBinary)
        for u in layers
        for k in t.allowed[u]
    }
    classes = {u: sorted({int(t.layout[u, k]) for k in t.allowed[u]}) for u in layers}
    y = {}
    for u in range(s, e):
        for a in classes[u]:
            for b in classes[u + 1]:
                y[u, a, b] = prob.add_variable(f"y_{u}_{a}_{b}", lowBound=0)
    # Latencies are scaled to O(1) (HiGHS tolerances are absolute).
    finite = [float(t.A[u, k]) for (u, k) in x]
    scale = max(sum(finite) / max(len(finite), 1), 1e-12)
    obj = [(var, (float(t.A[u, k]) + float(t.G[u, k]) / c) / scale) for (u, k), var in x.items()]
    obj += [(var, float(t.R[u, a, b]) / scale) for (u, a, b), var in y.items() if t.R[u, a, b]]
    prob += pulp.LpAffineExpression(obj)
    for u in layers:
        prob += pulp.lpSum(x[u, k] for k in t.allowed[u]) == 1, f"assign_{u}"
    for u in range(s, e):
        for a in classes[u]:
            prob += (
                (
                    pulp.lpSum(y[u, a, b] for b in classes[u + 1])
                    == pulp.lpSum(x[u, k] for k in t.allowed[u] if t.layout[u, k] == a)
                ),
                f"out_{u}_{a}",
            )
        for b in classes[u + 1]:
            prob += (
                (
                    pulp.lpSum(y[u, a, b] for a in classes[u])
                    == pulp.lpSum(x[u + 1, k] for k in t.allowed[u + 1] if t.layout[u + 1, k] == b)
                ),
                f"in_{u}_{b}",
            )
    limit = t.memory_limit_bytes
    prob += (
        pulp.LpAffineExpression(
            [(var, float(t.M[u, k, stage]) / limit) for (u, k), var in x.items()]
        )
        <= 1.0,
        "memory",
    )
    silence_highs_banner()
    prob.solve(pulp.HiGHS(msg=False, threads=1, gapRel=0.0, gapAbs=1e-12, timeLimit=time_limit_s))
    if pulp.LpStatus[prob.status] != "Optimal" or prob.sol_status not in (1, 2):
        return None
    strat = []
    for u in layers:
        strat.append(max(t.allowed[u], key=lambda k, u=u: x[u, k].varValue or 0.0))
    lat = _latency(t, s, strat)
    return lat, strat


def _latency(t: CostTables, s: int, strat: list[int]) -> float:
    c = t.num_microbatches
    lat = 0.0
    for j, k in enumerate(strat):
        u = s + j
        lat += float(t.A[u, k]) + float(t.G[u, k]) / c
        if j:
            lat += float(t.R[u - 1, t.layout[u - 1, strat[j - 1]], t.layout[u, k]])
    return lat


def _memory(t: CostTables, s: int, strat: list[int], stage: int) -> float:
    return sum(float(t.M[s + j, k, stage]) for j, k in enumerate(strat))


def inter_op_dp(
    lat: np.ndarray, c: int, deadline: float = math.inf
) -> tuple[float, list[tuple[int, int]]] | None:
    """Alpa's stage DP: ``lat[i, s, e]`` the latency of layers ``s..e`` as stage ``i`` (inf when
    impossible); returns ``(T*, [(s, e) per stage])`` or None."""
    pp, num_layers, _ = lat.shape
    lat = np.where(
        np.triu(np.ones((num_layers, num_layers), dtype=bool))[None], lat, np.inf
    )  # e >= s
    values = np.unique(lat[np.isfinite(lat)])
    best: tuple[float, list[tuple[int, int]]] | None = None
    for t_max in values:
        if best is not None and (c - 1) * t_max >= best[0]:
            break  # Alpa's pruning: the bottleneck term alone cannot win
        if time.perf_counter() > deadline:
            raise _Capped
        latm = np.where(lat <= t_max, lat, np.inf)
        F = np.full(num_layers + 1, np.inf)
        F[num_layers] = 0.0
        choice = []
        for i in range(pp - 1, -1, -1):
            tot = latm[i] + F[None, 1:]  # tot[s, e] = lat(s..e) + F(e + 1)
            arg = np.argmin(tot, axis=1)
            Fn = np.full(num_layers + 1, np.inf)
            Fn[:num_layers] = tot[np.arange(num_layers), arg]
            choice.append(arg)
            F = Fn
        if not np.isfinite(F[0]):
            continue
        total = float(F[0]) + (c - 1) * float(t_max)
        if best is None or total < best[0]:
            bounds, s = [], 0
            for i in range(pp):
                e = int(choice[pp - 1 - i][s])
                bounds.append((s, e))
                s = e + 1
            best = (total, bounds)
    return best


def _content_key(t: CostTables, s: int, e: int, stage: int) -> bytes:
    """Everything the stage ILP of layers ``s..e`` on ``stage`` reads: equal keys, equal ILPs
    (runs of identical blocks give many)."""
    h = hashlib.blake2b(digest_size=16)
    for arr in (
        t.A[s : e + 1],
        t.G[s : e + 1],
        t.M[s : e + 1, :, stage],
        t.layout[s : e + 1],
        t.R[s:e],
    ):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update(repr([t.allowed[u] for u in range(s, e + 1)]).encode())
    return h.digest()


def _cached_ilp(
    t: CostTables,
    s: int,
    e: int,
    stage: int,
    cache: dict,
    counter: list[int],
    deadline: float = math.inf,
):
    key = _content_key(t, s, e, stage)
    if key not in cache:
        # the cap also bounds one ILP (checked between ILPs only, one long ILP overshot it)
        left = deadline - time.perf_counter()
        got = stage_ilp(
            t, s, e, stage, time_limit_s=max(left, 0.05) if math.isfinite(left) else None
        )
        if time.perf_counter() > deadline:
            raise _Capped
        cache[key] = got
        counter[0] += 1
    return cache[key]


def _solve_candidate(t: CostTables, deadline: float, counter: list[int], cache: dict):
    """Profile every stage candidate of this ``(pp, c)`` with the intra-op ILP, then run the DP.

    A stage ILP whose inputs equal those of one already solved (the same run of identical
    blocks shifted along the chain) is answered from a cache: same ILP, same answer."""
    pp, num_layers, c = t.pp, t.num_layers, t.num_microbatches
    inflight = [1 if pp == 1 else min(c, pp - i) for i in range(pp)]
    lat = np.full((pp, num_layers, num_layers), np.inf)
    plans: dict[tuple[int, int, int], list[int]] = {}
    for s in range(num_layers):
        for e in range(s, num_layers):
            # stage i of pp: i stages before it and pp - 1 - i after, each non-empty; the
            # first starts the chain and the last ends it
            positions = [
                i
                for i in range(pp)
                if s >= i
                and e <= num_layers - (pp - i)
                and (i > 0 or s == 0)
                and (i < pp - 1 or e == num_layers - 1)
            ]
            if not positions:
                continue
            # Deeper-in-flight positions first get the ILP answer of a shallower one when it
            # still fits there (Alpa's max_n_succ_stages); otherwise a new ILP with that budget.
            need = sorted({inflight[i] for i in positions})
            answer: dict[int, tuple[float, list[int]] | None] = {}
            stage_of_n = {inflight[i]: i for i in positions}
            current: tuple[float, list[int]] | None = None
            for n in need:
                i = stage_of_n[n]
                if current is not None and _memory(t, s, current[1], i) <= t.memory_limit_bytes * (
                    1 + 1e-9
                ):
                    answer[n] = current
                    continue
                if time.perf_counter() > deadline:
                    raise _Capped
                current = _cached_ilp(t, s, e, i, cache, counter, deadline)
                answer[n] = current
                if current is None:
                    for n2 in need:
                        if n2 > n:
                            answer[n2] = None
                    break
            for i in positions:
                got = answer.get(inflight[i])
                if got is not None:
                    lat[i, s, e] = got[0]
                    plans[i, s, e] = got[1]
    res = inter_op_dp(lat, c, deadline)
    if res is None:
        return None
    _, bounds = res
    stage_of, strategy_of = [], []
    for i, (s, e) in enumerate(bounds):
        stage_of += [i] * (e - s + 1)
        strategy_of += plans[i, s, e]
    return stage_of, strategy_of


def candidate_order(pps: list[int], cs: list[int]) -> list[tuple[int, int]]:
    """``(pp, c)`` round-robin over ``pp``: the first ``c`` of every ``pp``, then the second, ..."""
    return [(pp, c) for j in range(len(cs)) for pp in pps for c in cs[j : j + 1]]


def alpa(cm: CostModel, global_batch_size: int, *, time_cap_s: float = 300.0) -> BaselineResult:
    """Alpa's two-level search over every ``(pp, c)``; the best plan that fits (uniap's TPI)."""
    t0 = time.perf_counter()
    deadline = t0 + time_cap_s
    best = BaselineResult("alpa")
    counter = [0]
    cache: dict[bytes, tuple[float, list[int]] | None] = {}
    n, num_layers = cm.cluster.world_size, cm.graph.num_layers
    pairs = candidate_order(
        [p for p in divisors(n) if p <= num_layers], divisors(global_batch_size)
    )
    done = 0
    capped = False
    try:
        for pp, c in pairs:
            if time.perf_counter() > deadline:
                raise _Capped
            ts = list(
                candidate_tables(cm, global_batch_size, pp_degrees=[pp], num_microbatches=[c])
            )
            got = _solve_candidate(ts[0], deadline, counter, cache) if ts else None
            done += 1
            if got is None:
                continue
            tpi, fits = score(ts[0], *got)
            if fits and tpi < best.time_per_iteration_s:
                best = BaselineResult("alpa", tpi, fits, 0.0, pp, c, got[0], got[1])
    except _Capped:
        capped = True
    best.wall_s = time.perf_counter() - t0
    best.capped = capped
    best.candidates_done, best.candidates_total = done, len(pairs)
    best.detail = f"{done}/{len(pairs)} (pp, c) searched, {counter[0]} stage ILPs" + (
        " (capped)" if capped else ""
    )
    if not math.isfinite(best.time_per_iteration_s):
        best.fits = False
    return best
