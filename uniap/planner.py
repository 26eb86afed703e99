"""The Unified Optimization Process: search every (pp, c, schedule), solve each exactly, keep
the best, and return it as a :class:`uniap.contract.Plan`.

For ``pp`` in the divisors of the device count (at most the number of layers) and ``c`` in the
divisors of the global batch (every layer must have a strategy whose dp splits the micro-batch):

1. build the cost tables (:class:`uniap.cost_model.CostModel`);
2. a lower bound ``LB = S + (c - 1) T + Gmin / pp`` with ``S = sum_u min_k A[u,k]``,
   ``Gmin = sum_u min_k G[u,k]`` and ``T`` the min-max contiguous split of the fastest layer
   times under memory (:func:`uniap.bounds.bottleneck_lower_bound`; every stage time is at
   least its compute, so the bottleneck is at least ``T``);
3. a heuristic assignment per candidate that may still win (:func:`uniap.search.heuristic`);
   the best of them is the first incumbent;
4. the segment bound of each candidate (:func:`uniap.bounds.segment_lower_bound`: contiguous
   stages, each with its own compute, synchronisation, memory and outgoing edge, refined
   towards the incumbent); a candidate whose bound reaches the best time found is skipped
   (it cannot win); the others get a better heuristic assignment (local search, stages
   re-planned within memory), in increasing bound, each new incumbent refining the others'
   bounds; they are visited in increasing heuristic time;
5. each MILP is warm-started with its heuristic assignment, and the best time so far cuts off
   everything that cannot beat it (:func:`uniap.milp.solve`, which also narrows each layer's
   stages to the runs the segment bound allows below that time); a first pass gives every
   candidate a short time limit (the first one solved four times as long), and a second
   pass finishes the ones that stopped early, against the (by then usually much better)
   incumbent.

Every skip and every cut only removes assignments that cannot beat a plan already in hand,
so the result is the optimum over all candidates (tests check it against exhaustive search,
and :mod:`uniap.exactness` at every memory limit where the optimum changes). A bound that says
a candidate cannot fit at all is never the only reason for :class:`InfeasibleError`: before
raising, the leanest candidate (and any whose leanest assignment fits) is solved after all,
and the error lists every candidate with the reason it gave no plan.

Schedules: with ``pp = 1`` there is no pipeline (one micro-batch in flight: gradient
accumulation). With ``pp > 1`` 1F1B has GPipe's time and never more memory, so GPipe is solved
only when asked for.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from uniap.bounds import SegmentBound, candidate_lower_bound
from uniap.cluster import Cluster
from uniap.contract import SCHEDULES, LayerStrategy, Plan, Stage, _fmt_bytes
from uniap.cost_model import CostModel, CostTables, evaluate_assignment
from uniap.errors import ConfigError, InfeasibleError
from uniap.explain import explain_candidates
from uniap.graph import ModelGraph
from uniap.milp import Solution, min_peak_memory, solve
from uniap.precision import Precision, default_precision, precision_for_dtype, resolve_precision
from uniap.profiles import Profile
from uniap.progress import progress_lines, solve_progress
from uniap.report import fmt_seconds, predicted_breakdown
from uniap.search import heuristic
from uniap.strategies import divisors

__all__ = ["plan", "plan_graph", "Candidate", "candidate_tables"]

_QUICK_SOLVE_S = 2.0
"""First-pass time limit per candidate (see :func:`plan_graph`)."""

_FIRST_SOLVE_FACTOR = 4.0
"""The first program solved gets this many times the first-pass time limit."""

_NO_SPLIT_FITS = "even with every layer's leanest strategy, nothing fits in memory (lower bound)"

_IMPROVE_STARTS = 4
"""Heuristic starts that local search improves on each candidate that may win."""

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One (pp, c, schedule) of the search and what became of it."""

    pp: int
    num_microbatches: int
    schedule: str
    lower_bound_s: float
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
            "status": self.status,
            "lower_bound_s": float(self.lower_bound_s),
            "time_per_iteration_s": float(tpi) if math.isfinite(tpi) else None,
            "wall_s": round(self.wall_s, 4),
            "reason": self.reason,
        }


@dataclass(eq=False)
class _Entry:
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

    def strengthen(self, target: float) -> float:
        """Raise the candidate's lower bound with the segment bound refined towards ``target``
        (the incumbent), when the cheap bound does not already reach it; the bound."""
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
        return cand.lower_bound_s

    def settled(self, target: float) -> bool:
        """The bound shows that this candidate cannot beat ``target``."""
        return self.strengthen(target) >= target * (1 - 1e-12)


@dataclass
class _Search:
    """The state of the Unified Optimization Process (see the module docstring, steps 3-5)."""

    entries: list[_Entry]
    best_tpi_s: float = math.inf
    """The best time in hand (a heuristic assignment's or a program's)."""
    owner: _Entry | None = None
    """The candidate whose heuristic assignment holds ``best_tpi_s`` before any program ran."""
    best: _Entry | None = None
    """The candidate whose program gave the best plan so far."""
    num_solves: int = 0

    def _offer(self, e: _Entry, inc: tuple[list[int], list[int]] | None) -> None:
        tpi = (
            evaluate_assignment(e.tables, *inc).time_per_iteration_s
            if inc is not None
            else math.inf
        )
        if e.start is None or tpi < e.start_tpi_s:
            e.start, e.start_tpi_s = inc, tpi
        if tpi < self.best_tpi_s:
            self.best_tpi_s, self.owner = tpi, e

    def by_bound(self) -> list[_Entry]:
        return sorted(self.entries, key=lambda e: e.cand.lower_bound_s)

    def first_incumbents(self) -> None:
        """Step 3: a heuristic assignment per candidate that may still win (best bound first);
        the best of them is a global incumbent that cuts off every program that cannot beat it.
        Then the strong bound against it settles the candidates that cannot beat it."""
        for e in self.by_bound():
            if e.cand.lower_bound_s < self.best_tpi_s:
                self._offer(e, heuristic(e.tables))
        for e in self.entries:
            e.strengthen(self.best_tpi_s)

    def improve_incumbents(self) -> None:
        """Step 4: local search from the best starts of the candidates that may still win (best
        bound first, each new incumbent refining the others' bounds); then they are visited best
        plan first: the one that holds the optimum usually comes first, and its plan then cuts
        off or prunes the others."""
        for e in self.by_bound():
            if not e.settled(self.best_tpi_s):
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
    ) -> None:
        """Step 5, in two passes. First every candidate gets a short solve: most finish (optimal,
        or cut off by the incumbent); the hard ones stop early, but the easy ones have meanwhile
        lowered the incumbent. Then the unfinished ones are solved to the end against that
        better bound, which usually cuts them off quickly. The first program solved (the best
        incumbent, most often the optimum's) gets a longer first try: a restart would repeat
        its work."""
        quick_s = min(time_limit_s, _QUICK_SOLVE_S)
        first_s = min(time_limit_s, _FIRST_SOLVE_FACTOR * quick_s)
        for pass_no, limit in ((1, quick_s), (2, time_limit_s)):
            for idx, e in enumerate(self.entries):
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
                lim = first_s if pass_no == 1 and not self.num_solves else limit
                label = (
                    f"[{idx + 1}/{len(self.entries)}] pp={e.cand.pp} "
                    f"c={e.cand.num_microbatches} {e.cand.schedule}"
                )
                watch = solve_progress(say, label, self.best_tpi_s) if say is not None else None
                sol = self._solve(
                    e, lim, threads, seed, progress=watch, progress_interval_s=progress_interval_s
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

    def _prune(self, e: _Entry) -> None:
        cand = e.cand
        cand.status = "pruned"
        cand.reason = (
            _NO_SPLIT_FITS
            if not math.isfinite(cand.lower_bound_s)
            else f"its lower bound {cand.lower_bound_s:.6g} s cannot beat {self.best_tpi_s:.6g} s"
        )
        if e.solution is not None:  # a first-pass time-out that the bound now settles
            e.solution = dataclasses.replace(e.solution, status="pruned")

    def _solve(
        self,
        e: _Entry,
        limit_s: float,
        threads: int,
        seed: int,
        *,
        cutoff: bool = True,
        progress: Callable | None = None,
        progress_interval_s: float = 5.0,
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
            progress=progress,
            progress_interval_s=progress_interval_s,
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
        leanest, leanest first. Memory falls with more micro-batches (fewer activations in
        flight) except that FSDP keeps parameters unsharded when c > 1, and 1F1B never keeps
        more than GPipe: per pipeline degree the leanest plan has c = 1 or the largest c."""
        lean: dict[tuple[int, bool], int] = {}
        for idx, e in enumerate(self.entries):
            key = (e.cand.pp, e.cand.num_microbatches == 1)
            if (
                key not in lean
                or e.cand.num_microbatches > self.entries[lean[key]].cand.num_microbatches
            ):
                lean[key] = idx
        return sorted(
            (min_peak_memory(self.entries[idx].tables, time_limit_s=min(time_limit_s, 10.0)), idx)
            for idx in lean.values()
        )

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
        raise InfeasibleError(
            f"no plan fits in device memory: the leanest plan needs {_fmt_bytes(need)} per device, "
            f"the usable limit is {_fmt_bytes(limit)} ({memory_fraction:.0%} of "
            f"{_fmt_bytes(cluster.device_memory_bytes)}); use more devices, a smaller global batch "
            f"or sequence length, or a cluster with more memory. Tried {len(tried)} candidates: "
            f"{shown}{more}",
            min_memory_bytes=need,
            candidates=[c.row() for c in tried],
        )


def plan_graph(
    graph: ModelGraph,
    cluster: Cluster,
    *,
    global_batch_size: int,
    profile: Profile | None = None,
    schedules: Sequence[str] | None = None,
    pp_degrees: Sequence[int] | None = None,
    num_microbatches: Sequence[int] | None = None,
    memory_fraction: float = 0.9,
    max_tp: int | None = None,
    recompute: bool = True,
    time_limit_s: float = 60.0,
    threads: int = 1,
    seed: int = 0,
    progress: Callable[[str], None] | bool | None = None,
    progress_interval_s: float = 5.0,
    precision: Precision | str | None = None,
) -> Plan:
    """The optimal plan for a layer chain on a cluster (see the module docstring).

    Progress lines (each program solved; during a solve, every ``progress_interval_s``, the
    candidate, incumbent, bound and gap) go to the ``uniap.progress`` logger at INFO;
    ``progress=True`` shows them on stderr when logging is not configured, a callable
    receives each line as well. ``precision``: recorded in the plan and charged by the cost
    model (default: from the graph's dtype, :func:`uniap.precision.precision_for_dtype`)."""
    with progress_lines(progress) as say:
        return _plan_graph(
            graph,
            cluster,
            global_batch_size=global_batch_size,
            profile=profile,
            schedules=schedules,
            pp_degrees=pp_degrees,
            num_microbatches=num_microbatches,
            memory_fraction=memory_fraction,
            max_tp=max_tp,
            recompute=recompute,
            time_limit_s=time_limit_s,
            threads=threads,
            seed=seed,
            say=say,
            progress_interval_s=progress_interval_s,
            precision=precision,
        )


def _plan_graph(
    graph,
    cluster,
    *,
    global_batch_size,
    profile,
    schedules,
    pp_degrees,
    num_microbatches,
    memory_fraction,
    max_tp,
    recompute,
    time_limit_s,
    threads,
    seed,
    say,
    progress_interval_s,
    precision,
) -> Plan:
    t_start = time.perf_counter()
    N, L, B = cluster.world_size, graph.num_layers, global_batch_size
    if not isinstance(B, int) or isinstance(B, bool) or B < 1:
        raise ConfigError(f"global_batch_size must be a positive integer, got {B!r}")
    if not (
        isinstance(time_limit_s, int | float) and math.isfinite(time_limit_s) and time_limit_s > 0
    ):
        raise ConfigError(
            f"time_limit_s must be a positive number of seconds, got {time_limit_s!r}"
        )
    if schedules is not None:
        bad = [s for s in schedules if s not in SCHEDULES]
        if bad:
            raise ConfigError(f"unknown schedule(s) {bad}; choose from {list(SCHEDULES)}")
    _log_tp_exclusions(graph)
    precision = (
        resolve_precision(precision) if precision is not None else precision_for_dtype(graph.dtype)
    )
    cm = CostModel(
        graph,
        cluster,
        profile,
        memory_fraction=memory_fraction,
        max_tp=max_tp,
        recompute=recompute,
        precision=precision,
    )
    pps = [p for p in divisors(N) if p <= L]
    if not graph.extra.get("pipeline_splittable", True):
        # the executor runs this model's own forward, at pp = 1 only (see uniap.executor)
        if pp_degrees is not None and any(p > 1 for p in pp_degrees):
            raise ConfigError(
                f"{graph.name} is not a declared layer chain (nn.Sequential or "
                "uniap_layer_fqns()), so it cannot be split into pipeline stages; plan with "
                "pp_degrees=[1], or define uniap_layer_fqns() if running its layers one after "
                "the other is its forward"
            )
        pps = [1]
    if pp_degrees is not None:
        bad = [p for p in pp_degrees if p not in pps]
        if bad:
            raise ConfigError(
                f"pipeline degree(s) {bad} must divide the number of devices ({N}) and be at most "
                f"the number of layers ({L}); try pp in {pps}"
            )
        pps = sorted(pp_degrees)
    # ---------------------------------------------------------------- the search, in phases
    search = _Search(
        [
            _Entry(Candidate(pp, c, sched, candidate_lower_bound(t)), t)
            for pp, c, sched, t in candidate_tables(cm, pps, B, num_microbatches, schedules)
        ]
    )
    if not search.entries:
        raise InfeasibleError(
            "no (pipeline degree, micro-batch count) gives every layer a strategy for global "
            f"batch {B} on {N} devices; use a global batch divisible by more data-parallel degrees "
            f"(e.g. a multiple of {N})",
        )
    if say is not None:
        cands = [e.cand for e in search.entries]
        say(
            f"searching {len(cands)} candidates (pp in {sorted({c.pp for c in cands})}, "
            f"micro-batches in {sorted({c.num_microbatches for c in cands})}): heuristic plans and "
            "bounds first"
        )
    search.first_incumbents()
    search.improve_incumbents()
    search.solve_all(time_limit_s, threads, seed, say, progress_interval_s)
    if search.best is None:
        search.last_resort(time_limit_s, threads, seed)
    if search.best is None:
        search.raise_infeasible(cm, cluster, memory_fraction)
    best = search.best
    wall = time.perf_counter() - t_start
    timed_out = [
        e.solution
        for e in search.entries
        if e.solution is not None and e.solution.status == "time_limit"
    ]
    for s in timed_out:
        log.warning(
            "a program stopped at its %.3g s time limit with gap %.3g: the plan may not be "
            "optimal; raise time_limit_s to prove it",
            time_limit_s,
            s.gap,
        )
    status = "optimal" if not timed_out else "time_limit"
    gap = max((s.gap for s in timed_out), default=0.0)
    out = _to_plan(graph, cluster, cm, best.tables, best.solution, B)
    out = dataclasses.replace(
        out,
        solver={
            "status": status,
            "gap": float(gap),
            "wall_s": round(wall, 4),
            "milps_solved": search.num_solves,
            "candidates": [e.cand.row() for e in search.entries],
            # the best plan at every (pp, schedule): the solver's assignment, else the heuristic's
            "best_per_pp": explain_candidates(_explain_entries(search.entries), cluster),
        },
    )
    log.info("plan: %s (%s, %d programs, %.2f s)", out.summary(), status, search.num_solves, wall)
    return out


def plan(
    model,
    cluster: Cluster | str,
    *,
    global_batch_size: int,
    example_inputs=None,
    seq_len: int | None = None,
    dtype: str | None = None,
    precision: Precision | str | None = None,
    **kwargs,
) -> Plan:
    """The optimal plan for ``model`` (an ``nn.Module``, on any device, or a preset name from
    :mod:`uniap.models`; ``seq_len`` overrides a text preset's sequence length) on ``cluster``
    (a :class:`Cluster`, preset name or YAML path). Keyword arguments go to :func:`plan_graph`.

    ``precision``: ``"bf16-mixed"``, ``"fp16-mixed"``, ``"fp32"`` or a
    :class:`~uniap.precision.Precision`; the graph is built in its ``param_dtype``. Default:
    from ``dtype`` when given (float32 -> fp32, bfloat16 -> bf16-mixed), else
    ``bf16-mixed`` on a CUDA cluster and ``fp32`` on a CPU one (for a :class:`ModelGraph`:
    from its dtype)."""
    from uniap.cluster import load_cluster
    from uniap.graph import build_graph

    if isinstance(cluster, str):
        cluster = load_cluster(cluster)
    if isinstance(dtype, str) and dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")
    if precision is not None:
        precision = resolve_precision(precision)
        if dtype is not None and str(dtype).removeprefix("torch.") != precision.param_dtype:
            raise ConfigError(
                f"dtype {dtype} contradicts precision {precision.name} (compute in "
                f"{precision.param_dtype}); pass one of them"
            )
    elif isinstance(model, ModelGraph):
        precision = precision_for_dtype(model.dtype)
    elif dtype is not None:
        precision = precision_for_dtype(dtype)
    else:
        precision = default_precision(cluster)
    import torch

    dtype = getattr(torch, precision.param_dtype)
    if isinstance(model, ModelGraph):
        graph = model
    elif isinstance(model, str):
        from uniap import models

        overrides = {}
        if seq_len is not None:
            if not hasattr(models.model_config(model), "seq_len"):
                raise ConfigError(f"model {model!r} has no sequence length; omit seq_len")
            overrides["seq_len"] = seq_len
        m = models.build_model(model, device="meta", **overrides)
        inputs = (
            example_inputs
            if example_inputs is not None
            else models.example_batch(m, 2, device="meta")[0]
        )
        graph = build_graph(m, inputs, name=model, dtype=dtype)
    else:
        if example_inputs is None:
            raise ConfigError(
                "example_inputs is required to plan an nn.Module (a batch of inputs of the real "
                "shape)"
            )
        if seq_len is not None:
            raise ConfigError(
                "seq_len applies to model presets; for an nn.Module pass example_inputs of that "
                "length"
            )
        graph = build_graph(model, example_inputs, dtype=dtype)
    return plan_graph(
        graph, cluster, global_batch_size=global_batch_size, precision=precision, **kwargs
    )


# ---------------------------------------------------------------------- helpers
def candidate_tables(
    cm: CostModel,
    pp_degrees: Sequence[int],
    global_batch_size: int,
    num_microbatches: Sequence[int] | None = None,
    schedules: Sequence[str] | None = None,
) -> list[tuple[int, int, str, CostTables]]:
    """Every ``(pp, c, schedule, tables)`` the planner considers: ``c`` among the divisors of
    the global batch (or the ones given), 1F1B (and the other schedules asked for) when
    ``pp > 1``, and only ``c`` for which every layer has a strategy."""
    B = global_batch_size
    cs = divisors(B) if num_microbatches is None else sorted(num_microbatches)
    out = []
    for pp in pp_degrees:
        for c in cs:
            if B % c:
                raise ConfigError(
                    f"num_microbatches {c} must divide global_batch_size {B}; try one of "
                    f"{divisors(B)}"
                )
            for sched in ["1F1B"] if pp == 1 else list(schedules or ["1F1B"]):
                try:
                    t = cm.tables(pp, c, B, sched)
                except ConfigError:
                    continue  # some layer has no strategy for this micro-batch size
                out.append((pp, c, sched, t))
    return out


def _explain_entries(entries: list[_Entry]) -> list:
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


def _log_tp_exclusions(graph: ModelGraph) -> None:
    seen = set()
    for layer in graph.layers:
        r = layer.tp_excluded_reason
        if r and r not in seen:
            seen.add(r)
            log.info("tensor parallelism excluded for %s (and alike): %s", layer.fqn, r)


def _to_plan(
    graph: ModelGraph, cluster: Cluster, cm: CostModel, t: CostTables, sol: Solution, B: int
) -> Plan:
    import torch

    from uniap._version import __version__

    N, pp = cluster.world_size, t.pp
    g = N // pp
    ev = evaluate_assignment(t, sol.stage_of, sol.strategy_of)
    stages = []
    for i in range(pp):
        layers = tuple(
            LayerStrategy(graph.layers[u].fqn, t.strategies[k])
            for u, (si, k) in enumerate(zip(sol.stage_of, sol.strategy_of))
            if si == i
        )
        stages.append(Stage(tuple(range(i * g, (i + 1) * g)), layers))
    from importlib.metadata import PackageNotFoundError, version

    try:
        highs_version = version("highspy")
    except PackageNotFoundError:  # pragma: no cover
        highs_version = "unknown"
    tpi = ev.time_per_iteration_s
    return Plan(
        model_name=graph.name,
        model_signature=graph.signature,
        num_layers=graph.num_layers,
        world_size=N,
        global_batch_size=B,
        num_microbatches=t.num_microbatches,
        schedule=t.schedule,
        stages=tuple(stages),
        precision=cm.precision,
        predicted={
            "time_per_iteration_s": float(tpi),
            "samples_per_s": float(B / tpi),
            "peak_memory_bytes": [float(m) for m in ev.peak_memory_bytes],
            "stage_time_s": [float(x) for x in ev.stage_time_s],
            "memory_limit_bytes": float(t.memory_limit_bytes),
            **predicted_breakdown(t, sol.stage_of, sol.strategy_of),
            # for the training log's MFU: model FLOPs (forward + backward) and the device peak
            "model_flops_per_sample": float(
                sum(x.fwd_flops_per_sample + x.bwd_flops_per_sample for x in graph.layers)
            ),
            "peak_flops_per_s": float(cluster.peak_flops_per_s.get(graph.dtype, 0.0)),
        },
        provenance={
            "uniap": __version__,
            "torch": torch.__version__.split("+")[0],
            "highspy": highs_version,
            "cluster": cluster.name,
            "profile": cm.profile.source,
            "dtype": graph.dtype,
        },
    )
