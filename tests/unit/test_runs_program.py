"""The program over runs of identical layers (uniap.runs_program) is exact: it equals the
enumeration on random tables with runs (reshard costs that break the triangle inequality
included), cold and warm-started under a cutoff, and the planner that uses it equals the
enumeration at every memory breakpoint of a chain with a run of identical blocks."""

from __future__ import annotations

import math

import numpy as np
import pulp
import pytest
import torch
from _tables import random_tables
from torch import nn

from uniap.cost_model import CostTables, evaluate_assignment
from uniap.exactness import MLP, small_cluster, sweep
from uniap.graph import build_graph
from uniap.milp import solve
from uniap.runs_program import RunsProgram, _lay_out, _walk, applies, layer_runs
from uniap.search import compositions, exhaustive, heuristic


def run_tables(seed: int) -> CostTables:
    """Random tables of 5-7 layers with a run of 3 or more identical ones (equal rows and equal
    reshard edges inside the run) and a memory limit that binds."""
    rng = np.random.default_rng(seed)
    L, pp, K = int(rng.integers(5, 8)), int(rng.integers(1, 4)), int(rng.integers(2, 4))
    C, c = int(rng.integers(1, K + 1)), int(rng.choice([1, 2, 4, 8]))
    layout = np.tile(rng.integers(0, C, size=K), (L, 1))
    A, G = rng.uniform(0.1, 2.0, size=(L, K)), rng.uniform(0.0, 1.0, size=(L, K))
    M = rng.uniform(1, 10, size=(L, K, 1)) + rng.uniform(0, 2, size=(L, K, pp))
    F = rng.uniform(0.0, 1.0, size=(L, K)) * (seed % 3 != 2)
    allowed = [list(range(K)) for _ in range(L)]
    R = rng.uniform(0.0, 0.5, size=(L - 1, C, C))
    Rp = rng.uniform(0.05, 1.0, size=(L - 1, C, C))
    for a in range(C):
        R[:, a, a] = 0.0
    s0 = int(rng.integers(0, 2))
    n = int(rng.integers(3, L - s0 + 1))
    for u in range(s0 + 1, s0 + n):
        A[u], G[u], M[u], F[u] = A[s0], G[s0], M[s0], F[s0]
    for u in range(s0 + 1, s0 + n - 1):
        R[u], Rp[u] = R[s0], Rp[s0]
    t = CostTables(pp, c, A, G, M, layout, R, Rp, 1e30, allowed, F=F)
    peaks = []
    for stage_of in compositions(L, pp):
        for key in (lambda u, k: M[u, k, 0], lambda u, k: A[u, k]):
            strat = [min(allowed[u], key=lambda k, u=u: key(u, k)) for u in range(L)]
            peaks.append(max(evaluate_assignment(t, stage_of, strat).peak_memory_bytes))
    lo, hi = min(peaks), max(peaks)
    t.memory_limit_bytes = float(lo + rng.uniform(0.0, 0.6) * (hi - lo))
    return t


@pytest.mark.parametrize("seed", range(24))
def test_runs_program_equals_enumeration(seed: int) -> None:
    """Cold, and warm-started from the heuristic with a cutoff 2 % above the optimum: the
    program's assignment is the optimum and its objective is that assignment's time."""
    t = run_tables(seed)
    assert max(e - s for s, e in layer_runs(t)) >= 2
    opt, _, _ = exhaustive(t)
    cold = solve(t, labels=False, program="runs")
    if math.isinf(opt):
        assert cold.status == "infeasible"
        return
    assert cold.status == "optimal"
    assert math.isclose(cold.time_per_iteration_s, opt, rel_tol=1e-9)
    assert math.isclose(cold.objective_s, opt, rel_tol=1e-6)
    warm = solve(
        t, incumbent=heuristic(t), incumbent_tpi_s=opt * 1.02, labels=False, program="runs"
    )
    assert warm.status == "optimal"
    assert math.isclose(warm.time_per_iteration_s, opt, rel_tol=1e-9)


@pytest.mark.parametrize("seed", [1, 3, 5, 7])
def test_runs_program_on_the_random_tables_of_the_layer_program(seed: int) -> None:
    """The shared random tables (runs of at most two layers: their reshard edges differ): the
    same optimum as the enumeration."""
    t = random_tables(seed)
    opt, _, _ = exhaustive(t)
    sol = solve(t, labels=False, program="runs")
    if math.isinf(opt):
        assert sol.status == "infeasible"
    else:
        assert math.isclose(sol.time_per_iteration_s, opt, rel_tol=1e-9)


@pytest.mark.parametrize("seed", [0, 4, 9, 14])
def test_start_values_satisfy_every_row(seed: int) -> None:
    """The warm start of an optimal assignment (and of one with dominated strategies, which it
    trades for their dominators) satisfies every row of the program, and its objective is the
    assignment's time."""
    t = run_tables(seed)
    opt, _, _ = exhaustive(t)
    if math.isinf(opt):
        pytest.skip("nothing fits in this instance")
    sol = solve(t, labels=False, program="runs")
    stage_of, strategy_of = sol.stage_of, sol.strategy_of
    window = [list(range(t.num_stages)) for _ in range(t.num_layers)]
    rp = RunsProgram(t, window, None, 0.0, 1.0)
    vals = rp.start_values(stage_of, strategy_of)
    assert vals
    for var in rp.prob.variables():
        var.varValue = vals.get(var.name, 0.0)
    bad = [row.name for row in rp.prob.constraints() if not row.valid(1e-9)]
    assert bad == []
    assert pulp.value(rp.prob.objective) == pytest.approx(opt, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 4, 5])
def test_runs_program_keeps_the_host_memory_of_each_node(seed: int) -> None:
    """Strategies that hold state on the host (FSDP-offload; strategy 0 holds none), the ranks
    of each stage on two nodes, and a host limit at 70 % of what the unconstrained optimum
    puts on its fullest node: the enumeration's optimum, which the limit changes."""
    t = run_tables(seed)
    rng = np.random.default_rng(seed + 500)
    L, K = t.A.shape
    Mh = rng.uniform(1, 5, size=(1, K))
    Mh[0, 0] = 0.0
    t.Mh = np.tile(Mh, (L, 1))
    t.host_ranks = np.array([[1] * t.pp, [0] + [2] * (t.pp - 1)])
    free, stage_of, strategy_of = exhaustive(t)
    t.host_limit_bytes = 0.7 * evaluate_assignment(t, stage_of, strategy_of).host_node_bytes
    opt, _, _ = exhaustive(t)
    assert opt > free
    sol = solve(t, labels=False, program="runs")
    if math.isinf(opt):
        assert sol.status == "infeasible"
    else:
        assert sol.status == "optimal"
        assert math.isclose(sol.time_per_iteration_s, opt, rel_tol=1e-9)


def test_runs_are_maximal_stretches_with_equal_rows_and_inner_edges() -> None:
    """Equal rows make a run only while the reshard edges inside it are equal too."""
    L, K = 6, 2
    A = np.ones((L, K))
    M = np.ones((L, K, 1))
    R = np.zeros((L - 1, 2, 2))
    R[:, 0, 1] = R[:, 1, 0] = 0.1
    t = CostTables(1, 1, A, A * 0, M, np.tile([0, 1], (L, 1)), R, R.copy(), 10.0, [[0, 1]] * L)
    assert layer_runs(t) == [(0, 5)] and applies(t)
    t.R[2, 0, 1] = 0.2  # the edge between layers 2 and 3 differs from the others
    assert layer_runs(t) == [(0, 2), (3, 5)]
    t.A[5, 1] = 2.0
    assert layer_runs(t) == [(0, 2), (3, 4), (5, 5)]
    assert not applies(t)  # no run of MIN_RUN layers left


def test_walk_makes_each_layout_change_and_lays_out_every_layer() -> None:
    """An Euler walk through the changes, each visit one layer or more."""
    walk = _walk(0, 0, {(0, 1): 1, (1, 2): 1, (2, 0): 1})
    assert walk == [0, 1, 2, 0]
    t = CostTables(
        1,
        1,
        np.ones((1, 3)),
        np.zeros((1, 3)),
        np.ones((1, 3, 1)),
        np.array([[0, 1, 2]]),
        np.zeros((0, 3, 3)),
        np.zeros((0, 3, 3)),
        10.0,
        [[0, 1, 2]],
    )
    assert _lay_out(t, 0, {0: 3, 1: 1, 2: 1}, walk) == [0, 0, 1, 2, 0]
    with pytest.raises(ValueError, match="no walk from layout 0 to 1"):
        _walk(0, 1, {(0, 1): 1, (2, 0): 1})
    with pytest.raises(ValueError, match="fewer layers than visits"):
        _lay_out(t, 0, {0: 1, 1: 1, 2: 1}, walk)


def _blocks(n: int):
    """A chain: a wide MLP, ``n`` identical MLP blocks, a norm and a narrow MLP."""
    with torch.device("meta"):
        m = nn.Sequential(
            MLP(64, 512), *[MLP(64, 256) for _ in range(n)], nn.LayerNorm(64), MLP(64, 128)
        )
    return build_graph(m, torch.empty(2, 16, 64, device="meta"), name=f"blocks{n}")


def test_planner_with_a_run_of_blocks_equals_enumeration_at_every_breakpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Five identical blocks between other layers on 4 devices (pipelines of 1, 2 and 4
    stages, DDP and FSDP, recompute): at every memory limit where the optimum changes, and
    just below it, the planner (whose programs count the blocks) equals the enumeration."""
    built = []
    init = RunsProgram.__init__

    def spy(self, *args, **kwargs):
        built.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(RunsProgram, "__init__", spy)
    monkeypatch.setattr("uniap.milp.pipeline_optimum", lambda *a, **k: None)  # the program
    g = _blocks(5)
    checks = sweep(
        g,
        small_cluster(4),
        global_batch_size=8,
        max_checks=16,
        schedules=["1F1B"],
        max_tp=1,
        kinds=("DDP", "FSDP"),
    )
    assert len(checks) >= 8 and built
    assert [c for c in checks if not c.ok] == []


def test_long_stages_of_a_run_skip_the_pipelined_label_search(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The search gives the pipelined label search no time on tables the program over runs
    states when their stages are long (more than 12 layers each), and a budget of 0 skips it:
    the program answers, with the same optimum."""
    from uniap.uop import _LONG_STAGE, _label_budget

    t = next(
        tt
        for tt in map(run_tables, range(100))
        if tt.num_stages > 1 and applies(tt) and math.isfinite(exhaustive(tt)[0])
    )
    assert _label_budget(t, 10.0, 1) > 0  # short stages: the labels look first
    L = _LONG_STAGE * 2 + 3
    A = np.ones((L, 2))
    R = np.zeros((L - 1, 1, 1))
    deep = CostTables(
        2, 8, A, A * 0, np.ones((L, 2, 2)), np.zeros((L, 2), int), R, R, 1e3, [[0, 1]] * L
    )
    assert applies(deep) and _label_budget(deep, 10.0, 1) == _label_budget(deep, 10.0, 2) == 0.0

    def called(*args, **kwargs):
        raise AssertionError("the label search ran")

    monkeypatch.setattr("uniap.milp.pipeline_optimum", called)
    opt = exhaustive(t)[0]
    sol = solve(t, incumbent=heuristic(t), incumbent_tpi_s=opt * 1.02, label_budget_s=0.0)
    assert sol.status == "optimal" and math.isclose(sol.time_per_iteration_s, opt, rel_tol=1e-9)


@pytest.mark.parametrize("program", ["runs", "layers"])
@pytest.mark.parametrize("seed", [0, 1, 4, 6, 9, 10])
def test_a_plan_over_the_memory_limit_by_less_than_highs_tolerance_is_not_returned(
    seed: int, program: str
) -> None:
    """The memory limit set 5e-9 below what the optimum needs (more than the 1e-9 rounding
    slack of ``fits``, less than HiGHS's feasibility tolerance): neither program returns it,
    each returns the optimum that fits, as the enumeration does. Memory rows are scaled so
    that HiGHS's tolerance is that slack (:data:`uniap.runs_program.MEMORY_ROW`)."""
    t = run_tables(seed)
    opt, stage_of, strategy_of = exhaustive(t)
    assert math.isfinite(opt)
    need = max(evaluate_assignment(t, stage_of, strategy_of).peak_memory_bytes)
    tight = CostTables(**{**t.__dict__, "memory_limit_bytes": need / (1 + 5e-9)})
    assert not evaluate_assignment(tight, stage_of, strategy_of).fits
    want, _, _ = exhaustive(tight)
    got = solve(tight, labels=False, program=program)
    if math.isinf(want):
        assert got.status == "infeasible"
        return
    assert got.status == "optimal"
    assert evaluate_assignment(tight, got.stage_of, got.strategy_of).fits
    assert math.isclose(got.time_per_iteration_s, want, rel_tol=1e-9)
