"""The Unified Optimization Process on CPU without a process group: exact against brute force,
consistent with the cost model, deterministic, and clear when nothing fits."""

from __future__ import annotations

import itertools
import math

import pytest
from _tables import synthetic_graph

from uniap.cluster import load_cluster
from uniap.cost_model import CostModel, evaluate_assignment
from uniap.errors import ConfigError, InfeasibleError
from uniap.graph import Layer, ModelGraph, TPPair
from uniap.milp import solve
from uniap.planner import plan, plan_graph
from uniap.search import compositions, heuristic
from uniap.strategies import divisors


def brute_force_uop(graph: ModelGraph, cluster, batch: int) -> float:
    """Best TPI over every pp, c, placement and strategy, by enumeration."""
    cm = CostModel(graph, cluster)
    best = math.inf
    for pp in [p for p in divisors(cluster.world_size) if p <= graph.num_layers]:
        for c in divisors(batch):
            try:
                t = cm.tables(pp, c, batch)
            except ConfigError:
                continue
            for stage_of in compositions(graph.num_layers, pp):
                for strat in itertools.product(*t.allowed):
                    ev = evaluate_assignment(t, stage_of, list(strat))
                    if ev.fits:
                        best = min(best, ev.time_per_iteration_s)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_uop_equals_brute_force_over_all_pp_and_c(seed: int) -> None:
    """UOP (with bounds and pruning) finds the optimum over all (pp, c) and all plans."""
    graph = synthetic_graph(4, seed)
    cluster = load_cluster("cpu-4")
    batch = 8
    best = brute_force_uop(graph, cluster, batch)
    p = plan_graph(graph, cluster, global_batch_size=batch)
    assert p.predicted["time_per_iteration_s"] == pytest.approx(best, rel=1e-9)
    assert p.solver["status"] == "optimal"


def test_solver_objective_equals_evaluate_on_real_tables() -> None:
    """MILP objective == evaluate_assignment of the returned plan on real cost tables."""
    graph = synthetic_graph(6, 1)
    cm = CostModel(graph, load_cluster("cpu-4"))
    solved = 0
    for pp, c in [(1, 2), (2, 4), (4, 8), (4, 2)]:
        t = cm.tables(pp, c, 8)
        sol = solve(t)
        if sol.status == "infeasible":
            continue
        solved += 1
        assert sol.status == "optimal"
        assert sol.objective_s == pytest.approx(sol.time_per_iteration_s, rel=1e-7)
    assert solved >= 2


def test_infeasible_names_the_memory_needed() -> None:
    """No plan fits: the error says how much memory the leanest plan needs."""
    with pytest.raises(
        InfeasibleError,
        match=r"the leanest plan needs [0-9.]+ GiB per device, the usable limit is 3.60 GiB",
    ) as e:
        plan("llama-7b", "cpu-4", global_batch_size=8)
    assert e.value.min_memory_bytes > 4 * 2**30


def test_search_pauses_the_garbage_collector_and_resumes_it_as_it_was() -> None:
    """plan_graph runs with the cyclic collector paused (a pass over the caller's heap can
    land in any step) and leaves it as it found it: on, also when no plan fits; off."""
    import gc

    from uniap import cost_model

    seen = []
    tables = cost_model.CostModel.tables

    def spy(self, *args, **kwargs):
        seen.append(gc.isenabled())
        return tables(self, *args, **kwargs)

    graph = synthetic_graph(4, 0)
    cluster = load_cluster("cpu-4")
    cost_model.CostModel.tables = spy
    try:
        assert gc.isenabled()
        plan_graph(graph, cluster, global_batch_size=8)
        assert gc.isenabled() and seen and not any(seen)
        with pytest.raises(InfeasibleError):
            plan("llama-7b", "cpu-4", global_batch_size=8)
        assert gc.isenabled()
        gc.disable()
        try:
            plan_graph(graph, cluster, global_batch_size=8)
            assert not gc.isenabled()
        finally:
            gc.enable()
    finally:
        cost_model.CostModel.tables = tables


def test_leanest_memory_is_exact_on_small_instances() -> None:
    """min_memory_bytes equals the brute-force smallest peak over every plan of that (pp, c)."""
    from uniap.bounds import min_peak_memory

    graph = synthetic_graph(5, 3)
    cm = CostModel(graph, load_cluster("cpu-4"))
    t = cm.tables(2, 2, 8)
    brute = min(
        max(evaluate_assignment(t, s, list(k)).peak_memory_bytes)
        for s in compositions(5, 2)
        for k in itertools.product(*t.allowed)
    )
    assert min_peak_memory(t) == pytest.approx(brute, rel=1e-6)


def _big_graph() -> ModelGraph:
    """60 layers of 7 kinds: programs that take more than a millisecond."""
    return ModelGraph(
        "big",
        tuple(
            Layer(
                f"l.{u}",
                "Block",
                10**8 + (u % 7) * 10**7,
                4 * (10**8 + (u % 7) * 10**7),
                1e10 * (1 + u % 5),
                2e10 * (1 + u % 3),
                1e6,
                5e7 * (1 + u % 4),
                (TPPair(("a",), "b", 1e6),),
                (8,),
                "",
                0.5,
                f"k{u % 7}",
            )
            for u in range(60)
        ),
    )


def test_time_limited_solve_reports_gap_not_optimal() -> None:
    """A solve stopped by its time limit is never reported optimal."""
    cm = CostModel(_big_graph(), load_cluster("a100-2x8").with_memory(32 * 2**30))
    t = cm.tables(8, 16, 64)
    inc = heuristic(t)
    sol = solve(t, incumbent=inc, time_limit_s=0.001)
    assert sol.status == "time_limit"
    assert sol.gap > 0 and sol.stage_of
    assert sol.time_per_iteration_s <= evaluate_assignment(t, *inc).time_per_iteration_s
    full = solve(t, incumbent=inc, time_limit_s=60)
    assert full.status == "optimal" and full.gap == 0.0
    assert full.time_per_iteration_s <= sol.time_per_iteration_s
    # the bound a stopped program reports is a lower bound on the optimum; the optimum's is it
    assert sol.bound_s <= full.time_per_iteration_s * (1 + 1e-9)
    assert full.bound_s == full.time_per_iteration_s


def test_bad_arguments() -> None:
    """Bad degrees and batch sizes are refused with the fix."""
    with pytest.raises(
        ConfigError, match=r"pipeline degree\(s\) \[3\] must divide the number of devices \(4\)"
    ):
        plan("gpt-tiny", "cpu-4", global_batch_size=16, pp_degrees=[3])
    with pytest.raises(ConfigError, match=r"global_batch_size must be a positive integer"):
        plan("gpt-tiny", "cpu-4", global_batch_size=0)
    with pytest.raises(ConfigError, match=r"unknown schedule"):
        plan("gpt-tiny", "cpu-4", global_batch_size=16, schedules=["zigzag"])


@pytest.mark.parametrize("seed", range(3))
def test_segment_bound_below_optimum_on_cost_tables(seed: int) -> None:
    """On the cost model's own tables (memory binding on a 4 GiB device) the segment bound
    of every (pp, c) stays below that candidate's exhaustive optimum, for any target."""
    from uniap.bounds import segment_lower_bound
    from uniap.search import exhaustive

    graph = synthetic_graph(4, seed + 10)
    cm = CostModel(graph, load_cluster("cpu-4"))
    checked = 0
    for pp in (1, 2, 4):
        for c in divisors(8):
            try:
                t = cm.tables(pp, c, 8)
            except ConfigError:
                continue
            best, _, _ = exhaustive(t)
            for target in (None, best, best * 1.1):
                assert segment_lower_bound(t, target) <= best * (1 + 1e-12)
            checked += math.isfinite(best)
    assert checked >= 4


def test_time_limited_plan_reports_a_gap_no_smaller_than_its_real_one() -> None:
    """A plan whose programs stopped at their time limit reports the gap to the lowest bound
    of those programs (with or without an assignment of their own), which is at least its
    real distance from the optimum (found with time to prove it)."""
    cluster = load_cluster("a100-2x8").with_memory(32 * 2**30)
    kw = {"global_batch_size": 64, "pp_degrees": [8], "num_microbatches": [16]}
    fast = plan_graph(_big_graph(), cluster, time_limit_s=0.001, **kw)
    full = plan_graph(_big_graph(), cluster, time_limit_s=60, **kw)
    assert fast.solver["status"] == "time_limit" and full.solver["status"] == "optimal"
    fast_s = fast.predicted["time_per_iteration_s"]
    real = (fast_s - full.predicted["time_per_iteration_s"]) / fast_s
    assert fast.solver["gap"] > 0
    assert fast.solver["gap"] >= real - 1e-9


def test_a_stopped_program_whose_bound_cannot_beat_the_plan_is_settled() -> None:
    """A program that stopped at its limit (in the first pass, against a higher incumbent)
    with a bound that the final plan's time does not exceed cannot hold a better plan: it is
    pruned and leaves the plan proven; one whose bound is below the plan keeps it unproven."""
    import dataclasses

    from uniap.uop import Candidate, Entry, Search

    cm = CostModel(_big_graph(), load_cluster("a100-2x8").with_memory(32 * 2**30))
    t = cm.tables(8, 16, 64)
    opt = solve(t, incumbent=heuristic(t), time_limit_s=60)
    assert opt.status == "optimal"

    def entry(status: str, bound_s: float, tpi_s: float) -> Entry:
        e = Entry(Candidate(8, 16, "1F1B", 0.0), t)
        e.solution = dataclasses.replace(
            opt, status=status, bound_s=bound_s, time_per_iteration_s=tpi_s
        )
        return e

    plan_s = opt.time_per_iteration_s * 1.5  # a plan the candidates below could beat
    best = entry("optimal", plan_s, plan_s)
    above = entry("time_limit", plan_s * 1.01, plan_s * 1.2)  # its program's bound
    below = entry("time_limit", opt.time_per_iteration_s * 0.9, plan_s * 1.2)
    search = Search([best, above, below], best=best, best_tpi_s=plan_s)
    assert search.unsettled() == [below]
    assert above.cand.status == "pruned" and "cannot beat" in above.cand.reason
    assert above.solution.status == "pruned" and below.solution.status == "time_limit"
    best.solution = dataclasses.replace(best.solution, status="time_limit", bound_s=0.0)
    assert search.unsettled() == [best, below]  # the plan's own stopped program stays
