"""UniAP's program for one ``(pp, c)``, solved exactly as a MILP with HiGHS through PuLP.

Index legend: ``u`` layer (0..L-1, chain order), ``i`` stage (0..pp-1), ``k`` strategy
(``allowed[u]``), ``a``/``b`` activation layout classes (a strategy's dp), ``c`` micro-batches.
Cost coefficients ``A, G, M, R, Rp`` come from :class:`uniap.cost_model.CostTables`.

The quadratic program of UniAP (placement ``P[u,i]`` x strategy ``S[u,k]``, neighbour products
``S[u,k] S[u+1,k']`` for resharding and ``P[u,i] P[u+1,i+1]`` for the stage boundary) is written
as a path through the layered graph whose nodes are ``(u, i, k)``: a layer sits on one stage
with one strategy, and from layer ``u`` to ``u + 1`` the path either stays on the stage or
advances to the next one. The path's edges carry the quadratic terms, so the linearisation is
exact (the MILP optimum is the MIQP optimum) and the LP relaxation is a network-flow relaxation.

Variables
    ``x[u,i,k]``  binary: layer u on stage i with strategy k (only for i in the window of u).
    ``y[u,i,a,b]`` >= 0: u and u+1 both on stage i, layouts a -> b.
    ``z[u,i,a,b]`` >= 0: u last on stage i, u+1 first on stage i+1, layouts a -> b.
    ``t`` >= 0 the pipeline bottleneck; ``t_sync`` >= 0 the slowest stage's once-per-iteration sync.

Objective (:func:`_objective`)
    ``min sum_i p_i + sum_i o_i + (c - 1) t + t_sync`` with
    ``p_i = sum_{u,k} A[u,k] x[u,i,k] + sum_{u,a,b} R[u,a,b] y[u,i,a,b]``,
    ``o_i = sum_{u,a,b} Rp[u,a,b] z[u,i,a,b]``.

Constraints (one builder per family, named ``<family>_<indices>``)
    ``assign_u``       (:func:`_assign`) ``sum_{i,k} x[u,i,k] = 1``.
    ``start``          (:func:`_assign`) layer 0 on stage 0, layer L-1 on stage pp-1 (windows).
    ``out_u_i_a``      (:func:`_flow`) ``sum_b y[u,i,a,b] + z[u,i,a,b] = sum_{k: layout a} x[u,i,k]``.
    ``in_u_i_b``       (:func:`_flow`) ``sum_a y[u-1,i,a,b] + z[u-1,i-1,a,b] = sum_{k: layout b} x[u,i,k]``.
        Together: stages are contiguous, ordered, advance by at most one and are non-empty
        (the path starts on stage 0, ends on pp - 1 and climbs one stage at a time).
    ``bottleneck_i`` / ``link_i`` (:func:`_bottleneck`) ``t >= p_i``, ``t >= o_i``.
    ``sync_i``         (:func:`_bottleneck`) ``t_sync >= sum_{u,k} G[u,k] x[u,i,k]``.
    ``bottleneck_lb``  (:func:`_bottleneck`) ``t >=`` the min-max contiguous split of the
        layers' fastest times (:func:`bottleneck_lower_bound`): a valid cut that the LP
        relaxation, which spreads layers fractionally over stages, does not see.
    ``memory_i``       (:func:`_memory`) ``sum_{u,k} M[u,k,i] x[u,i,k] <= memory limit``.
    ``order_u_w_i_j``  (:func:`_symmetry`) identical layers u < w on one stage with strategies of
        the same layout take them in non-decreasing index order (symmetry breaking; exact);
        ``count_r_i_k`` integer counts per group of identical layers, stage and strategy.
    ``cutoff``         (:func:`_objective`) objective <= incumbent, when one is known.

Windows: layer u may sit on stage i only if ``i <= u`` and ``pp - 1 - i <= L - 1 - u``; with an
incumbent of time ``T``, also only if stages 0..i can reach u and stages i..pp-1 can cover
u..L-1 with every stage's compute lower bound ``seg`` satisfying
``total_min + (c - 1) seg <= T`` and its memory lower bound within the limit, and only if some
run of layers through u on stage i keeps the segment bound below ``T``
(:func:`segment_windows`). These cuts only remove assignments that cannot beat ``T``, so
exactness is kept.

HiGHS runs with a pinned thread count and seed, zero relative gap and an explicit time limit.
PuLP reports ``Optimal`` even when HiGHS stopped at its time limit, so the status and gap are
read from HiGHS itself.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pulp

from uniap._highs import silence_highs_banner
from uniap.cost_model import CostTables, evaluate_assignment
from uniap.search import allowed_mask

__all__ = ["Solution", "solve", "min_peak_memory", "bottleneck_lower_bound", "segment_lower_bound", "segment_windows",
           "SegmentBound"]

log = logging.getLogger(__name__)


@dataclass
class Solution:
    """Result of one MILP."""

    status: str
    """``optimal``, ``time_limit`` (incumbent returned, see gap), ``infeasible`` (nothing fits),
    or ``cutoff`` (nothing beats the given incumbent)."""
    time_per_iteration_s: float
    """``evaluate_assignment`` of the returned assignment (inf when none)."""
    objective_s: float
    """The MILP's own objective value for the returned assignment."""
    stage_of: list[int]
    strategy_of: list[int]
    gap: float
    """Relative optimality gap HiGHS reports (0 when proven optimal)."""
    wall_s: float
    num_variables: int = 0
    num_constraints: int = 0


class _HiGHS(pulp.HiGHS):
    """``pulp.HiGHS`` that can hand HiGHS a starting solution (PuLP's HiGHS API cannot) and
    report the search's progress (HiGHS's MIP interrupt callback, at most every ``interval_s``)."""

    def __init__(self, *args, start: dict | None = None, progress: Callable[[dict], None] | None = None,
                 interval_s: float = 5.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = start or {}
        self.progress, self.interval_s = progress, interval_s

    def _watch(self, lp) -> None:
        import highspy

        h = lp.solverModel
        last = [time.perf_counter()]
        # PuLP keeps the objective's constant out of the HiGHS model: add it back
        offset = float(h.getLp().offset_) or float(lp.objective.constant or 0.0)

        def on_interrupt(kind, message, out, into, user_data) -> None:
            now = time.perf_counter()
            if now - last[0] >= self.interval_s:
                last[0] = now
                self.progress({"running_s": float(out.running_time),
                               "incumbent": float(out.mip_primal_bound) + offset,
                               "bound": float(out.mip_dual_bound) + offset,
                               "gap": float(out.mip_gap), "nodes": int(out.mip_node_count)})

        h.setCallback(on_interrupt, None)
        h.startCallback(highspy.cb.HighsCallbackType.kCallbackMipInterrupt)

    def callSolver(self, lp):  # noqa: N802 - PuLP's name
        if self.progress is not None:
            self._watch(lp)
        if self.start:
            import highspy

            sol = highspy.HighsSolution()
            values = [0.0] * lp.solverModel.getNumCol()
            for var in lp.variables():
                values[var.index] = self.start.get(var.name, 0.0)
            sol.col_value = values
            sol.value_valid = True
            lp.solverModel.setSolution(sol)
        super().callSolver(lp)


def solve(
    t: CostTables,
    *,
    incumbent: tuple[list[int], list[int]] | None = None,
    incumbent_tpi_s: float | None = None,
    time_limit_s: float = 60.0,
    threads: int = 1,
    seed: int = 0,
    segments: SegmentBound | None = None,
    progress: Callable[[dict], None] | None = None,
    progress_interval_s: float = 5.0,
) -> Solution:
    """Solve the program for these tables. ``incumbent`` (an assignment, e.g. from a heuristic)
    warm-starts HiGHS and, with ``incumbent_tpi_s`` (a bound from elsewhere, e.g. the best
    plan of another ``(pp, c)``), cuts off everything that cannot beat it. ``segments``: the
    :class:`SegmentBound` of these tables when the caller already has it. ``progress`` is
    called at most every ``progress_interval_s`` during the search with ``running_s``,
    ``incumbent`` and ``bound`` (seconds per iteration; inf while none), ``gap`` and ``nodes``."""
    t0 = time.perf_counter()
    L, pp, c = t.num_layers, t.pp, t.num_microbatches
    bound = None
    if incumbent is not None:
        bound = evaluate_assignment(t, *incumbent).time_per_iteration_s
        if not np.isfinite(bound):
            incumbent, bound = None, None
    if incumbent_tpi_s is not None and np.isfinite(incumbent_tpi_s):
        bound = incumbent_tpi_s if bound is None else min(bound, incumbent_tpi_s)
    window = _windows(t, bound)
    if bound is not None and all(window):
        # runs of stages that the segment bound leaves below the cutoff (the cutoff row admits
        # up to bound * (1 + 1e-7): every assignment the program may return stays inside)
        runs = (segments or SegmentBound(t)).windows(bound * (1 + 2e-7))
        window = [[i for i in w if i in r] for w, r in zip(window, runs)]
    if any(not w for w in window):
        return Solution("cutoff" if bound is not None else "infeasible", float("inf"), float("inf"),
                        [], [], 0.0, time.perf_counter() - t0)
    prob, v, scale = _build(t, window, bound)
    start = _start_values(t, v, incumbent, scale) if incumbent is not None else None
    silence_highs_banner()
    # No feasibility jump: with it (HiGHS 1.16, presolve off) HiGHS declared a worse solution
    # optimal on one of the exactness test instances (tests/unit/test_milp_exact.py, seed 20).
    report = None
    if progress is not None:
        def report(d: dict) -> None:  # the program's objective is the TPI divided by `scale`
            progress({**d, "incumbent": d["incumbent"] * scale, "bound": d["bound"] * scale})
    solver = _HiGHS(msg=False, timeLimit=time_limit_s, threads=threads, gapRel=0.0, gapAbs=1e-12,
                    start=start, progress=report, interval_s=progress_interval_s,
                    random_seed=seed, mip_feasibility_tolerance=1e-9, presolve="off",
                    primal_feasibility_tolerance=1e-9, mip_heuristic_run_feasibility_jump=False)
    prob.solve(solver)
    h = prob.solverModel
    import highspy

    ms = h.getModelStatus()
    info = h.getInfo()
    wall = time.perf_counter() - t0
    nvar, ncon = len(prob.variables()), len(prob.constraints)
    has_sol = info.primal_solution_status == 2  # kSolutionStatusFeasible
    if ms in (highspy.HighsModelStatus.kInfeasible, highspy.HighsModelStatus.kUnboundedOrInfeasible) or not has_sol:
        if ms == highspy.HighsModelStatus.kTimeLimit:
            status = "time_limit"
        else:
            status = "cutoff" if bound is not None else "infeasible"
        log.debug("milp pp=%d c=%d: %s (%d vars, %d rows, %.3f s)", pp, c, status, nvar, ncon, wall)
        return Solution(status, float("inf"), float("inf"), [], [], 0.0, wall, nvar, ncon)
    stage_of, strategy_of = [0] * L, [0] * L
    for (u, i, k), var in v.x.items():
        if var.varValue is not None and var.varValue > 0.5:
            stage_of[u], strategy_of[u] = i, k
    ev = evaluate_assignment(t, stage_of, strategy_of)
    objective = pulp.value(prob.objective) * scale
    if ms == highspy.HighsModelStatus.kOptimal:
        status, gap = "optimal", 0.0
    else:
        status, gap = "time_limit", float(info.mip_gap)
        log.debug("milp pp=%d c=%d stopped at its %.3g s time limit with gap %.3g", pp, c, time_limit_s, gap)
    log.debug("milp pp=%d c=%d: %s tpi=%.6g (%d vars, %d rows, %.3f s)", pp, c, status,
              ev.time_per_iteration_s, nvar, ncon, wall)
    return Solution(status, ev.time_per_iteration_s, objective, stage_of, strategy_of, gap, wall, nvar, ncon)


def _build(t: CostTables, window: list[list[int]], bound: float | None) -> tuple[pulp.LpProblem, _Vars, float]:
    """The program for these tables and windows, with the cutoff at ``bound`` when given."""
    # Times are scaled so the objective is O(1) (HiGHS tolerances are absolute).
    scale = _time_scale(t, bound)
    prob = pulp.LpProblem("uniap", pulp.LpMinimize)
    v = _variables(t, window)
    _assign(prob, t, v)
    _flow(prob, t, v)
    p, o = _stage_times(t, v, scale)
    _bottleneck(prob, t, v, p, o, scale)
    _memory(prob, t, v)
    _symmetry(prob, t, v)
    _objective(prob, t, v, p, o, bound, scale)
    return prob, v, scale


def min_peak_memory(t: CostTables, *, time_limit_s: float = 60.0, threads: int = 1) -> float:
    """The smallest per-device peak memory of any assignment (ignoring the memory limit): what
    an infeasibility error reports as the memory needed. Same path variables, objective
    ``min m`` with ``m >= memory of stage i``."""
    window = _windows(dataclasses.replace(t, memory_limit_bytes=float("inf")), None)
    prob = pulp.LpProblem("uniap_memory", pulp.LpMinimize)
    v = _variables(t, window)
    _assign(prob, t, v)
    _flow(prob, t, v)
    m = pulp.LpVariable("m", lowBound=0)
    scale = float(np.max(t.M)) or 1.0
    terms: list[list] = [[] for _ in range(t.pp)]
    for (u, i, k), var in v.x.items():
        terms[i].append((var, float(t.M[u, k, i]) / scale))
    for i, tm in enumerate(terms):
        prob += m >= pulp.LpAffineExpression(tm), f"memory_{i}"
    prob += m
    silence_highs_banner()
    prob.solve(pulp.HiGHS(msg=False, timeLimit=time_limit_s, threads=threads))
    return float(pulp.value(m)) * scale


def _variables(t: CostTables, window: list[list[int]]) -> _Vars:
    L = t.num_layers
    x = {(u, i, k): pulp.LpVariable(f"x_{u}_{i}_{k}", cat=pulp.LpBinary)
         for u in range(L) for i in window[u] for k in t.allowed[u]}
    lay = [{k: int(t.layout[u, k]) for k in t.allowed[u]} for u in range(L)]
    classes = [sorted(set(lay[u].values())) for u in range(L)]
    y, z = {}, {}
    for u in range(L - 1):
        for i in window[u]:
            for a in classes[u]:
                for b in classes[u + 1]:
                    if i in window[u + 1]:
                        y[u, i, a, b] = pulp.LpVariable(f"y_{u}_{i}_{a}_{b}", lowBound=0)
                    if i + 1 in window[u + 1]:
                        z[u, i, a, b] = pulp.LpVariable(f"z_{u}_{i}_{a}_{b}", lowBound=0)
    tb = pulp.LpVariable("t", lowBound=0)
    ts = pulp.LpVariable("t_sync", lowBound=0)
    return _Vars(x, y, z, tb, ts, window, lay, classes)


@dataclass
class _Vars:
    x: dict
    y: dict
    z: dict
    t: pulp.LpVariable
    t_sync: pulp.LpVariable
    window: list[list[int]]
    layout: list[dict[int, int]]
    classes: list[list[int]]
    groups: list[list[int]] = dataclasses.field(default_factory=list)
    """Runs of identical layers (:func:`_symmetry`), each in chain order."""
    counts: dict = dataclasses.field(default_factory=dict)
    """``(group, stage, strategy) -> count`` variable (:func:`_symmetry`)."""


def _time_scale(t: CostTables, bound: float | None) -> float:
    if bound is not None and bound > 0:
        return bound
    finite = np.where(np.isfinite(t.A), t.A, 0.0)
    s = float(finite.max(axis=1).sum()) * t.num_microbatches
    return s if s > 0 else 1.0


def _windows(t: CostTables, bound: float | None) -> list[list[int]]:
    """Stages each layer may sit on (see the module docstring)."""
    L, pp, c = t.num_layers, t.pp, t.num_microbatches
    lo = [max(0, pp - L + u) for u in range(L)]
    hi = [min(u, pp - 1) for u in range(L)]
    amin, _, mmin = _minima(t)
    limit = t.memory_limit_bytes * (1 + 1e-9)
    total = float(amin.sum())
    cap = float("inf")
    if bound is not None and c > 1:
        cap = (bound * (1 + 1e-9) - total) / (c - 1)
    elif bound is not None and bound * (1 + 1e-9) < total:
        cap = -1.0

    ca = np.concatenate([[0.0], np.cumsum(amin)])
    cm = np.vstack([np.zeros((1, pp)), np.cumsum(mmin, axis=0)])

    def min_start(i: int) -> list[int]:
        """For each end e, the first start s with layers s..e fitting on stage i (L if none)."""
        out, s = [], 0
        for e in range(L):
            s = max(s, 0)
            while s <= e and not (ca[e + 1] - ca[s] <= cap + 1e-15 and cm[e + 1, i] - cm[s, i] <= limit):
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
            end_ok = any(F[i, e] and (B[i + 1, e + 1] if i + 1 < pp else e == L - 1) for e in range(u, L))
            start_ok = any(B[i, s] and (F[i - 1, s - 1] if i > 0 else s == 0) for s in range(0, u + 1))
            if end_ok and start_ok:
                w.append(i)
        out.append(w)
    return out


def _minima(t: CostTables) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each layer's smallest ``A`` and ``G`` over its allowed strategies, ``(L,)``, and its
    smallest memory per stage, ``(L, pp)``."""
    mask = allowed_mask(t)
    amin = np.where(mask, t.A, np.inf).min(axis=1)
    gmin = np.where(mask, t.G, np.inf).min(axis=1)
    mmin = np.where(mask[:, :, None], t.M, np.inf).min(axis=1)
    return amin, gmin, mmin


def bottleneck_lower_bound(t: CostTables) -> float:
    """A lower bound on the slowest stage ``max_i p_i`` of any assignment: the min-max split of
    the chain into ``pp`` contiguous stages where layer u weighs ``min_k A[u,k]`` and stage i
    must hold ``sum min_k M[u,k,i]`` within the memory limit (inf if no split fits).

    Every stage's time is at least the sum of its layers' fastest times, so the real
    bottleneck is at least this one. Solved exactly by bisection on the bottleneck with a
    greedy fill (segment feasibility is monotone, so filling each stage as far as it goes
    reaches furthest)."""
    L, pp = t.num_layers, t.pp
    amin, _, mmin = _minima(t)
    limit = t.memory_limit_bytes * (1 + 1e-9)

    ca = np.concatenate([[0.0], np.cumsum(amin)])
    cm = np.vstack([np.zeros((1, pp)), np.cumsum(mmin, axis=0)])
    # Sums of runs are differences of prefix sums: allow for their rounding so that a run that
    # fits is never judged too big (the bound must stay below the true one).
    t_slack = 1e-12 * float(ca[-1])
    m_slack = 1e-12 * float(cm[-1].max())
    # by_mem[u][i]: where a stage i that starts at layer u ends at the latest (memory)
    by_mem = np.stack([np.searchsorted(cm[:, i], cm[:-1, i] + limit + m_slack, side="right") - 1
                       for i in range(pp)], axis=1).tolist()

    def fits(cap: float) -> bool:
        by_time = (np.searchsorted(ca, ca[:-1] + cap + t_slack, side="right") - 1).tolist()
        u = 0
        for i in range(pp):
            if u >= L:
                return False  # an empty stage
            e = min(by_time[u], by_mem[u][i])  # fill the stage as far as it goes
            if e == u:
                return False  # nothing fits here
            if (L - e) < (pp - 1 - i):
                e = L - (pp - 1 - i)  # too few layers left: give later stages one each
            u = e
        return u >= L

    lo, hi = float(amin.max()), float(amin.sum())
    if not fits(hi * (1 + 1e-12)):
        return float("inf")
    for _ in range(60):
        mid = (lo + hi) / 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-12 * hi:
            break
    return lo * (1 - 1e-9)


def segment_lower_bound(t: CostTables, target: float | None = None, *, max_evals: int = 48) -> float:
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


class SegmentBound:
    """The dynamic program behind :func:`segment_lower_bound` and :func:`segment_windows` for
    one table (built once, asked again for other targets; the table must not change)."""

    def __init__(self, t: CostTables) -> None:
        L, pp, c = t.num_layers, t.pp, t.num_microbatches
        self.t, self.L, self.pp = t, L, pp
        self.k, self.step, self.w = t.stage_overhead_s, t.step_overhead_s, c - 1
        self.split = bottleneck_lower_bound(t) if L >= pp else float("inf")
        if not np.isfinite(self.split):
            return
        k = self.k
        amin, gmin, mmin = _minima(t)
        mask = allowed_mask(t)
        self.T0 = max(self.split, float(amin.sum()) / pp) + k
        self.S0 = max(float(gmin.sum()) / pp, float(gmin.max()))
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
        self.nu_of = np.repeat(nus, len(mus))
        self.mu_of = np.tile(mus, len(nus))
        self.upper = np.triu(np.ones((L, L), dtype=bool))
        cg = np.concatenate([[0.0], np.cumsum(gmin)])
        self.seg_g = cg[None, 1:] - cg[:-1, None]
        cm = np.vstack([np.zeros((1, pp)), np.cumsum(mmin, axis=0)])
        slack_m = 1e-12 * float(cm[-1].max())
        self.limit = t.memory_limit_bytes * (1 + 1e-9) + slack_m
        self.mem_ok = np.stack([self.upper & (cm[None, 1:, i] - cm[:-1, None, i] <= self.limit) for i in range(pp)])
        self.seg_h = []  # per stage group: [combo, s, e] = sum over u in s..e of min_k (A + nu G + mu M)
        self.slack_t = 1e-300
        for i in reps:
            h = np.where(mask[None], t.A[None] + self.nu_of[:, None, None] * t.G[None]
                         + self.mu_of[:, None, None] * t.M[None, :, :, i], np.inf).min(axis=2)
            H = np.concatenate([np.zeros((len(self.nu_of), 1)), np.cumsum(h, axis=1)], axis=1)
            self.slack_t = max(self.slack_t, 1e-12 * float(np.max(np.abs(H))))
            self.seg_h.append(H[:, None, 1:] - H[:, :-1, None])
        self.cut = np.full(L, np.inf)
        if L > 1:
            self.cut[:-1] = t.Rp.reshape(L - 1, -1).min(axis=1)
        self.run_cache: dict[float, list[np.ndarray]] = {}
        self.evals = 0

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
        """Per stage group, [s, e]: a lower bound on the stage time of layers s..e (compute,
        within memory, with sync <= Sb)."""
        if Sb not in self.run_cache:
            finite = np.isfinite(Sb)
            use = slice(None) if finite else self.nu_of == 0  # an unbounded S*: nu = 0 only
            off = (self.nu_of * (Sb if finite else 0.0) + self.mu_of * self.limit)[use][:, None, None]
            out = []
            for sh in self.seg_h:
                v = (sh[use] - off).max(axis=0)
                if finite:
                    v = np.where(self.seg_g <= Sb * (1 + 1e-12) + self.slack_t, v, np.inf)
                out.append(np.where(self.upper, v - self.slack_t, np.inf) + self.k)
            self.run_cache[Sb] = out
        return self.run_cache[Sb]

    def stage_costs(self, Tb: float, Sb: float) -> list[np.ndarray]:
        """Per stage, [s, e]: the cost of run s..e as that stage (its time bound and outgoing
        edge), inf where it cannot be (memory, or above Tb)."""
        runs = self.run_time(Sb)
        out = []
        for i in range(self.pp):
            val = runs[self.group_of[i]]
            ok = self.mem_ok[i] & (val <= Tb)
            if i < self.pp - 1:
                ok &= (self.cut <= Tb)[None, :]
                out.append(np.where(ok, val + self.cut[None, :], np.inf))
            else:
                out.append(np.where(ok, val, np.inf))
        return out

    def cheapest_split(self, Tb: float, Sb: float) -> float:
        """F(Tb, Sb): the cheapest split of the chain into pp runs (stage by stage over run ends)."""
        self.evals += 1
        f = None
        for i, add in enumerate(self.stage_costs(Tb, Sb)):
            if i == 0:
                f = add[0]
            else:
                prev = np.concatenate([[np.inf], f[:-1]])  # prev[s]: stages 0..i-1 end at s - 1
                f = (prev[:, None] + add).min(axis=0)
        return float(f[self.L - 1])

    def bound(self, Ta: float, Sa: float, F: float) -> float:
        return self.w * Ta + Sa + F + self.step

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
            return b0 * (1 - 1e-9), ([first] if target is not None and b0 * (1 - 1e-9) < target else [])
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
                Ts = max(Ta, (aim - self.step - Sa - F) / w)
                cells += [(Ts, Tb, Sa, Sb, F), (Ta, Ts, Sa, Sb, None)]
            elif not np.isfinite(Sb):  # likewise S*
                Ss = max(Sa, aim - self.step - w * Ta - F)
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
        budget = goal * (1 + 1e-9) - self.bound(Ta, Sa, 0.0)
        cover = np.zeros((L, pp), dtype=bool)
        idx = np.arange(L)
        for i in range(pp):
            pre = np.concatenate([[np.inf], fw[i - 1][:-1]]) if i else start  # pre[s]: before run s..
            post = np.concatenate([bw[i + 1][1:], [np.inf]]) if i < pp - 1 else end  # post[e]: after ..e
            good = (pre[:, None] + adds[i] + post[None, :]) < budget
            last = np.where(good.any(axis=1), L - 1 - np.argmax(good[:, ::-1], axis=1), -1)  # furthest e per s
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


def _assign(prob: pulp.LpProblem, t: CostTables, v: _Vars) -> None:
    """``assign_u``: each layer on exactly one stage with one strategy; ``start``/``end``."""
    L, pp = t.num_layers, t.pp
    for u in range(L):
        prob += pulp.lpSum(v.x[u, i, k] for i in v.window[u] for k in t.allowed[u]) == 1, f"assign_{u}"
    prob += pulp.lpSum(v.x[0, 0, k] for k in t.allowed[0] if (0, 0, k) in v.x) == 1, "start"
    prob += pulp.lpSum(v.x[L - 1, pp - 1, k] for k in t.allowed[L - 1] if (L - 1, pp - 1, k) in v.x) == 1, "end"


def _flow(prob: pulp.LpProblem, t: CostTables, v: _Vars) -> None:
    """``out_u_i_a`` / ``in_u_i_b``: the path from (u, i) to (u + 1, i or i + 1)."""
    L = t.num_layers
    for u in range(L - 1):
        for i in v.window[u]:
            for a in v.classes[u]:
                lhs = [v.y[k] for k in ((u, i, a, b) for b in v.classes[u + 1]) if k in v.y]
                lhs += [v.z[k] for k in ((u, i, a, b) for b in v.classes[u + 1]) if k in v.z]
                rhs = [v.x[u, i, k] for k in t.allowed[u] if v.layout[u][k] == a]
                prob += pulp.lpSum(lhs) == pulp.lpSum(rhs), f"out_{u}_{i}_{a}"
    for u in range(1, L):
        for i in v.window[u]:
            for b in v.classes[u]:
                lhs = [v.y[k] for k in ((u - 1, i, a, b) for a in v.classes[u - 1]) if k in v.y]
                lhs += [v.z[k] for k in ((u - 1, i - 1, a, b) for a in v.classes[u - 1]) if k in v.z]
                rhs = [v.x[u, i, k] for k in t.allowed[u] if v.layout[u][k] == b]
                prob += pulp.lpSum(lhs) == pulp.lpSum(rhs), f"in_{u}_{i}_{b}"


def _stage_times(t: CostTables, v: _Vars, scale: float):
    """Scaled stage times ``p_i`` and link times ``o_i`` as affine expressions."""
    pp = t.pp
    p_terms: list[list] = [[] for _ in range(pp)]
    o_terms: list[list] = [[] for _ in range(max(pp - 1, 0))]
    for (u, i, k), var in v.x.items():
        p_terms[i].append((var, float(t.A[u, k]) / scale))
    for (u, i, a, b), var in v.y.items():
        r = float(t.R[u, a, b])
        if r:
            p_terms[i].append((var, r / scale))
    for (u, i, a, b), var in v.z.items():
        r = float(t.Rp[u, a, b])
        if r:
            o_terms[i].append((var, r / scale))
    k = t.stage_overhead_s / scale
    p = [pulp.LpAffineExpression(terms, constant=k) for terms in p_terms]
    o = [pulp.LpAffineExpression(terms) for terms in o_terms]
    return p, o


def _bottleneck(prob, t: CostTables, v: _Vars, p, o, scale: float) -> None:
    """``bottleneck_i``, ``link_i``: ``t >= p_i, o_i``; ``sync_i``: ``t_sync >= s_i``."""
    for i, pi in enumerate(p):
        prob += v.t >= pi, f"bottleneck_{i}"
    lb = bottleneck_lower_bound(t)
    if np.isfinite(lb):
        prob += v.t >= lb / scale, "bottleneck_lb"
    for i, oi in enumerate(o):
        prob += v.t >= oi, f"link_{i}"
    s_terms: list[list] = [[] for _ in range(t.pp)]
    for (u, i, k), var in v.x.items():
        g = float(t.G[u, k])
        if g:
            s_terms[i].append((var, g / scale))
    for i, terms in enumerate(s_terms):
        prob += v.t_sync >= pulp.LpAffineExpression(terms), f"sync_{i}"


def _memory(prob, t: CostTables, v: _Vars) -> None:
    """``memory_i``: per-stage bytes within the limit (normalised by the limit)."""
    terms: list[list] = [[] for _ in range(t.pp)]
    for (u, i, k), var in v.x.items():
        terms[i].append((var, float(t.M[u, k, i]) / t.memory_limit_bytes))
    for i, tm in enumerate(terms):
        prob += pulp.LpAffineExpression(tm) <= 1.0, f"memory_{i}"


def identical_pairs(t: CostTables) -> list[tuple[int, int]]:
    """Pairs ``(u, w)``, ``u < w``, where ``w`` is the next layer after ``u`` with identical rows
    of ``A``, ``G``, ``M``, the same allowed strategies and the same layouts (the blocks of a
    transformer; Swin's alternating shifted/unshifted blocks pair up two apart)."""
    groups: dict[bytes, list[int]] = {}
    for u in range(t.num_layers):
        key = b"|".join([np.asarray(t.allowed[u]).tobytes(), t.A[u].tobytes(), t.G[u].tobytes(),
                         t.M[u].tobytes(), t.layout[u].tobytes()])
        groups.setdefault(key, []).append(u)
    return sorted((g[j], g[j + 1]) for g in groups.values() for j in range(len(g) - 1))


def _symmetry(prob, t: CostTables, v: _Vars) -> None:
    """``order_u_w_i_j``: two identical layers u < w (w the next one like u) on the same stage
    whose strategies share a layout take them in non-decreasing index order; and integer
    ``count`` variables per group of identical layers, stage and strategy.

    Valid: swapping the strategies of u and w changes no coefficient (same rows; every reshard
    edge keeps its layouts, which is all its cost depends on), so sorting each stage's group
    by such swaps turns any optimum into one that satisfies these rows. They remove the
    ``n!``-fold symmetry of identical blocks that otherwise stalls branch and bound, and the
    counts let it branch on "how many blocks of this group use strategy k on stage i"."""
    pairs = identical_pairs(t)
    groups: list[list[int]] = []
    member: dict[int, int] = {}
    for u, w in pairs:
        if u in member:
            groups[member[u]].append(w)
        else:
            groups.append([u, w])
            member[u] = len(groups) - 1
        member[w] = member[u]
    v.groups = groups
    for r, grp in enumerate(groups):
        stages = sorted({i for u in grp for i in v.window[u]})
        for i in stages:
            for k in t.allowed[grp[0]]:
                xs = [v.x[u, i, k] for u in grp if (u, i, k) in v.x]
                n = pulp.LpVariable(f"n_{r}_{i}_{k}", lowBound=0, upBound=len(xs), cat=pulp.LpInteger)
                v.counts[r, i, k] = n
                prob += n == pulp.lpSum(xs), f"count_{r}_{i}_{k}"
    for u, w in pairs:
        for i in v.window[u]:
            if i not in v.window[w]:
                continue
            for a in v.classes[u]:
                ks = [k for k in t.allowed[u] if v.layout[u][k] == a]
                for j in ks[:-1]:
                    hi = [v.x[u, i, k] for k in ks if k > j]
                    lo = [v.x[w, i, k] for k in ks if k <= j]
                    prob += pulp.lpSum(hi) + pulp.lpSum(lo) <= 1, f"order_{u}_{w}_{i}_{j}"


def _objective(prob, t: CostTables, v: _Vars, p, o, bound: float | None, scale: float) -> None:
    """``sum p + sum o + (c - 1) t + t_sync``; ``cutoff`` when an incumbent bound is known."""
    obj = pulp.lpSum(p) + pulp.lpSum(o) + (t.num_microbatches - 1) * v.t + v.t_sync
    obj += t.step_overhead_s / scale
    prob += obj
    if bound is not None:
        prob += obj <= bound / scale * (1 + 1e-7), "cutoff"


def _start_values(t: CostTables, v: _Vars, incumbent, scale: float) -> dict:
    """HiGHS start values of every variable for an assignment (empty when it lies outside the
    windows). The assignment is first put in the order the symmetry rows ask for (identical
    layers of one stage and layout class take their strategies in increasing index order; the
    same time and memory, see :func:`_symmetry`) and the count variables are filled in:
    otherwise HiGHS rejects the start as infeasible."""
    stage_of, strategy_of = list(incumbent[0]), list(incumbent[1])
    for grp in v.groups:
        by_class: dict[tuple[int, int], list[int]] = {}
        for u in grp:
            by_class.setdefault((stage_of[u], v.layout[u][strategy_of[u]]), []).append(u)
        for members in by_class.values():
            for u, k in zip(members, sorted(strategy_of[u] for u in members)):
                strategy_of[u] = k
    ev = evaluate_assignment(t, stage_of, strategy_of)
    vals = {}
    for u, (i, k) in enumerate(zip(stage_of, strategy_of)):
        if (u, i, k) not in v.x:
            return {}
        vals[v.x[u, i, k].name] = 1.0
        if u + 1 < t.num_layers:
            a, b = v.layout[u][k], v.layout[u + 1][strategy_of[u + 1]]
            key = (u, i, a, b)
            var = v.y.get(key) if stage_of[u + 1] == i else v.z.get(key)
            if var is None:
                return {}
            vals[var.name] = 1.0
    for (r, i, k), n in v.counts.items():
        vals[n.name] = float(sum(1 for u in v.groups[r] if stage_of[u] == i and strategy_of[u] == k))
    vals["t"] = max(ev.stage_time_s + ev.link_time_s) / scale
    vals["t_sync"] = max(ev.sync_time_s) / scale
    return vals
