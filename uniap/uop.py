"""The search state of the Unified Optimization Process (:mod:`uniap.planner`): one entry per
``(pp, c, schedule)`` candidate with its tables, best heuristic assignment, segment bound and
program result, and the phases that fill them (heuristic incumbents, local search, two passes
of exact solves, the last resort before "no plan fits"). Every skip and cut here removes only
assignments that cannot beat a plan already in hand."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from uniap import runs_program
from uniap.bounds import SegmentBound, memory_bottleneck_bound, min_peak_memory
from uniap.cluster import Cluster
from uniap.cost_model import CostModel, CostTables, evaluate_assignment
from uniap.errors import InfeasibleError
from uniap.milp import Solution, solve
from uniap.milp import min_peak_memory as milp_min_peak_memory
from uniap.progress import solve_progress
from uniap.report import fmt_seconds
from uniap.search import heuristic, memory_split_assignment
from uniap.units import fmt_bytes

__all__ = ["Candidate", "Entry", "Search", "explain_entries"]

log = logging.getLogger(__name__)

_QUICK_SOLVE_S = 2.0
"""First-pass time limit per candidate (see :func:`plan_graph`)."""

_FIRST_SOLVE_FACTOR = 4.0
"""The first program solved gets this many times the first-pass time limit."""

_NO_SPLIT_FITS = "even with every layer's leanest strategy, nothing fits in memory (lower bound)"

_FIRST_LABELS_S = 0.5
"""Seconds the pipelined label search may take before the program in a first-pass solve of a
shallow pipeline (see :func:`_label_budget`)."""


_LONG_STAGE = 12
"""Layers per stage above which a table with a run of identical layers skips the pipelined
label search (see :func:`_label_budget`)."""


def _label_budget(t: CostTables, limit_s: float, pass_no: int) -> float:
    """Seconds of a solve's time limit the pipelined label search may take before the program.
    In the first pass: all of it on pipelines with at least 4 micro-batches per stage (the
    program then gets what the labels leave, at least a tenth of the limit), a short look (at
    most 0.5 s, a quarter of the limit) on the others; in the second, three quarters. With
    many micro-batches per stage the bottleneck outweighs the rest and the label search
    settles what the program's relaxation leaves open (Llama-2-70B, 8 stages, 64
    micro-batches: 3 s against a gap after 300 s; on 1024 H100s at batch 8192, fp32, about
    8 s, where three quarters of the first pass's 8 s left it to the second pass: 11.2 ->
    9.2 s; about 4 s since its sweeps compare near labels first); on shallow pipelines the
    program often proves the optimum in a second while the label search's fronts (long
    stages) grow slowly. A second-pass solve resumes from the
    fronts the first built. Tables with a run of identical layers
    (:func:`uniap.runs_program.applies`) and long stages (more than
    :data:`_LONG_STAGE` layers each) get none: the program over runs proves them where the
    fronts grow largest (a 128-layer Llama on 32 H100s, 4 stages, 32 micro-batches: 1.0 s
    against 3.1 s with the labels first); on short stages the labels stay first (Llama-2-70B
    on 1024 H100s, fp32, batch 8192, 8 stages of 10 layers: 8.4 s, against 17 s with the
    program alone). Only the time spent changes, never the answer."""
    if t.num_layers > _LONG_STAGE * t.num_stages and runs_program.applies(t):
        return 0.0
    if pass_no == 1 and t.num_microbatches < 4 * t.num_stages:
        return min(_FIRST_LABELS_S, limit_s / 4)
    if pass_no == 1:
        return limit_s
    return limit_s * 3 / 4


_IMPROVE_STARTS = 4
"""Heuristic starts that local search improves on each candidate that may win."""


@dataclass
class Candidate:
    """One (pp, c, schedule) of the search and what became of it."""

    pp: int
    num_microbatches: int
    schedule: str
    lower_bound_s: float
    virtual_stages: int = 1
    """Stages per rank (interleaved schedules), 1 otherwise."""
    status: str = "pending"
    """``optimal``, ``time_limit``, ``infeasible`` (nothing fits), ``pruned`` (bound cannot
    win), ``cutoff`` (solved: nothing beats the incumbent)."""
    time_per_iteration_s: float = math.inf
    wall_s: float = 0.0
    bound_target_s: float = math.inf
    """The incumbent the strong bound was last refined against (it refines again for a lower
    one)."""
    reason: str = ""
    """Why the candidate did not give the plan (empty for the winner and unsolved ones)."""

    def row(self) -> dict:
        tpi = self.time_per_iteration_s
        return {
            "pp": self.pp,
            "c": self.num_microbatches,
            "schedule": self.schedule,
            **({"v": self.virtual_stages} if self.virtual_stages > 1 else {}),
            "status": self.status,
            "lower_bound_s": float(self.lower_bound_s),
            "time_per_iteration_s": float(tpi) if math.isfinite(tpi) else None,
            "wall_s": round(self.wall_s, 4),
            "reason": self.reason,
        }


@dataclass(eq=False)
class Entry:
    """One candidate during the search: its tables, its best heuristic assignment, its segment
    bound (built when first needed) and its program's latest result."""

    cand: Candidate
    tables: CostTables
    start: tuple[list[int], list[int]] | None = None
    """The best heuristic assignment found (the program's warm start)."""
    start_tpi_s: float = math.inf
    segments: SegmentBound | None = None
    solution: Solution | None = None
    limit_used_s: float = 0.0
    """Time limit of the program's latest solve."""
    label_memo: dict = dataclasses.field(default_factory=dict)
    """What the pipelined label search built for these tables (:func:`uniap.milp.solve`'s
    ``label_memo``): a second-pass solve resumes it."""
    bottleneck_s: float = 0.0
    """A lower bound on every assignment's slowest stage ``T*`` (0 until
    :func:`uniap.bounds.memory_bottleneck_bound` ran): a row of the program, and the floor of
    the segment bound's boxes."""

    def strengthen(self, target: float) -> float:
        """Raise the candidate's lower bound with the segment bound refined towards ``target``
        (the incumbent), when the cheap bound does not already reach it; when that is not
        enough either and the bottleneck counts (``c > 1``), with the bottleneck's memory-aware
        bound (:func:`uniap.bounds.memory_bottleneck_bound`) as the floor of the segment bound's
        boxes; and when that is not enough, with each run's exact knapsack as the floor of its
        time (:meth:`uniap.bounds.SegmentBound.floor_runs`). The bound."""
        cand = self.cand
        if (
            cand.lower_bound_s < target * (1 - 1e-12)
            and math.isfinite(target)
            and target < cand.bound_target_s
        ):
            if self.segments is None:
                self.segments = SegmentBound(self.tables)
            cand.lower_bound_s = max(cand.lower_bound_s, self.segments.lower_bound(target))
            cand.bound_target_s = target
            if cand.lower_bound_s < target * (1 - 1e-12) and self._raise_bottleneck(target):
                cand.lower_bound_s = max(cand.lower_bound_s, self.segments.lower_bound(target))
            if cand.lower_bound_s < target * (1 - 1e-12) and self.segments.floor_runs(
                self.bottleneck_cap(target)
            ):
                cand.lower_bound_s = max(cand.lower_bound_s, self.segments.lower_bound(target))
        return cand.lower_bound_s

    def bottleneck_cap(self, target: float) -> float:
        """The slowest stage above which an assignment cannot beat ``target``: ``TPI >= sum_u
        min_k A + pp k + (c - 1) T*`` (inf with one micro-batch)."""
        t = self.tables
        w = t.num_microbatches - 1
        if w <= 0 or not math.isfinite(target):
            return math.inf
        amin, _, _ = t.minima()
        rest = float(amin.sum()) + t.num_stages * t.stage_overhead_s
        return max(0.0, target - rest) / w * (1 + 1e-9)

    def _raise_bottleneck(self, target: float) -> bool:
        """Floor the segment bound's ``T*`` at :func:`uniap.bounds.memory_bottleneck_bound`,
        capped where an assignment's bottleneck alone would reach ``target``
        (``TPI >= sum_u min_k A + pp k + (c - 1) T*``: a larger ``T*`` cannot beat it, and the
        result ``min(T*, cap)`` bounds every assignment). True when the floor rose."""
        t, seg = self.tables, self.segments
        if t.num_microbatches <= 1 or t.virtual_stages > 1 or seg is None:
            return False
        if not math.isfinite(seg.split):
            return False
        floor = memory_bottleneck_bound(t, self.bottleneck_cap(target))
        if floor <= max(seg.T0, self.bottleneck_s):
            return False
        self.bottleneck_s = floor
        seg.floor_bottleneck(floor)
        return True

    @property
    def final(self) -> bool:
        """Its program has answered for good (optimal, infeasible, or cut off by an incumbent,
        which only gets better)."""
        return self.solution is not None and self.solution.status in (
            "optimal",
            "infeasible",
            "cutoff",
        )

    def settled(self, target: float) -> bool:
        """The bound shows that this candidate cannot beat ``target``."""
        return self.strengthen(target) >= target * (1 - 1e-12)


@dataclass
class Search:
    """The state of the Unified Optimization Process (see the module docstring, steps 3-5)."""

    entries: list[Entry]
    best_tpi_s: float = math.inf
    """The best time in hand (a heuristic assignment's or a program's)."""
    owner: Entry | None = None
    """The candidate whose heuristic assignment holds ``best_tpi_s`` before any program ran."""
    best: Entry | None = None
    """The candidate whose program gave the best plan so far."""
    num_solves: int = 0

    def _offer(self, e: Entry, inc: tuple[list[int], list[int]] | None) -> None:
        tpi = (
            evaluate_assignment(e.tables, *inc).time_per_iteration_s
            if inc is not None
            else math.inf
        )
        if e.start is None or tpi < e.start_tpi_s:
            e.start, e.start_tpi_s = inc, tpi
        if tpi < self.best_tpi_s:
            self.best_tpi_s, self.owner = tpi, e

    def by_bound(self) -> list[Entry]:
        return sorted(self.entries, key=lambda e: e.cand.lower_bound_s)

    def first_incumbents(self) -> None:
        """Step 3: a heuristic assignment per candidate that may still win (best bound first);
        the best of them is a global incumbent that cuts off every program that cannot beat it.
        The pipelined candidates' strong bounds wait for the one-stage optima (step 3b), a
        better target than a heuristic's: refined towards it, they settle more, for less."""
        for e in self.by_bound():
            if e.cand.lower_bound_s < self.best_tpi_s:
                self._offer(e, heuristic(e.tables))

    def improve_incumbents(self) -> None:
        """Step 4: for each candidate that may still win (best bound first, each new incumbent
        refining the others' bounds) a better start: with several micro-batches first the
        split of the memory-aware bottleneck bound as an assignment
        (:func:`uniap.search.memory_split_assignment`: where recomputation decides the
        slowest stage it is often the better start, and it costs a knapsack the bound has
        built), and local search from the heuristic starts only when that split did not beat
        the candidate's start and its bound still does not settle it (Llama-2-70B on 32
        H100s, batch 256: the split gave each pipelined candidate the local search's value,
        which took 0.6 s more). Then they are visited best plan first: the one that holds the
        optimum usually comes first, and its plan then cuts off or prunes the others. Only the
        starts change, never the answer: every candidate the bounds do not settle is solved."""
        for e in self.by_bound():
            if e.final or e.settled(self.best_tpi_s):
                continue
            if e.tables.num_microbatches > 1:
                before = e.start_tpi_s
                cap = e.bottleneck_cap(self.best_tpi_s)
                self._offer(e, memory_split_assignment(e.tables, cap))
                if e.start_tpi_s < before or e.settled(self.best_tpi_s):
                    continue
            self._offer(e, heuristic(e.tables, starts=_IMPROVE_STARTS))
        self.entries.sort(
            key=lambda e: (e.start_tpi_s, e.cand.lower_bound_s, e.cand.pp, e.cand.num_microbatches)
        )

    def solve_all(
        self,
        time_limit_s: float,
        threads: int,
        seed: int,
        say: Callable[[str], None] | None,
        progress_interval_s: float,
        *,
        one_stage: bool = False,
    ) -> None:
        """Step 5, in two passes. First every candidate gets a short solve: most finish (optimal,
        or cut off by the incumbent); the hard ones stop early, but the easy ones have meanwhile
        lowered the incumbent. Then the unfinished ones are solved to the end against that
        better bound, which usually cuts them off quickly. The first program solved (the best
        incumbent, most often the optimum's) gets a longer first try: a restart would repeat
        its work. Candidates whose program already answered for good are skipped.

        ``one_stage``: step 3b, right after the first incumbents, the first pass over the
        one-stage candidates only: their optimum is a label-setting pass
        (:func:`uniap.search.single_stage_optimum`), exact and cheap, and where one stage wins
        (or comes close) its plan settles most pipelined candidates before their local search
        and programs run."""
        quick_s = min(time_limit_s, _QUICK_SOLVE_S)
        first_s = min(time_limit_s, _FIRST_SOLVE_FACTOR * quick_s)
        passes = ((1, quick_s),) if one_stage else ((1, quick_s), (2, time_limit_s))
        programs = 0  # programs (not label passes) solved by this call
        for pass_no, limit in passes:
            for idx, e in enumerate(self.entries):
                if e.final or (one_stage and e.tables.num_stages > 1):
                    continue
                if pass_no == 2 and (
                    e.solution is None
                    or e.solution.status != "time_limit"
                    or e.limit_used_s >= limit
                ):
                    continue
                # Prune by the bound, against the best plan so far (or the heuristic incumbent,
                # except on the candidate that holds it: its own program must produce the plan).
                if (self.best is not None or e is not self.owner) and e.settled(self.best_tpi_s):
                    self._prune(e)
                    continue
                lim = first_s if pass_no == 1 and not programs else limit
                programs += e.tables.num_stages > 1
                label = (
                    f"[{idx + 1}/{len(self.entries)}] pp={e.cand.pp} "
                    f"c={e.cand.num_microbatches} {e.cand.schedule}"
                    + (f" v={e.cand.virtual_stages}" if e.cand.virtual_stages > 1 else "")
                )
                watch = solve_progress(say, label, self.best_tpi_s) if say is not None else None
                sol = self._solve(
                    e,
                    lim,
                    threads,
                    seed,
                    progress=watch,
                    progress_interval_s=progress_interval_s,
                    label_budget_s=_label_budget(e.tables, lim, pass_no),
                )
                if say is not None:
                    tpi = (
                        fmt_seconds(sol.time_per_iteration_s)
                        if math.isfinite(sol.time_per_iteration_s)
                        else "-"
                    )
                    say(
                        f"{label}: {sol.status} {tpi} per iteration (solved in "
                        f"{fmt_seconds(sol.wall_s)})" + (" (second pass)" if pass_no == 2 else "")
                    )

    def unsettled(self) -> list[Entry]:
        """The candidates whose programs stopped at their time limit and may still beat the
        plan: the plan's own when its program did not prove it, and any other whose bound
        (its program's, or the strong bound refined against the final plan) is below the
        plan's time. The others are pruned: a program that stopped in the first pass, against
        a higher incumbent, may have a bound at or above the plan found later."""
        best_s = self.best.solution.time_per_iteration_s
        out = []
        for e in self.entries:
            if e.solution is None or e.solution.status != "time_limit":
                continue
            if e is not self.best:
                cand = e.cand
                cand.lower_bound_s = max(cand.lower_bound_s, e.solution.bound_s)
                if cand.lower_bound_s >= best_s * (1 - 1e-12) or e.settled(best_s):
                    self._prune(e, best_s)
                    continue
            out.append(e)
        return out

    def _prune(self, e: Entry, against_s: float | None = None) -> None:
        against_s = self.best_tpi_s if against_s is None else against_s
        cand = e.cand
        cand.status = "pruned"
        cand.reason = (
            _NO_SPLIT_FITS
            if not math.isfinite(cand.lower_bound_s)
            else f"its lower bound {cand.lower_bound_s:.6g} s cannot beat {against_s:.6g} s"
        )
        if e.solution is not None:  # a first-pass time-out that the bound now settles
            e.solution = dataclasses.replace(e.solution, status="pruned")

    def _solve(
        self,
        e: Entry,
        limit_s: float,
        threads: int,
        seed: int,
        *,
        cutoff: bool = True,
        progress: Callable | None = None,
        progress_interval_s: float = 5.0,
        label_budget_s: float | None = None,
    ) -> Solution:
        inc = e.start
        if e.solution is not None and e.solution.stage_of:
            inc = (e.solution.stage_of, e.solution.strategy_of)
        e.limit_used_s = limit_s
        bound = self.best_tpi_s if cutoff and math.isfinite(self.best_tpi_s) else None
        sol = solve(
            e.tables,
            incumbent=inc if cutoff else None,
            incumbent_tpi_s=bound,
            time_limit_s=limit_s,
            threads=threads,
            seed=seed,
            segments=e.segments,
            bottleneck_s=e.bottleneck_s,
            progress=progress,
            progress_interval_s=progress_interval_s,
            label_memo=e.label_memo,
            label_budget_s=label_budget_s,
        )
        e.solution = sol
        self.num_solves += 1
        cand = e.cand
        cand.status = sol.status
        cand.reason = {
            "infeasible": "no assignment fits in memory (the program is infeasible)",
            "cutoff": f"nothing beats {self.best_tpi_s:.6g} s (the program is cut off)",
        }.get(sol.status, "")
        cand.wall_s += sol.wall_s
        cand.time_per_iteration_s = sol.time_per_iteration_s
        if sol.stage_of and (
            self.best is None or sol.time_per_iteration_s < self.best.solution.time_per_iteration_s
        ):
            self.best = e
            self.best_tpi_s = min(self.best_tpi_s, sol.time_per_iteration_s)
        return sol

    def leanest(self, time_limit_s: float) -> list[tuple[float, int]]:
        """``(memory the leanest assignment needs, index)`` of the candidates that can be the
        leanest, leanest first: every candidate with one stage per rank (exact and cheap,
        :func:`uniap.bounds.min_peak_memory`); of the interleaved ones, where a rank's memory
        sums its stages and a program gives it (:func:`uniap.milp.min_peak_memory`), per
        ``(pp, v)`` the one with c = 1 and the one with the largest c (memory falls with more
        micro-batches, fewer activations in flight, except that FSDP keeps parameters unsharded
        when c > 1)."""
        out: list[tuple[float, int]] = []
        lean: dict[tuple[int, int, bool], int] = {}
        for idx, e in enumerate(self.entries):
            if e.tables.virtual_stages == 1:
                out.append((min_peak_memory(e.tables), idx))
                continue
            key = (e.cand.pp, e.cand.virtual_stages, e.cand.num_microbatches == 1)
            if (
                key not in lean
                or e.cand.num_microbatches > self.entries[lean[key]].cand.num_microbatches
            ):
                lean[key] = idx
        out += [
            (
                milp_min_peak_memory(
                    self.entries[idx].tables, time_limit_s=min(time_limit_s, 10.0)
                ),
                idx,
            )
            for idx in lean.values()
        ]
        return sorted(out)

    def last_resort(self, time_limit_s: float, threads: int, seed: int) -> None:
        """Before saying that no plan fits: the leanest candidate, and any other whose leanest
        assignment fits, is solved after all when a bound settled it, so that a bound is never
        the only reason for an :class:`InfeasibleError` and the error never says that a plan
        needs less memory than the limit. The bounds are valid, so this finds nothing unless
        one of them is wrong (then it warns)."""
        self.lean = self.leanest(time_limit_s)
        for rank, (need, idx) in enumerate(self.lean):
            e = self.entries[idx]
            if rank and need > e.tables.memory_limit_bytes * (1 + 1e-9):
                break
            if e.solution is not None and e.solution.status != "pruned":
                continue  # the program itself said so
            sol = self._solve(e, time_limit_s, threads, seed, cutoff=False)
            if sol.stage_of:
                log.warning(
                    "pp=%d c=%d was pruned as infeasible by a bound but has a plan: please report "
                    "this",
                    e.cand.pp,
                    e.cand.num_microbatches,
                )
                return

    def raise_infeasible(self, cm: CostModel, cluster: Cluster, memory_fraction: float) -> None:
        """:class:`InfeasibleError` with the memory the leanest plan needs and every candidate
        tried."""
        need = self.lean[0][0]
        limit = cm.memory_limit_bytes
        tried = [e.cand for e in self.entries]
        shown = "; ".join(
            f"pp={c.pp} c={c.num_microbatches} {c.schedule}: {c.reason or c.status}"
            for c in tried[:4]
        )
        more = f"; and {len(tried) - 4} more (InfeasibleError.candidates)" if len(tried) > 4 else ""
        if need <= limit * (1 + 1e-9) and any(e.tables.uses_host_memory for e in self.entries):
            raise InfeasibleError(
                "no plan fits in host memory: plans that fit the devices offload more state "
                f"than the {fmt_bytes(cm.host_limit_bytes)} of host memory a node may hold "
                f"({memory_fraction:.0%} of its {fmt_bytes(cluster.host_memory_bytes)}); use "
                "more devices or nodes, a "
                "smaller global batch or sequence length, or a cluster with more host memory. "
                f"Tried {len(tried)} candidates: {shown}{more}",
                min_memory_bytes=need,
                candidates=[c.row() for c in tried],
            )
        raise InfeasibleError(
            f"no plan fits in device memory: the leanest plan needs {fmt_bytes(need)} per device, "
            f"the usable limit is {fmt_bytes(limit)} ({memory_fraction:.0%} of "
            f"{fmt_bytes(cluster.device_memory_bytes)}); use more devices, a smaller global batch "
            "or sequence length, or a cluster with more memory"
            + (
                ""
                if cluster.offload_enabled
                else " (or a host section in the cluster YAML, to plan with CPU offload)"
            )
            + f". Tried {len(tried)} candidates: "
            f"{shown}{more}",
            min_memory_bytes=need,
            candidates=[c.row() for c in tried],
        )


def explain_entries(entries: list[Entry]) -> list:
    """Per candidate: its row, tables and best known assignment (the solver's, else the
    heuristic's). A (pp, schedule) with none at all (pruned by its bound before any heuristic
    ran) gets a heuristic plan on its lowest-bound candidate, so each one tried has a plan to
    show."""
    rows = [
        (
            e.cand.row(),
            e.tables,
            (e.solution.stage_of, e.solution.strategy_of)
            if e.solution is not None and e.solution.stage_of
            else e.start,
        )
        for e in entries
    ]
    for key in {(e.cand.pp, e.cand.schedule) for e in entries}:
        group = [i for i, e in enumerate(entries) if (e.cand.pp, e.cand.schedule) == key]
        if all(rows[i][2] is None for i in group):
            i = min(group, key=lambda j: entries[j].cand.lower_bound_s)
            if math.isfinite(entries[i].cand.lower_bound_s):
                rows[i] = (rows[i][0], rows[i][1], heuristic(entries[i].tables))
    return rows
