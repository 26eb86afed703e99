"""The Unified Optimization Process: search every (pp, c, schedule), solve each exactly, keep
the best, and return it as a :class:`uniap.plan.Plan`.

For ``pp`` in the divisors of the device count (at most the number of layers) and ``c`` in the
divisors of the global batch (every layer must have a strategy whose dp splits the micro-batch):

1. build the cost tables (:class:`uniap.cost_model.CostModel`);
2. a lower bound ``LB = S + (c - 1) T + Gmin / pp`` with ``S = sum_u min_k A[u,k]``,
   ``Gmin = sum_u min_k G[u,k]`` and ``T`` the min-max contiguous split of the fastest layer
   times under memory (:func:`uniap.milp.bottleneck_lower_bound`; every stage time is at
   least its compute, so the bottleneck is at least ``T``);
3. a heuristic assignment per candidate that may still win (:func:`uniap.search.heuristic`);
   the best of them is the first incumbent;
4. the segment bound of each candidate (:func:`uniap.milp.segment_lower_bound`: contiguous
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
so the result is the optimum over all candidates (tests check it against exhaustive search).

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

from uniap.cluster import Cluster
from uniap.cost_model import CostModel, CostTables, evaluate_assignment
from uniap.errors import ConfigError, InfeasibleError
from uniap.graph import ModelGraph
from uniap.milp import (
    SegmentBound,
    Solution,
    _minima,
    bottleneck_lower_bound,
    min_peak_memory,
    solve,
)
from uniap.plan import SCHEDULES, LayerStrategy, Plan, Stage, _fmt_bytes
from uniap.profiler import Profile
from uniap.search import heuristic
from uniap.strategies import divisors

__all__ = ["plan", "plan_graph", "Candidate"]

_QUICK_SOLVE_S = 2.0
"""First-pass time limit per candidate (see :func:`plan_graph`)."""

_FIRST_SOLVE_FACTOR = 4.0
"""The first program solved gets this many times the first-pass time limit."""

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
    """The incumbent the strong bound was last refined against (it refines again for a lower one)."""

    def row(self) -> dict:
        tpi = self.time_per_iteration_s
        return {
            "pp": self.pp, "c": self.num_microbatches, "schedule": self.schedule,
            "status": self.status, "lower_bound_s": float(self.lower_bound_s),
            "time_per_iteration_s": float(tpi) if math.isfinite(tpi) else None,
            "wall_s": round(self.wall_s, 4),
        }


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
    progress: Callable[[str], None] | None = None,
) -> Plan:
    """The optimal plan for a layer chain on a cluster (see the module docstring)."""
    t_start = time.perf_counter()
    N, L, B = cluster.world_size, graph.num_layers, global_batch_size
    if not isinstance(B, int) or isinstance(B, bool) or B < 1:
        raise ConfigError(f"global_batch_size must be a positive integer, got {B!r}")
    if not (isinstance(time_limit_s, int | float) and math.isfinite(time_limit_s) and time_limit_s > 0):
        raise ConfigError(f"time_limit_s must be a positive number of seconds, got {time_limit_s!r}")
    if schedules is not None:
        bad = [s for s in schedules if s not in SCHEDULES]
        if bad:
            raise ConfigError(f"unknown schedule(s) {bad}; choose from {list(SCHEDULES)}")
    _log_tp_exclusions(graph)
    cm = CostModel(graph, cluster, profile, memory_fraction=memory_fraction, max_tp=max_tp, recompute=recompute)
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
    cs = divisors(B) if num_microbatches is None else sorted(num_microbatches)
    cands: list[tuple[Candidate, CostTables]] = []
    for pp in pps:
        for c in cs:
            if B % c:
                raise ConfigError(f"num_microbatches {c} must divide global_batch_size {B}; try one of {divisors(B)}")
            scheds = ["1F1B"] if pp == 1 else list(schedules or ["1F1B"])
            for sched in scheds:
                try:
                    t = cm.tables(pp, c, B, sched)
                except ConfigError:
                    continue  # some layer has no strategy for this micro-batch size
                cands.append((Candidate(pp, c, sched, _lower_bound(t)), t))
    if not cands:
        raise InfeasibleError(
            f"no (pipeline degree, micro-batch count) gives every layer a strategy for global batch "
            f"{B} on {N} devices; use a global batch divisible by more data-parallel degrees "
            f"(e.g. a multiple of {N})",
        )
    # Heuristic plans for every candidate first: the best of them is a global incumbent that
    # cuts off every program that cannot beat it.
    heur = {}
    segments: dict[int, SegmentBound] = {}
    best_tpi, owner = math.inf, None
    for cand, t in sorted(cands, key=lambda ct: ct[0].lower_bound_s):
        if cand.lower_bound_s >= best_tpi:
            heur[id(t)] = (None, math.inf)  # cannot win: it will be pruned
            continue
        inc = heuristic(t)
        tpi = evaluate_assignment(t, *inc).time_per_iteration_s if inc is not None else math.inf
        heur[id(t)] = (inc, tpi)
        if tpi < best_tpi:
            best_tpi, owner = tpi, id(t)
    # The strong bound against that incumbent (candidates that cannot beat it are settled
    # here), and candidates are visited best bound first: the one that holds the optimum
    # usually comes first, and its plan then cuts off or prunes the others.
    for cand, t in cands:
        _strengthen(cand, t, best_tpi, segments)
    # Local search from the best starts of the candidates that may still win (best bound first,
    # each new incumbent refining the others' bounds); then they are visited best plan first.
    for cand, t in sorted(cands, key=lambda ct: ct[0].lower_bound_s):
        if _strengthen(cand, t, best_tpi, segments) >= best_tpi * (1 - 1e-12):
            continue
        inc = heuristic(t, starts=_IMPROVE_STARTS)
        tpi = evaluate_assignment(t, *inc).time_per_iteration_s if inc is not None else math.inf
        if tpi < heur[id(t)][1]:
            heur[id(t)] = (inc, tpi)
        if tpi < best_tpi:
            best_tpi, owner = tpi, id(t)
    cands.sort(key=lambda ct: (heur[id(ct[1])][1], ct[0].lower_bound_s, ct[0].pp, ct[0].num_microbatches))
    best: tuple[Solution, CostTables] | None = None
    final: dict[int, Solution] = {}
    num_solves = 0
    # Two passes. First every candidate gets a short solve: most finish (optimal, or cut off by
    # the incumbent); the hard ones stop early, but the easy ones have meanwhile lowered the
    # incumbent. Then the unfinished ones are solved to the end against that better bound,
    # which usually cuts them off quickly. The first program solved (the best incumbent, most
    # often the optimum's) gets a longer first try: a restart would repeat its work.
    quick_s = min(time_limit_s, _QUICK_SOLVE_S)
    first_s = min(time_limit_s, _FIRST_SOLVE_FACTOR * quick_s)
    used: dict[int, float] = {}
    for pass_no, limit in ((1, quick_s), (2, time_limit_s)):
        for idx, (cand, t) in enumerate(cands):
            if pass_no == 2 and (idx not in final or final[idx].status != "time_limit" or used[idx] >= limit):
                continue
            # Prune by the bound, against the best plan so far (or the heuristic incumbent,
            # except on the candidate that holds it: its own program must produce the plan).
            if (best is not None or id(t) != owner) and _strengthen(cand, t, best_tpi, segments) >= best_tpi * (1 - 1e-12):
                cand.status = "pruned"
                if idx in final:  # a first-pass time-out that the bound now settles
                    final[idx] = dataclasses.replace(final[idx], status="pruned")
                continue
            inc = heur[id(t)][0]
            if idx in final and final[idx].stage_of:
                inc = (final[idx].stage_of, final[idx].strategy_of)
            lim = first_s if pass_no == 1 and not used else limit
            used[idx] = lim
            sol = solve(t, incumbent=inc, incumbent_tpi_s=best_tpi if math.isfinite(best_tpi) else None,
                        time_limit_s=lim, threads=threads, seed=seed, segments=segments.get(id(t)))
            final[idx] = sol
            num_solves += 1
            cand.status = sol.status
            cand.wall_s += sol.wall_s
            cand.time_per_iteration_s = sol.time_per_iteration_s
            if sol.stage_of and (best is None or sol.time_per_iteration_s < best[0].time_per_iteration_s):
                best = (sol, t)
                best_tpi = min(best_tpi, sol.time_per_iteration_s)
            if progress is not None:
                tpi = f"{sol.time_per_iteration_s:.4g} s" if math.isfinite(sol.time_per_iteration_s) else "-"
                progress(f"[{idx + 1}/{len(cands)}] pp={cand.pp} c={cand.num_microbatches} {cand.schedule}: "
                         f"{sol.status} {tpi} ({sol.wall_s:.2f} s)" + (" (second pass)" if pass_no == 2 else ""))
    statuses = list(final.values())
    if best is None:
        # Memory falls with more micro-batches (fewer activations) except that FSDP keeps
        # parameters unsharded when c > 1: the leanest plan has c = 1 or the largest c.
        lean = {}
        for cand, t in cands:
            key = (cand.pp, cand.num_microbatches == 1)
            if key not in lean or cand.num_microbatches > lean[key][0].num_microbatches:
                lean[key] = (cand, t)
        need = min(min_peak_memory(t, time_limit_s=min(time_limit_s, 10.0)) for _, t in lean.values())
        limit = cm.memory_limit_bytes
        raise InfeasibleError(
            f"no plan fits in device memory: the leanest plan needs {_fmt_bytes(need)} per device, "
            f"the usable limit is {_fmt_bytes(limit)} ({memory_fraction:.0%} of "
            f"{_fmt_bytes(cluster.device_memory_bytes)}); use more devices, a smaller global batch "
            f"or sequence length, or a cluster with more memory",
            min_memory_bytes=need,
        )
    sol, t = best
    wall = time.perf_counter() - t_start
    timed_out = [s for s in statuses if s.status == "time_limit"]
    for s in timed_out:
        log.warning("a program stopped at its %.3g s time limit with gap %.3g: the plan may not be optimal; "
                    "raise time_limit_s to prove it", time_limit_s, s.gap)
    status = "optimal" if not timed_out else "time_limit"
    gap = max((s.gap for s in timed_out), default=0.0)
    out = _to_plan(graph, cluster, cm, t, sol, B)
    out.solver = {
        "status": status, "gap": float(gap), "wall_s": round(wall, 4),
        "milps_solved": num_solves, "candidates": [c.row() for c, _ in cands],
    }
    log.info("plan: %s (%s, %d programs, %.2f s)", out.summary(), status, num_solves, wall)
    return out


def plan(
    model,
    cluster: Cluster | str,
    *,
    global_batch_size: int,
    example_inputs=None,
    seq_len: int | None = None,
    dtype: str | None = None,
    **kwargs,
) -> Plan:
    """The optimal plan for ``model`` (an ``nn.Module``, on any device, or a preset name from
    :mod:`uniap.models`; ``seq_len`` overrides a text preset's sequence length) on ``cluster``
    (a :class:`Cluster`, preset name or YAML path). Keyword arguments go to :func:`plan_graph`."""
    from uniap.cluster import load_cluster
    from uniap.graph import build_graph

    if isinstance(cluster, str):
        cluster = load_cluster(cluster)
    if isinstance(dtype, str):
        import torch

        if dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
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
        inputs = example_inputs if example_inputs is not None else models.example_batch(m, 2, device="meta")[0]
        graph = build_graph(m, inputs, name=model, dtype=dtype)
    else:
        if example_inputs is None:
            raise ConfigError("example_inputs is required to plan an nn.Module (a batch of inputs of the real shape)")
        if seq_len is not None:
            raise ConfigError("seq_len applies to model presets; for an nn.Module pass example_inputs of that length")
        graph = build_graph(model, example_inputs, dtype=dtype)
    return plan_graph(graph, cluster, global_batch_size=global_batch_size, **kwargs)


# ---------------------------------------------------------------------- helpers
def _lower_bound(t: CostTables) -> float:
    amin, gmin, _ = _minima(t)
    s = float(amin.sum())
    k = t.stage_overhead_s  # every stage pays it, the bottleneck one too
    split = bottleneck_lower_bound(t)
    if not math.isfinite(split):
        return math.inf  # no split of the chain fits in memory
    bottleneck = max(s / t.pp, split) + k
    return s + t.pp * k + (t.num_microbatches - 1) * bottleneck + float(gmin.sum()) / t.pp + t.step_overhead_s


def _strengthen(cand: Candidate, t: CostTables, target: float, segments: dict[int, SegmentBound]) -> float:
    """Raise the candidate's lower bound with :func:`uniap.milp.segment_lower_bound`, refined
    towards ``target`` (the incumbent), when the cheap bound does not already reach it."""
    if cand.lower_bound_s < target * (1 - 1e-12) and math.isfinite(target) and target < cand.bound_target_s:
        seg = segments.setdefault(id(t), SegmentBound(t))
        cand.lower_bound_s = max(cand.lower_bound_s, seg.lower_bound(target))
        cand.bound_target_s = target
    return cand.lower_bound_s


def _log_tp_exclusions(graph: ModelGraph) -> None:
    seen = set()
    for layer in graph.layers:
        r = layer.tp_excluded_reason
        if r and r not in seen:
            seen.add(r)
            log.info("tensor parallelism excluded for %s (and alike): %s", layer.fqn, r)


def _to_plan(graph: ModelGraph, cluster: Cluster, cm: CostModel, t: CostTables, sol: Solution, B: int) -> Plan:
    import torch

    from uniap import __version__

    N, pp = cluster.world_size, t.pp
    g = N // pp
    ev = evaluate_assignment(t, sol.stage_of, sol.strategy_of)
    stages = []
    for i in range(pp):
        layers = tuple(
            LayerStrategy(graph.layers[u].fqn, t.strategies[k].dp, t.strategies[k].tp, t.strategies[k].kind,
                          t.strategies[k].recompute)
            for u, (si, k) in enumerate(zip(sol.stage_of, sol.strategy_of)) if si == i
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
        predicted={
            "time_per_iteration_s": float(tpi),
            "samples_per_s": float(B / tpi),
            "peak_memory_bytes": [float(m) for m in ev.peak_memory_bytes],
            "stage_time_s": [float(x) for x in ev.stage_time_s],
            "memory_limit_bytes": float(t.memory_limit_bytes),
        },
        provenance={
            "uniap": __version__, "torch": torch.__version__.split("+")[0], "highspy": highs_version,
            "cluster": cluster.name, "profile": cm.profile.source,
        },
    )
