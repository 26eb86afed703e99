"""The two references of the comparison in the baselines' result record: uniap's planner
(:func:`uniap.planner.plan_graph`) and the exhaustive search (:func:`uniap.search.exhaustive`)
over every ``(pp, c)``."""

from __future__ import annotations

import time

from uniap.cost_model import CostModel
from uniap.planner import plan_graph
from uniap.search import exhaustive

from .common import BaselineResult, candidate_tables

__all__ = ["uniap_search", "exhaustive_search"]


def uniap_search(
    cm: CostModel, global_batch_size: int, *, time_limit_s: float = 60.0
) -> BaselineResult:
    """uniap's plan (its own cost model is built from the same graph, cluster, profile and
    strategy space: ``cm``'s kinds and sequence parallelism)."""
    t0 = time.perf_counter()
    plan = plan_graph(
        cm.graph,
        cm.cluster,
        global_batch_size=global_batch_size,
        profile=cm.profile,
        memory_fraction=cm.memory_limit_bytes / cm.cluster.device_memory_bytes,
        max_tp=cm.max_tp,
        recompute=cm.recompute,
        kinds=cm.kinds,
        sequence_parallel=cm.sequence_parallel,
        time_limit_s=time_limit_s,
    )
    wall = time.perf_counter() - t0
    t = cm.tables(plan.pp_degree, plan.num_microbatches, global_batch_size, plan.schedule)
    stage_of, strategy_of = cm.assignment(plan, t)
    ev = cm.evaluate(plan)
    return BaselineResult(
        "uniap",
        ev.time_per_iteration_s,
        ev.fits,
        wall,
        plan.pp_degree,
        plan.num_microbatches,
        stage_of,
        strategy_of,
        capped=plan.solver.get("status") != "optimal",
        detail=f"{plan.solver.get('milps_solved')} MILPs, {plan.solver.get('status')}",
    )


def exhaustive_search(cm: CostModel, global_batch_size: int) -> BaselineResult:
    """The optimum over every ``(pp, c)``, placement and strategy: tiny instances only."""
    t0 = time.perf_counter()
    best = BaselineResult("exhaustive")
    for t in candidate_tables(cm, global_batch_size):
        tpi, stage_of, strategy_of = exhaustive(t)
        if stage_of and tpi < best.time_per_iteration_s:
            best = BaselineResult(
                "exhaustive", tpi, True, 0.0, t.pp, t.num_microbatches, stage_of, strategy_of
            )
    best.wall_s = time.perf_counter() - t0
    return best
