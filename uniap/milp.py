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
    ``f[i]`` >= 0 the largest ``F[u,k]`` on stage i (the exposed sync of the stage's first
    layer, :mod:`uniap.cost_model`); only when some ``F`` is positive.

Objective (:func:`_objective`)
    ``min sum_i p_i + sum_i o_i + (c - 1) t + t_sync`` with
    ``p_i = sum_{u,k} A[u,k] x[u,i,k] + sum_{u,a,b} R[u,a,b] y[u,i,a,b]``,
    ``o_i = sum_{u,a,b} Rp[u,a,b] z[u,i,a,b]``.

Constraints (one builder per family, named ``<family>_<indices>``)
    ``assign_u``       (:func:`_assign`) ``sum_{i,k} x[u,i,k] = 1``.
    ``start``          (:func:`_assign`) layer 0 on stage 0, layer L-1 on stage pp-1 (windows).
    ``out_u_i_a``      (:func:`_flow`)
        ``sum_b y[u,i,a,b] + z[u,i,a,b] = sum_{k: layout a} x[u,i,k]``.
    ``in_u_i_b``       (:func:`_flow`)
        ``sum_a y[u-1,i,a,b] + z[u-1,i-1,a,b] = sum_{k: layout b} x[u,i,k]``.
        Together: stages are contiguous, ordered, advance by at most one and are non-empty
        (the path starts on stage 0, ends on pp - 1 and climbs one stage at a time).
    ``bottleneck_i`` / ``link_i`` (:func:`_bottleneck`) ``t >= p_i``, ``t >= o_i``.
    ``sync_i``         (:func:`_bottleneck`) ``t_sync >= sum_{u,k} G[u,k] x[u,i,k] + f[i]``.
    ``first_u_i``      (:func:`_bottleneck`) ``f[i] >= sum_k F[u,k] x[u,i,k]``: ``f[i]`` is at
        least the largest ``F`` on the stage; it only appears in ``sync_i``, so at an optimum
        whose slowest sync is stage i it is that largest value (exact). The rule is
        order-free, so the symmetry rows stay valid.
    ``uses_r_i_k`` / ``first_r_i_k`` (:func:`_first_in_groups`) per group of identical layers
        r, stage i and strategy k with ``F > 0``: a binary ``w[r,i,k]`` with ``count[r,i,k] <=
        |r| w`` and ``f[i] >= F[k] w``: the same rule, stated so that fractional strategies
        cannot average it away (without it, 80 identical blocks stall branch and bound).
    ``bottleneck_lb``  (:func:`_bottleneck`) ``t >=`` the min-max contiguous split of the
        layers' fastest times (:func:`uniap.bounds.bottleneck_lower_bound`): a valid cut that the LP
        relaxation, which spreads layers fractionally over stages, does not see; or, when the
        caller has it (``bottleneck_s``), the split with each stage's fastest strategies *that
        fit its memory* (:func:`uniap.bounds.memory_bottleneck_bound`), which the LP relaxation,
        which recomputes fractions of layers, does not see either.
    ``memory_i``       (:func:`_memory`) ``sum_{u,k} M[u,k,i] x[u,i,k] <= memory limit``.
    ``host_n``         (:func:`_memory`) ``sum_i n[node,i] sum_{u,k} Mh[u,k] x[u,i,k] <= host
        limit`` per node (``Mh``: host bytes per rank of FSDP-offload's state, ``n[node,i]``
        the ranks of stage i on the node); only when some ``Mh`` is positive.
    ``order_u_w_i_j``  (:func:`_symmetry`) identical layers u < w on one stage with strategies of
        the same layout take them in non-decreasing index order (symmetry breaking; exact);
        ``count_r_i_k`` integer counts per group of identical layers, stage and strategy.
    ``size_i``         (:func:`_stage_counts`) an integer ``n_i`` = the number of layers on
        stages 0..i (implied by the binaries; it lets branch and bound split on where a stage
        ends, which the LP relaxation blurs by splitting a layer between two stages).
    ``cutoff``         (:func:`_objective`) objective <= incumbent, when one is known.

Interleaved schedules (``t.virtual_stages = v > 1``, :mod:`uniap.schedules`): the stages ``i``
are the ``pp * v`` virtual stages, stage ``i`` on rank ``r = i % pp``; the path is unchanged
and the per-rank families sum over the rank's stages: ``bottleneck_r`` ``t >= sum_{i % pp = r}
p_i`` (``link_r`` likewise), ``sync_r``/``first_u_r`` over the rank's layers, ``memory_r`` over
its stages. The objective is ``T + t_sync`` with ``T`` the longest path through torch's order
of operations (``t.longest_path``: interleaved 1F1B and zero bubble), written as difference
constraints over one end time per operation (:func:`_longest_path`: ``zb_time_j_q``,
``zb_rank_n``, ``zb_dep_n``, ``zb_end_n``, ``zb_links``); linear and exact (minimising ``T``
sets every end time to its earliest), so the objective is
:func:`uniap.cost_model.evaluate_assignment`'s time.

Windows: ``x[u,i,k]`` exists only for the stages that :mod:`uniap.bounds` leaves to layer u
(:func:`uniap.bounds.stage_windows`, and with an incumbent :func:`uniap.bounds.segment_windows`):
they remove only assignments that cannot beat the incumbent, so exactness is kept.

One stage (``pp = 1``, no interleaving): :func:`uniap.search.single_stage_optimum` answers
exactly without the program (a label-setting pass along the chain, with the stage's largest
``F`` a label coordinate and a Lagrangian bound on memory pruning the labels), unless a
front grows too large or host memory binds; then the program runs.

A pipeline below a bound (``pp > 1``, one stage per rank, not zero bubble, an incumbent or
cutoff given): :func:`uniap.pipeline_labels.pipeline_optimum` answers exactly without the
program (runs of layers as label fronts, stages as a dynamic program over run ends with
``(sum, bottleneck, sync)`` labels), unless a front grows too large, host memory binds or half
the time limit passes; then the program runs in the time left.

Runs of identical layers (a transformer's blocks, :func:`uniap.runs_program.applies`): the
same program with each run's layers counted per stage and strategy instead of placed one by
one (:class:`uniap.runs_program.RunsProgram`), which has no permutation symmetry left to break.

HiGHS runs with a pinned thread count and seed, zero relative gap, an explicit time limit and
a MIP feasibility tolerance of 1e-8 (:data:`uniap.runs_program.MIP_FEASIBILITY_TOLERANCE`: at
1e-9 it pruned optima); memory rows are scaled by :data:`uniap.runs_program.MEMORY_ROW` so that
the solutions it accepts fit within :data:`uniap.cost_model.FIT_SLACK`.
PuLP reports ``Optimal`` even when HiGHS stopped at its time limit, so the status and gap are
read from HiGHS itself.

One module: the program's variables, its constraint families and the HiGHS wrapper that
solves it are one concept; the bounds that narrow it are in :mod:`uniap.bounds`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pulp

from uniap import runs_program
from uniap._highs import silence_highs_banner
from uniap.bounds import SegmentBound, bottleneck_lower_bound, stage_windows
from uniap.cost_model import CostTables, evaluate_assignment, stage_op_times
from uniap.pipeline_labels import pipeline_optimum
from uniap.runs_program import MEMORY_ROW
from uniap.schedules import schedule_dag, schedule_ends
from uniap.search import single_stage_optimum

__all__ = ["Solution", "solve", "min_peak_memory", "identical_pairs"]

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
    bound_s: float = 0.0
    """A lower bound on every assignment of these tables that fits (time per iteration): the
    optimum when ``optimal``, HiGHS's dual bound at a ``time_limit`` (with or without an
    assignment), inf when ``infeasible`` or ``cutoff`` (nothing fits, or nothing beats the
    cutoff)."""


class _HiGHS(pulp.HiGHS):
    """``pulp.HiGHS`` that can hand HiGHS a starting solution (PuLP's HiGHS API cannot) and
    report the search's progress (HiGHS's MIP interrupt callback, at most every ``interval_s``)."""

    def __init__(
        self,
        *args,
        start: dict | None = None,
        progress: Callable[[dict], None] | None = None,
        interval_s: float = 5.0,
        **kwargs,
    ):
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
                self.progress(
                    {
                        "running_s": float(out.running_time),
                        "incumbent": float(out.mip_primal_bound) + offset,
                        "bound": float(out.mip_dual_bound) + offset,
                        "gap": float(out.mip_gap),
                        "nodes": int(out.mip_node_count),
                    }
                )

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


_SUB_MIP_HEURISTICS = (
    "mip_heuristic_run_rins",
    "mip_heuristic_run_rens",
    "mip_heuristic_run_root_reduced_cost",
)


def solve(
    t: CostTables,
    *,
    incumbent: tuple[list[int], list[int]] | None = None,
    incumbent_tpi_s: float | None = None,
    time_limit_s: float = 60.0,
    threads: int = 1,
    seed: int = 0,
    segments: SegmentBound | None = None,
    bottleneck_s: float = 0.0,
    progress: Callable[[dict], None] | None = None,
    progress_interval_s: float = 5.0,
    labels: bool = True,
    label_memo: dict | None = None,
    label_budget_s: float | None = None,
    program: str = "auto",
) -> Solution:
    """Solve the program for these tables. ``incumbent`` (an assignment, e.g. from a heuristic)
    warm-starts HiGHS and, with ``incumbent_tpi_s`` (a bound from elsewhere, e.g. the best
    plan of another ``(pp, c)``), cuts off everything that cannot beat it. ``segments``: the
    :class:`SegmentBound` of these tables when the caller already has it. ``bottleneck_s``: a
    lower bound on every fitting assignment's slowest stage (stage overhead included, e.g.
    :func:`uniap.bounds.memory_bottleneck_bound`), added to ``bottleneck_lb``. ``progress`` is
    called at most every ``progress_interval_s`` during the search with ``running_s``,
    ``incumbent`` and ``bound`` (seconds per iteration; inf while none), ``gap`` and ``nodes``.
    ``labels``: answer by the exact label searches where they apply (one stage:
    :func:`uniap.search.single_stage_optimum`; a pipeline below a bound:
    :func:`uniap.pipeline_labels.pipeline_optimum`) before the program; False runs the
    program alone (tests of the program itself). ``label_memo``: a dict the caller keeps per
    table, so that a pipelined label search resumes where an earlier one under the same or a
    higher bound stopped; ``label_budget_s``: the seconds it may take before the program runs
    in the rest of the time limit (default half of it; 0 skips it). ``program``: ``"layers"``
    (this module's program), ``"runs"`` (:class:`uniap.runs_program.RunsProgram`, which counts
    the layers of each run of identical ones) or ``"auto"``: runs where
    :func:`uniap.runs_program.applies`."""
    t0 = time.perf_counter()
    L, pp, c = t.num_layers, t.pp, t.num_microbatches
    bound = None
    if incumbent is not None:
        bound = evaluate_assignment(t, *incumbent).time_per_iteration_s
        if not np.isfinite(bound):
            incumbent, bound = None, None
    if incumbent_tpi_s is not None and np.isfinite(incumbent_tpi_s):
        bound = incumbent_tpi_s if bound is None else min(bound, incumbent_tpi_s)
    exact = None
    pipelined_labels = labels and bound is not None and t.num_stages > 1 and label_budget_s != 0.0
    if labels and t.num_stages == 1:
        # one stage: a label-setting pass is exact and far cheaper
        found = single_stage_optimum(
            t,
            bound if bound is not None else float("inf"),
            progress=progress,
            progress_interval_s=progress_interval_s,
        )
        if found is not None:
            exact = (found[0], [0] * L if found[1] else [], found[1])
    elif pipelined_labels:
        # a pipeline below a bound: runs as label fronts, stages as a dynamic program, exact;
        # it gives up (None) on a front too large or at its budget (default half the limit), and
        # the program answers in the time left
        exact = pipeline_optimum(
            t,
            bound,
            bottleneck_s=bottleneck_s,
            deadline=t0 + (time_limit_s / 2 if label_budget_s is None else label_budget_s),
            progress=progress,
            progress_interval_s=progress_interval_s,
            memo=label_memo,
        )
    if exact is not None:
        tpi, stage_of, strategy_of = exact
        wall = time.perf_counter() - t0
        if not stage_of:
            status = "cutoff" if bound is not None else "infeasible"
            return Solution(
                status, float("inf"), float("inf"), [], [], 0.0, wall, bound_s=float("inf")
            )
        log.debug("pp=%d c=%d: optimal tpi=%.6g by labels (%.3f s)", pp, c, tpi, wall)
        return Solution("optimal", tpi, tpi, stage_of, strategy_of, 0.0, wall, bound_s=tpi)
    if pipelined_labels:  # the label search gave up: the program gets the time left
        time_limit_s = max(time_limit_s - (time.perf_counter() - t0), 0.1 * time_limit_s)
    window = stage_windows(t, bound)
    if bound is not None and all(window):
        # runs of stages that the segment bound leaves below the cutoff (the cutoff row admits
        # up to bound * (1 + 1e-7): every assignment the program may return stays inside)
        runs = (segments or SegmentBound(t)).windows(bound * (1 + 2e-7))
        window = [[i for i in w if i in r] for w, r in zip(window, runs)]
    if any(not w for w in window):
        return Solution(
            "cutoff" if bound is not None else "infeasible",
            float("inf"),
            float("inf"),
            [],
            [],
            0.0,
            time.perf_counter() - t0,
            bound_s=float("inf"),
        )
    if program == "runs" or (program == "auto" and runs_program.applies(t)):
        # deep stacks of identical blocks: count them per stage instead of placing each
        scale = _time_scale(t, bound)
        rp = runs_program.RunsProgram(t, window, bound, bottleneck_s, scale)
        prob = rp.prob
        start = rp.start_values(*incumbent) if incumbent is not None else None
        read = rp.assignment
        quiet = {}
        if start:
            # proving, not searching: HiGHS's sub-MIP heuristics (RINS, RENS, the root's
            # reduced-cost fixing) took most of the root node (a 128-layer Llama on 32 H100s,
            # fp32, 8 stages, 64 micro-batches: 8.6 -> 3.5 s); they only look for solutions
            quiet = dict.fromkeys(_SUB_MIP_HEURISTICS, False)
    else:
        prob, v, scale = _build(t, window, bound, bottleneck_s)
        start = _start_values(t, v, incumbent, scale) if incumbent is not None else None
        quiet = {}

        def read() -> tuple[list[int], list[int]]:
            stage_of, strategy_of = [0] * L, [0] * L
            for (u, i, k), var in v.x.items():
                if var.varValue is not None and var.varValue > 0.5:
                    stage_of[u], strategy_of[u] = i, k
            return stage_of, strategy_of

    silence_highs_banner()
    # No feasibility jump: with it (HiGHS 1.16, presolve off) HiGHS declared a worse solution
    # optimal on one of the exactness test instances (tests/unit/test_milp_exact.py, seed 20).
    report = None
    if progress is not None:

        def report(d: dict) -> None:  # the program's objective is the TPI divided by `scale`
            progress({**d, "incumbent": d["incumbent"] * scale, "bound": d["bound"] * scale})

    solver = _HiGHS(
        msg=False,
        timeLimit=time_limit_s,
        threads=threads,
        gapRel=0.0,
        gapAbs=1e-12,
        start=start,
        progress=report,
        interval_s=progress_interval_s,
        random_seed=seed,
        mip_feasibility_tolerance=runs_program.MIP_FEASIBILITY_TOLERANCE,
        presolve="off",
        primal_feasibility_tolerance=1e-9,
        mip_heuristic_run_feasibility_jump=False,
        **quiet,
    )
    prob.solve(solver)
    h = prob.solverModel
    import highspy

    ms = h.getModelStatus()
    info = h.getInfo()
    wall = time.perf_counter() - t0
    nvar, ncon = prob.numVariables(), prob.numConstraints()
    has_sol = info.primal_solution_status == 2  # kSolutionStatusFeasible
    # HiGHS's dual bound, in seconds per iteration (PuLP keeps the objective's constant out of
    # the HiGHS model: added back, as in _HiGHS._watch)
    offset = float(h.getLp().offset_) or float(prob.objective.constant or 0.0)
    dual_s = (float(info.mip_dual_bound) + offset) * scale
    if (
        ms
        in (highspy.HighsModelStatus.kInfeasible, highspy.HighsModelStatus.kUnboundedOrInfeasible)
        or not has_sol
    ):
        lower = float("inf")
        if ms == highspy.HighsModelStatus.kTimeLimit:
            status, lower = "time_limit", dual_s
        else:
            status = "cutoff" if bound is not None else "infeasible"
        log.debug("milp pp=%d c=%d: %s (%d vars, %d rows, %.3f s)", pp, c, status, nvar, ncon, wall)
        return Solution(
            status, float("inf"), float("inf"), [], [], 0.0, wall, nvar, ncon, bound_s=lower
        )
    stage_of, strategy_of = read()
    ev = evaluate_assignment(t, stage_of, strategy_of)
    objective = pulp.value(prob.objective) * scale
    if ms == highspy.HighsModelStatus.kOptimal:
        status, gap, lower = "optimal", 0.0, ev.time_per_iteration_s
    else:
        status, gap, lower = "time_limit", float(info.mip_gap), min(dual_s, objective)
        log.debug(
            "milp pp=%d c=%d stopped at its %.3g s time limit with gap %.3g",
            pp,
            c,
            time_limit_s,
            gap,
        )
    log.debug(
        "milp pp=%d c=%d: %s tpi=%.6g (%d vars, %d rows, %.3f s)",
        pp,
        c,
        status,
        ev.time_per_iteration_s,
        nvar,
        ncon,
        wall,
    )
    return Solution(
        status,
        ev.time_per_iteration_s,
        objective,
        stage_of,
        strategy_of,
        gap,
        wall,
        nvar,
        ncon,
        bound_s=lower,
    )


def _build(
    t: CostTables, window: list[list[int]], bound: float | None, bottleneck_s: float = 0.0
) -> tuple[pulp.LpProblem, _Vars, float]:
    """The program for these tables and windows, with the cutoff at ``bound`` when given."""
    # Times are scaled so the objective is O(1) (HiGHS tolerances are absolute).
    scale = _time_scale(t, bound)
    prob = pulp.LpProblem("uniap", pulp.LpMinimize)
    v = _variables(prob, t, window)
    _assign(prob, t, v)
    _flow(prob, t, v)
    p, o = _stage_times(t, v, scale)
    _bottleneck(prob, t, v, p, o, scale, bottleneck_s)
    _memory(prob, t, v)
    _symmetry(prob, t, v)
    _stage_counts(prob, t, v)
    _first_in_groups(prob, t, v, scale)
    if t.longest_path:
        _longest_path(prob, t, v, p, o, scale)
    _objective(prob, t, v, p, o, bound, scale)
    return prob, v, scale


def min_peak_memory(t: CostTables, *, time_limit_s: float = 60.0, threads: int = 1) -> float:
    """The smallest per-device peak memory of any assignment (ignoring the memory limit): what
    an infeasibility error reports as the memory needed, for interleaved tables, where a rank's
    memory sums its ``v`` stages (one stage per rank: the exact and far cheaper
    :func:`uniap.bounds.min_peak_memory`). Same path variables, objective ``min m`` with
    ``m >= memory of rank r``."""
    window = stage_windows(dataclasses.replace(t, memory_limit_bytes=float("inf")), None)
    prob = pulp.LpProblem("uniap_memory", pulp.LpMinimize)
    v = _variables(prob, t, window)
    _assign(prob, t, v)
    _flow(prob, t, v)
    m = prob.add_variable("m", lowBound=0)
    scale = float(np.max(t.M)) or 1.0
    terms: list[list] = [[] for _ in range(t.pp)]
    for (u, i, k), var in v.x.items():
        terms[i % t.pp].append((var, float(t.M[u, k, i]) / scale))  # per rank
    for i, tm in enumerate(terms):
        prob += m >= pulp.LpAffineExpression(tm), f"memory_{i}"
    prob += m
    silence_highs_banner()
    prob.solve(pulp.HiGHS(msg=False, timeLimit=time_limit_s, threads=threads))
    return float(pulp.value(m)) * scale


def _variables(prob: pulp.LpProblem, t: CostTables, window: list[list[int]]) -> _Vars:
    L = t.num_layers
    x = {
        (u, i, k): prob.add_variable(f"x_{u}_{i}_{k}", cat=pulp.LpBinary)
        for u in range(L)
        for i in window[u]
        for k in t.allowed[u]
    }
    lay = [{k: int(t.layout[u, k]) for k in t.allowed[u]} for u in range(L)]
    classes = [sorted(set(lay[u].values())) for u in range(L)]
    y, z = {}, {}
    for u in range(L - 1):
        for i in window[u]:
            for a in classes[u]:
                for b in classes[u + 1]:
                    if i in window[u + 1]:
                        y[u, i, a, b] = prob.add_variable(f"y_{u}_{i}_{a}_{b}", lowBound=0)
                    if i + 1 in window[u + 1]:
                        z[u, i, a, b] = prob.add_variable(f"z_{u}_{i}_{a}_{b}", lowBound=0)
    tb = prob.add_variable("t", lowBound=0)
    ts = prob.add_variable("t_sync", lowBound=0)
    f = []
    if np.any(np.where(t.allowed_mask(), t.F, 0.0) > 0):
        f = [prob.add_variable(f"f_{i}", lowBound=0) for i in range(t.pp)]
    return _Vars(x, y, z, tb, ts, window, lay, classes, f)


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
    first: list[pulp.LpVariable]
    """``f[i]`` per stage, empty when every ``F`` is 0."""
    groups: list[list[int]] = dataclasses.field(default_factory=list)
    """Runs of identical layers (:func:`_symmetry`), each in chain order."""
    counts: dict = dataclasses.field(default_factory=dict)
    """``(group, stage, strategy) -> count`` variable (:func:`_symmetry`)."""
    uses: dict = dataclasses.field(default_factory=dict)
    """``(group, stage, strategy) -> w`` binary (:func:`_first_in_groups`)."""
    zb_time: pulp.LpVariable | None = None
    """Interleaved schedules: the longest path ``T`` (:func:`_longest_path`)."""
    zb_ends: list = dataclasses.field(default_factory=list)
    """Interleaved schedules: each operation's end time."""


def _time_scale(t: CostTables, bound: float | None) -> float:
    if bound is not None and bound > 0:
        return bound
    finite = np.where(np.isfinite(t.A), t.A, 0.0)
    s = float(finite.max(axis=1).sum()) * t.num_microbatches
    return s if s > 0 else 1.0


def _assign(prob: pulp.LpProblem, t: CostTables, v: _Vars) -> None:
    """``assign_u``: each layer on exactly one stage with one strategy; ``start``/``end``."""
    L, pp = t.num_layers, t.num_stages
    for u in range(L):
        prob += (
            pulp.lpSum(v.x[u, i, k] for i in v.window[u] for k in t.allowed[u]) == 1,
            f"assign_{u}",
        )
    prob += pulp.lpSum(v.x[0, 0, k] for k in t.allowed[0] if (0, 0, k) in v.x) == 1, "start"
    prob += (
        pulp.lpSum(v.x[L - 1, pp - 1, k] for k in t.allowed[L - 1] if (L - 1, pp - 1, k) in v.x)
        == 1,
        "end",
    )


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
                lhs += [
                    v.z[k] for k in ((u - 1, i - 1, a, b) for a in v.classes[u - 1]) if k in v.z
                ]
                rhs = [v.x[u, i, k] for k in t.allowed[u] if v.layout[u][k] == b]
                prob += pulp.lpSum(lhs) == pulp.lpSum(rhs), f"in_{u}_{i}_{b}"


def _stage_times(t: CostTables, v: _Vars, scale: float):
    """Scaled stage times ``p_i`` and link times ``o_i`` as affine expressions (per stage;
    with an interleaved schedule per virtual stage)."""
    pp = t.num_stages
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


def _bottleneck(
    prob, t: CostTables, v: _Vars, p, o, scale: float, bottleneck_s: float = 0.0
) -> None:
    """``bottleneck_i``, ``link_i``: ``t >= p_i, o_i``; ``sync_i``: ``t_sync >= s_i``. With
    ``v`` stages per rank (interleaved), per rank r: ``t >= sum_{j % pp = r} p_j`` (and the
    same for ``o``), and ``s_r``, ``f[r]`` over all of the rank's stages."""
    pp = t.pp
    if t.virtual_stages == 1:
        loads, links = p, o
    else:
        loads = [pulp.lpSum(p[r::pp]) for r in range(pp)]
        links = [pulp.lpSum(o[r::pp]) for r in range(pp)]
    for i, pi in enumerate(loads):
        prob += v.t >= pi, f"bottleneck_{i}"
    lb = max(bottleneck_lower_bound(t), bottleneck_s)
    if np.isfinite(lb):
        prob += v.t >= lb / scale, "bottleneck_lb"
    for i, oi in enumerate(links):
        prob += v.t >= oi, f"link_{i}"
    s_terms: list[list] = [[] for _ in range(t.pp)]
    for (u, i, k), var in v.x.items():
        g = float(t.G[u, k])
        if g:
            s_terms[i % pp].append((var, g / scale))
    if v.first:
        for i in range(t.pp):
            s_terms[i].append((v.first[i], 1.0))
        f_terms: dict[tuple[int, int], list] = {}
        for (u, i, k), var in v.x.items():
            f = float(t.F[u, k])
            if f:
                f_terms.setdefault((u, i % pp), []).append((var, f / scale))
        for (u, i), terms in sorted(f_terms.items()):
            prob += v.first[i] >= pulp.LpAffineExpression(terms), f"first_{u}_{i}"
    for i, terms in enumerate(s_terms):
        prob += v.t_sync >= pulp.LpAffineExpression(terms), f"sync_{i}"


def _memory(prob, t: CostTables, v: _Vars) -> None:
    """``memory_r``: per-rank bytes within the limit (normalised by the limit, times
    :data:`uniap.runs_program.MEMORY_ROW`; with an
    interleaved schedule a rank's stages together); ``host_n``: each node's host bytes within
    the host limit."""
    terms: list[list] = [[] for _ in range(t.pp)]
    for (u, i, k), var in v.x.items():
        terms[i % t.pp].append((var, float(t.M[u, k, i]) * MEMORY_ROW / t.memory_limit_bytes))
    for i, tm in enumerate(terms):
        prob += pulp.LpAffineExpression(tm) <= MEMORY_ROW, f"memory_{i}"
    if t.uses_host_memory and np.isfinite(t.host_limit_bytes):
        for n, ranks in enumerate(t.host_ranks):
            tm = [
                (var, float(ranks[i % t.pp] * t.Mh[u, k]) * MEMORY_ROW / t.host_limit_bytes)
                for (u, i, k), var in v.x.items()
                if t.Mh[u, k] > 0 and ranks[i % t.pp] > 0
            ]
            if tm:
                prob += pulp.LpAffineExpression(tm) <= MEMORY_ROW, f"host_{n}"


def identical_pairs(t: CostTables) -> list[tuple[int, int]]:
    """Pairs ``(u, w)``, ``u < w``, where ``w`` is the next layer after ``u`` with identical rows
    of ``A``, ``G``, ``M``, the same allowed strategies and the same layouts (the blocks of a
    transformer; Swin's alternating shifted/unshifted blocks pair up two apart)."""
    groups: dict[bytes, list[int]] = {}
    for u in range(t.num_layers):
        key = runs_program.row_key(t, u)
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
                n = prob.add_variable(
                    f"n_{r}_{i}_{k}", lowBound=0, upBound=len(xs), cat=pulp.LpInteger
                )
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


def _stage_counts(prob, t: CostTables, v: _Vars) -> None:
    """``size_i``: an integer ``n_i``, the number of layers on stages 0..i, for i < S - 1.

    Implied by the binaries (valid, exact), but not by the LP relaxation: with memory tight it
    balances the stages' loads by splitting a layer's path between two stages, a fraction on
    each, and its bottleneck undercuts every integer split by up to a layer's time (times
    ``c - 1``). Branching on ``n_i`` cuts those splits at once, where branching on one ``x``
    moves the fraction to the next layer (Llama-7B's block x 128 on 32 H100s, pp = 4, c = 8:
    the gap after 60 s fell from 1.0 % to 0.23 %)."""
    on: list[list] = [[] for _ in range(t.num_stages)]
    for (_, j, _), var in v.x.items():
        on[j].append(var)
    prev = None  # n_i = n_{i-1} + the layers on stage i: each x in one row
    for i in range(t.num_stages - 1):
        n = prob.add_variable(f"size_{i}", lowBound=0, upBound=t.num_layers, cat=pulp.LpInteger)
        rhs = pulp.lpSum(on[i]) if prev is None else prev + pulp.lpSum(on[i])
        prob += n == rhs, f"size_{i}"
        prev = n


def _first_in_groups(prob, t: CostTables, v: _Vars, scale: float) -> None:
    """``uses_r_i_k`` / ``first_r_i_k``: a binary ``w[r,i,k]`` per group of identical layers,
    stage and strategy with ``F > 0``, at least ``count / |group|`` and at most ``f[i] /
    F[k]``. Valid (a group that uses k on stage i has a layer there with ``F[k]``) and, unlike
    the per-layer rows, not averaged away by fractional strategies: branch and bound can
    decide "some block of this group uses k here" at once."""
    if not v.first:
        return
    for (r, i, k), n in v.counts.items():
        f = float(t.F[v.groups[r][0], k])
        if not f:
            continue
        w = prob.add_variable(f"w_{r}_{i}_{k}", cat=pulp.LpBinary)
        v.uses[r, i, k] = w
        prob += n <= len(v.groups[r]) * w, f"uses_{r}_{i}_{k}"
        prob += v.first[i % t.pp] >= (f / scale) * w, f"first_{r}_{i}_{k}"


def _longest_path(prob, t: CostTables, v: _Vars, p, o, scale: float) -> None:
    """Interleaved schedules: the longest path through torch's order of operations
    (:func:`uniap.schedules.schedule_dag`) as difference constraints. Per stage j the
    forward ``d_j_0 = sum Af x + (R y + k) / 2``, weight gradient ``d_j_2 = sum Aw x`` (zero
    bubble; else 0), input gradient (else the backward) ``d_j_1 = p_j - d_j_0 - d_j_2``
    (``zb_time_j_kind``); per operation n of kind
    q on stage j an end time ``e_n >= e_prev(n) + d_j_q`` (``zb_rank_n``: the rank's previous
    operation) and ``e_n >= e_dep(n) + o_link / 2 + d_j_q`` (``zb_dep_n``: the output it
    waits for, over the stage boundary it crosses); ``T >= e_n`` for each rank's last
    operation (``zb_end_n``) and ``T >= c t`` (``zb_links``: ``t`` is at least every rank's
    link time). Minimising ``T`` makes every ``e_n`` the earliest end, so ``T`` is
    :func:`uniap.cost_model.evaluate_assignment`'s time exactly."""
    S = t.num_stages
    fw_terms: list[list] = [[] for _ in range(S)]
    w_terms: list[list] = [[] for _ in range(S)]
    for (u, i, k), var in v.x.items():
        if t.Af[u, k]:
            fw_terms[i].append((var, float(t.Af[u, k]) / scale))
        if t.Aw[u, k]:
            w_terms[i].append((var, float(t.Aw[u, k]) / scale))
    for (u, i, a, b), var in v.y.items():
        r = float(t.R[u, a, b])
        if r:
            fw_terms[i].append((var, r / 2 / scale))
    d = {}
    for j in range(S):
        fwd = pulp.LpAffineExpression(fw_terms[j], constant=t.stage_overhead_s / 2 / scale)
        wgt = pulp.LpAffineExpression(w_terms[j])
        for q, expr in enumerate((fwd, p[j] - fwd - wgt, wgt)):
            d[j, q] = prob.add_variable(f"zb_d_{j}_{q}", lowBound=0)
            prob += d[j, q] == expr, f"zb_time_{j}_{q}"
    dag = schedule_dag(t.schedule, t.pp, t.virtual_stages, t.num_microbatches)
    ends = [prob.add_variable(f"zb_e_{n}", lowBound=0) for n in range(len(dag))]
    last = {}
    for n, (q, j, prev, dep, link) in enumerate(dag):
        if prev >= 0:
            prob += ends[n] - ends[prev] - d[j, q] >= 0, f"zb_rank_{n}"
            last.pop(prev, None)
        else:
            prob += ends[n] - d[j, q] >= 0, f"zb_rank_{n}"
        last[n] = True
        if dep >= 0:
            delay = o[link] * 0.5 if link >= 0 else 0
            prob += ends[n] - ends[dep] - d[j, q] - delay >= 0, f"zb_dep_{n}"
    v.zb_time = prob.add_variable("zb_T", lowBound=0)
    for n in sorted(last):
        prob += v.zb_time >= ends[n], f"zb_end_{n}"
    prob += v.zb_time >= t.num_microbatches * v.t, "zb_links"
    v.zb_ends = ends


def _objective(prob, t: CostTables, v: _Vars, p, o, bound: float | None, scale: float) -> None:
    """``sum p + sum o + (c - 1) t + t_sync`` (interleaved schedules: ``T + t_sync``,
    :func:`_longest_path`); ``cutoff`` when an incumbent bound is known."""
    if t.longest_path:
        obj = v.zb_time + v.t_sync
    else:
        obj = pulp.lpSum(p) + pulp.lpSum(o) + (t.num_microbatches - 1.0) * v.t + v.t_sync
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
        vals[n.name] = float(
            sum(1 for u in v.groups[r] if stage_of[u] == i and strategy_of[u] == k)
        )
        if (r, i, k) in v.uses:
            vals[v.uses[r, i, k].name] = float(vals[n.name] > 0)
    for i in range(t.num_stages - 1):
        vals[f"size_{i}"] = float(sum(1 for j in stage_of if j <= i))
    pp, p, o = t.pp, ev.stage_time_s, ev.link_time_s
    loads = [sum(p[r::pp]) for r in range(pp)] + [sum(o[r::pp]) for r in range(pp)]
    vals["t"] = max(loads) / scale
    vals["t_sync"] = max(ev.sync_time_s) / scale
    if t.longest_path:
        dur = stage_op_times(t, stage_of, strategy_of, p)
        for j, times in enumerate(zip(*dur)):
            for q, x in enumerate(times):
                vals[f"zb_d_{j}_{q}"] = x / scale
        ends = schedule_ends(t.schedule, pp, t.virtual_stages, t.num_microbatches, *dur, o)
        for var, e in zip(v.zb_ends, ends):
            vals[var.name] = e / scale
        vals["zb_T"] = max(max(ends) / scale, t.num_microbatches * vals["t"])
    for i, f in enumerate(v.first):
        vals[f.name] = (
            max(
                (
                    float(t.F[u, k])
                    for u, (j, k) in enumerate(zip(stage_of, strategy_of))
                    if j % pp == i
                ),
                default=0.0,
            )
            / scale
        )
    return vals
