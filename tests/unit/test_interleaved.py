"""Interleaved 1F1B (v stages per rank): its time and memory formulas, the solver and the
bounds against enumeration, and plans that record v."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from _tables import (
    assert_bounds_keep_the_optimum,
    assert_program_equals_enumeration,
    preset_plan_tables,
)

from uniap.bounds import bottleneck_lower_bound
from uniap.contract import Plan
from uniap.cost_model import CostModel, CostTables, evaluate_assignment
from uniap.errors import ConfigError
from uniap.exactness import small_cluster
from uniap.milp import min_peak_memory
from uniap.planner import plan
from uniap.search import compositions


def _equal_tables(pp: int, v: int, c: int, num_layers: int = 8) -> CostTables:
    L = num_layers
    return CostTables(
        pp=pp,
        num_microbatches=c,
        A=np.ones((L, 1)),
        G=np.zeros((L, 1)),
        M=np.ones((L, 1, pp * v)),
        layout=np.zeros((L, 1), dtype=np.int64),
        R=np.zeros((L - 1, 1, 1)),
        Rp=np.zeros((L - 1, 1, 1)),
        memory_limit_bytes=1e30,
        allowed=[[0]] * L,
        schedule="Interleaved1F1B" if v > 1 else "1F1B",
        virtual_stages=v,
    )


@pytest.mark.parametrize("pp,v,c", [(2, 2, 2), (2, 2, 4), (4, 2, 8), (2, 4, 6)])
def test_equal_stages_bubble_is_v_times_smaller(pp: int, v: int, c: int) -> None:
    """Equal stages: TPI = c P + (pp - 1) P / v (Megatron-LM's (pp - 1) / (v c) of the ideal
    time c P, P a rank's time per micro-batch); v = 1 is 1F1B's c P + (pp - 1) P."""
    L = pp * v * 2
    stage_of = [u // 2 for u in range(L)]
    P = 2.0 * v  # two layers of 1 s per stage, v stages per rank
    ev = evaluate_assignment(_equal_tables(pp, v, c, L), stage_of, [0] * L)
    assert ev.time_per_iteration_s == pytest.approx(c * P + (pp - 1) * P / v)
    assert ev.peak_memory_bytes == [2.0 * v] * pp  # a rank holds all of its stages
    one = evaluate_assignment(_equal_tables(pp, 1, c, L), [u // (2 * v) for u in range(L)], [0] * L)
    assert one.time_per_iteration_s == pytest.approx(c * P + (pp - 1) * P)


def _random_interleaved(seed: int) -> CostTables:
    """Small random tables with v = 2 stages per rank (v = 3 for seeds 4, 9, ...) and a binding
    memory limit."""
    rng = np.random.default_rng(seed)
    pp, v = 2, 3 if seed % 5 == 4 else 2
    L = int(rng.integers(4, 7))
    if v == 3:
        L = pp * v + 1
    K = int(rng.integers(2, 4))
    C = int(rng.integers(1, K + 1))
    c = int(rng.choice([2, 4]))
    layout = np.tile(rng.integers(0, C, size=K), (L, 1))
    A = rng.uniform(0.1, 2.0, size=(L, K))
    allowed = []
    for u in range(L):
        ks = sorted(rng.choice(K, size=int(rng.integers(1, K + 1)), replace=False).tolist())
        allowed.append(ks)
        A[u, [k for k in range(K) if k not in ks]] = np.inf
    if seed % 2:  # a run of identical layers (symmetry rows)
        for u in range(2, L):
            A[u], allowed[u] = A[1], list(allowed[1])
    G = rng.uniform(0.0, 1.0, size=(L, K))
    F = rng.uniform(0.0, 0.5, size=(L, K)) * (seed % 3 != 2)
    M = rng.uniform(1.0, 10.0, size=(L, K, 1)) + rng.uniform(0, 2.0, size=(L, K, pp * v))
    if seed % 2:
        for u in range(2, L):
            G[u], F[u], M[u] = G[1], F[1], M[1]
    R = rng.uniform(0.0, 0.5, size=(L - 1, C, C))
    for a in range(C):
        R[:, a, a] = 0.0
    Rp = rng.uniform(0.05, 1.0, size=(L - 1, C, C))
    t = CostTables(
        pp, c, A, G, M, layout, R, Rp, 1e30, allowed, F=F, virtual_stages=v,
        schedule="Interleaved1F1B",
    )  # fmt: skip
    peaks = [
        max(evaluate_assignment(t, st, [min(allowed[u]) for u in range(L)]).peak_memory_bytes)
        for st in compositions(L, pp * v)
    ]
    t.memory_limit_bytes = float(min(peaks) + rng.uniform(0.0, 0.6) * (max(peaks) - min(peaks)))
    return t


@pytest.mark.parametrize("seed", range(12))
def test_solver_and_bounds_equal_enumeration(seed: int) -> None:
    """The program (cold, and warm-started with a cutoff that narrows the stages by the
    segment bound) equals exhaustive search over every split into pp * v stages and every
    strategy; every bound stays below the optimum and every window keeps every faster
    assignment."""
    t = _random_interleaved(seed)
    got = assert_program_equals_enumeration(t)
    if got is None:
        return
    opt, stage_of, sol = got
    assert_bounds_keep_the_optimum(t, opt)
    assert bottleneck_lower_bound(t) <= max(
        evaluate_assignment(t, stage_of, sol.strategy_of).stage_time_s
    )
    free = CostTables(**{**t.__dict__, "memory_limit_bytes": float("inf")})
    leanest = min(
        max(evaluate_assignment(free, st, list(ks)).peak_memory_bytes)
        for st in compositions(t.num_layers, t.num_stages)
        for ks in itertools.product(*t.allowed)
    )
    assert min_peak_memory(t) == pytest.approx(leanest, rel=1e-6)


@pytest.fixture(scope="module")
def interleaved_plan() -> Plan:
    """gpt-tiny on 4 CPUs at pp = 2 with the interleaved schedule."""
    return plan(
        "gpt-tiny", "cpu-4", global_batch_size=16, schedules=["Interleaved1F1B"], pp_degrees=[2]
    )


def test_planner_records_v_and_predicts_what_the_cost_model_evaluates(
    interleaved_plan: Plan, tmp_path
) -> None:
    """gpt-tiny on 4 CPUs with the interleaved schedule: the plan lists pp * 2 stages, stage j
    on the ranks of stage j % pp; it round-trips through YAML, shows v, and its predicted
    time and memory are CostModel.evaluate() of it."""
    from uniap import models
    from uniap.cluster import load_cluster
    from uniap.graph import build_graph

    p = interleaved_plan
    assert p.schedule == "Interleaved1F1B" and p.virtual_stages == 2
    assert len(p.stages) == 2 * p.pp_degree
    assert [s.ranks for s in p.stages] == [p.stages[j % p.pp_degree].ranks for j in range(4)]
    assert p.stages_of_rank(0) == [0, p.pp_degree]
    assert p.num_microbatches % p.pp_degree == 0
    again = Plan.load(p.to_yaml(tmp_path / "p.yaml"))
    assert again.to_dict() == p.to_dict() and again.virtual_stages == 2
    assert "with 2 stages per rank" in p.describe() and " v=2 " in p.summary()
    m = models.build_model("gpt-tiny", device="meta")
    g = build_graph(m, models.example_batch(m, 2, device="meta")[0], name="gpt-tiny")
    ev = CostModel(g, load_cluster("cpu-4"), precision=p.precision).evaluate(p)
    assert ev.time_per_iteration_s == pytest.approx(p.predicted["time_per_iteration_s"])
    assert ev.peak_memory_bytes == pytest.approx(p.predicted["peak_memory_bytes"])
    tb = p.predicted["time_breakdown_s"]
    assert sum(tb.values()) == pytest.approx(p.predicted["time_per_iteration_s"])


def test_interleaved_plans_are_validated(interleaved_plan: Plan) -> None:
    """Stages not in the looped placement, and c not a multiple of pp, are one ConfigError
    each."""
    p = interleaved_plan
    d = p.to_dict()
    d["stages"][2]["ranks"], d["stages"][3]["ranks"] = [2, 3], [0, 1]
    with pytest.raises(ConfigError, match="stage j must run on the ranks of stage j % pp"):
        Plan.from_dict(d)
    d = p.to_dict()
    d["num_microbatches"], d["global_batch_size"] = 3 * p.pp_degree - 1, 4 * (3 * p.pp_degree - 1)
    with pytest.raises(ConfigError, match="needs the number of micro-batches .* multiple of"):
        Plan.from_dict(d)
    d = p.to_dict()
    d["schedule"] = "1F1B"
    with pytest.raises(ConfigError, match=r"1F1B runs \(1,\) stage\(s\) per rank, not 2"):
        Plan.from_dict(d)


def test_tables_refuse_what_the_schedule_cannot_run() -> None:
    """c not a multiple of pp, or fewer layers than pp * v: one ConfigError naming it."""
    from uniap import models
    from uniap.graph import build_graph

    m = models.build_model("gpt-tiny", device="meta")
    g = build_graph(m, models.example_batch(m, 2, device="meta")[0], name="gpt-tiny")
    cm = CostModel(g, small_cluster(4))
    with pytest.raises(ConfigError, match=r"micro-batches \(6\) to be a multiple of .* \(4\)"):
        cm.tables(4, 6, 12, "Interleaved1F1B")
    with pytest.raises(ConfigError, match=f"needs at least {4 * 8} layers"):
        cm.tables(4, 4, 16, "Interleaved1F1B", 8)


@pytest.fixture
def fake_world(request: pytest.FixtureRequest):
    """A fake process group (no communication) of ``(world, rank)``."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world, rank = request.param
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    yield rank
    dist.destroy_process_group()


def _toy_interleaved_plan(world: int, pp: int, n_blocks: int) -> Plan:
    from toy import toy_fqns

    from uniap.contract import LayerStrategy, Stage, Strategy

    fqns, g = toy_fqns(n_blocks), world // pp
    stages = [
        Stage(
            tuple(range((j % pp) * g, (j % pp + 1) * g)),
            (LayerStrategy(f, Strategy(g, 1, "FSDP")),),
        )
        for j, f in enumerate(fqns)
    ]
    return Plan(
        model_name="Toy",
        model_signature="toy",
        num_layers=len(fqns),
        world_size=world,
        global_batch_size=4 * g,
        num_microbatches=pp,
        schedule="Interleaved1F1B",
        stages=tuple(stages),
    )


@pytest.mark.parametrize("fake_world", [(8, 5)], indirect=True)
def test_apply_plan_builds_the_ranks_stages(fake_world: int) -> None:
    """Fake rank 5 of 8 at pp = 4, v = 2 (8 layers, one per stage): it holds stages 2 and 6
    (blocks.1 and blocks.5) at their FQNs, one pipeline stage each in torch's interleaved
    schedule, each its own FSDP root."""
    import torch
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.pipelining import ScheduleInterleaved1F1B
    from toy import build_toy, toy_layers, toy_loss

    from uniap.executor import apply_plan

    plan = _toy_interleaved_plan(8, 4, 6)
    assert plan.stages_of_rank(fake_world) == [2, 6]
    pm = apply_plan(
        build_toy(6), plan, loss_fn=toy_loss, layers=toy_layers(6), device=torch.device("cpu")
    )
    assert {k.rsplit(".", 2)[0] for k, _ in pm.named_parameters()} >= {"blocks.1", "blocks.5"}
    assert all(k.startswith(("blocks.1.", "blocks.5.")) for k, _ in pm.named_parameters())
    sched = pm._schedule
    assert isinstance(sched, ScheduleInterleaved1F1B)
    assert [s.stage_index for s in sched._stages] == [2, 6]
    assert all(isinstance(s.submod.module, FSDPModule) for s in sched._stages)
    assert not pm.is_first_stage and not pm.is_last_stage


@pytest.mark.parametrize("fake_world", [(4, 0)], indirect=True)
def test_traced_model_is_refused_with_the_fix(fake_world: int) -> None:
    """A model split by tracing its forward runs one stage per rank: an interleaved plan for
    it is one error naming both fixes."""
    import torch
    from toy import Toy, toy_loss

    from uniap.errors import UniapError
    from uniap.executor import apply_plan

    class OwnForward(Toy):
        uniap_layer_fqns = None  # not a declared chain: split by tracing

    plan = _toy_interleaved_plan(4, 2, 2)
    torch.manual_seed(0)
    with pytest.raises(
        UniapError,
        match=r"OwnForward is split by tracing its forward, which runs one stage per rank; "
        r"Interleaved1F1B needs 2 stages per rank: make the model a declared chain "
        r"\(nn.Sequential, or uniap_layer_fqns\(\)\), or re-plan with schedule 1F1B",
    ):
        apply_plan(OwnForward(2), plan, loss_fn=toy_loss, device=torch.device("cpu"))


def test_planner_chooses_interleaving_when_it_is_faster(interleaved_plan: Plan) -> None:
    """Offered both schedules at pp = 2, the planner returns the interleaved plan: its bubble
    is half of 1F1B's, more than its extra stage-to-stage sends cost."""
    one = plan("gpt-tiny", "cpu-4", global_batch_size=16, pp_degrees=[2])
    both = plan(
        "gpt-tiny",
        "cpu-4",
        global_batch_size=16,
        schedules=["1F1B", "Interleaved1F1B"],
        pp_degrees=[2],
    )
    assert one.schedule == "1F1B" and both.schedule == "Interleaved1F1B"
    assert both.to_dict()["stages"] == interleaved_plan.to_dict()["stages"]
    tpi = both.predicted["time_per_iteration_s"]
    assert tpi == interleaved_plan.predicted["time_per_iteration_s"]
    assert tpi < one.predicted["time_per_iteration_s"]
    assert {(c["schedule"], c.get("v")) for c in both.solver["candidates"]} == {
        ("1F1B", None),
        ("Interleaved1F1B", 2),
    }


def _plan_cli_error(capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    """What ``uniap plan`` (gpt-tiny on cpu-2, batch 8) with ``extra`` prints as it exits on
    a bad argument."""
    from uniap.cli import main

    with pytest.raises(SystemExit):
        main(["plan", "--model", "gpt-tiny", "--cluster", "cpu-2", "--global-batch-size", "8",
              *extra])  # fmt: skip
    return capsys.readouterr().err


def test_cli_schedule_takes_several_names(capsys: pytest.CaptureFixture[str]) -> None:
    """--schedule 1F1B,Interleaved1F1B offers both; an unknown name is one error listing
    them."""
    from uniap.cli import _schedule_list

    assert _schedule_list("1F1B,Interleaved1F1B") == ["1F1B", "Interleaved1F1B"]
    assert (
        "argument --schedule: invalid choice: 'ZB' (choose from GPipe, 1F1B, Interleaved1F1B, "
        "InterleavedZeroBubble, or "
        "several separated by commas)"
    ) in _plan_cli_error(capsys, "--schedule", "1F1B,ZB")


def test_planner_tries_the_stages_per_rank_asked_for(capsys: pytest.CaptureFixture[str]) -> None:
    """virtual_stages=[2, 3] makes each interleaved schedule a candidate at v = 2 and v = 3
    (1F1B stays one stage per rank); on gpt-tiny over 2 CPUs zero bubble at v = 3 wins, with
    the time CostModel.evaluate() gives its plan and at most the v = 2 search's. A v below 2
    is one error, from the planner and from the CLI, and so is a v with more stages than
    layers at every pp asked for."""
    from uniap import models
    from uniap.cluster import load_cluster
    from uniap.cost_model import CostModel
    from uniap.errors import ConfigError
    from uniap.graph import build_graph

    kw = {"global_batch_size": 16, "pp_degrees": [2]}
    schedules = ["1F1B", "Interleaved1F1B", "InterleavedZeroBubble"]
    two = plan("gpt-tiny", "cpu-2", schedules=schedules, **kw)
    more = plan("gpt-tiny", "cpu-2", schedules=schedules, virtual_stages=[2, 3], **kw)
    assert {(c["schedule"], c.get("v")) for c in more.solver["candidates"]} == {
        ("1F1B", None),
        ("Interleaved1F1B", 2),
        ("Interleaved1F1B", 3),
        ("InterleavedZeroBubble", 2),
        ("InterleavedZeroBubble", 3),
    }
    assert more.virtual_stages == 3 and len(more.stages) == 6
    assert more.schedule == "InterleavedZeroBubble"
    tpi = more.predicted["time_per_iteration_s"]
    assert tpi <= two.predicted["time_per_iteration_s"]
    m = models.build_model("gpt-tiny", device="meta")
    g = build_graph(m, models.example_batch(m, 2, device="meta")[0], name="gpt-tiny")
    cm = CostModel(g, load_cluster("cpu-2"), precision=more.precision)
    assert cm.evaluate(more).time_per_iteration_s == pytest.approx(tpi)
    with pytest.raises(
        ConfigError,
        match=r"virtual_stages must be whole numbers of stages per rank of at least 2 \(an "
        r"interleaved schedule's v\), got \[1\]",
    ):
        plan("gpt-tiny", "cpu-2", virtual_stages=[1], **kw)
    with pytest.raises(
        ConfigError,
        match=r"Interleaved1F1B with 4 or more stages per rank \(virtual_stages \[4\]\) at pp in "
        r"\[2\] needs at least 8 layers, the model has 7; ask for at most 3 stages per rank, "
        r"or a smaller pp",
    ):
        plan("gpt-tiny", "cpu-2", schedules=["Interleaved1F1B"], virtual_stages=[4], **kw)
    assert (
        "argument --virtual-stages: invalid value '2,1': whole numbers of at least 2, separated "
        "by commas (e.g. 2,4)"
    ) in _plan_cli_error(capsys, "--virtual-stages", "2,1")


def test_picture_of_an_interleaved_plan_labels_each_devices_stages(interleaved_plan: Plan) -> None:
    """The device grid names every stage a device holds (S0,2 on the devices of stage 0); the
    timeline has a row per rank."""
    pytest.importorskip("matplotlib")
    from uniap.plot import plot_plan

    fig = plot_plan(interleaved_plan)
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels[:2] == ["0\nS0,2", "1\nS0,2"] and labels[2:4] == ["2\nS1,3", "3\nS1,3"]
    rows = [t.get_text() for t in fig.axes[2].get_yticklabels()]
    assert rows == ["stages 0,2", "stages 1,3"]


def test_interleaved_plan_time_is_its_replay_through_torchs_order() -> None:
    """An interleaved 1F1B plan's predicted time is the longest path through torch's order of
    operations: replayed by `uniap show --plot`'s timeline it ends at the prediction (the
    closed form over each rank's summed chunks the cost model used before predicted gpt-tiny's
    plan here 17 % fast, Llama-7B's at pp = 4 and 8 27-33 %), and `uniap show`'s time
    breakdown sums to it; 1F1B, whose closed form is its replay, too."""
    from uniap.planner import plan
    from uniap.plot import timeline
    from uniap.report import plan_report

    for sched in ("Interleaved1F1B", "1F1B"):
        p = plan("gpt-tiny", "cpu-4", global_batch_size=16, schedules=[sched], pp_degrees=[2])
        assert p.schedule == sched
        r = plan_report(p)
        ops = timeline(p.schedule, p.num_microbatches, r["stage_detail"], p.virtual_stages)
        end = max(b for row in ops for k, _, _, b in row if k in "FB")
        t, stage_of, strategy_of = preset_plan_tables(p, "cpu-4")
        ev = evaluate_assignment(t, stage_of, strategy_of)
        tpi = p.predicted["time_per_iteration_s"]
        assert end + max(ev.sync_time_s) + t.step_overhead_s == pytest.approx(tpi, rel=1e-9)
        assert sum(r["time_breakdown_s"].values()) == pytest.approx(tpi, rel=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_frontier_equals_enumeration_for_interleaved_and_zero_bubble(seed: int) -> None:
    """The exhaustive memory/time frontier (vectorised, the longest path one operation at a
    time) equals evaluate_assignment over every split and strategy, for interleaved 1F1B and
    zero-bubble tables (it raised for both once they were timed by the longest path)."""
    from test_zero_bubble import _random_zb

    from uniap.search import frontier

    for t in (_random_interleaved(seed), _random_zb(seed)):
        free = CostTables(**{**t.__dict__, "memory_limit_bytes": float("inf")})
        points = sorted(
            (max(ev.peak_memory_bytes), ev.time_per_iteration_s)
            for st in compositions(t.num_layers, t.num_stages)
            for ks in itertools.product(*t.allowed)
            for ev in [evaluate_assignment(free, st, list(ks))]
        )
        want: list[tuple[float, float]] = []
        for peak, tpi in points:
            if not want or tpi < want[-1][1] * (1 - 1e-12):
                want.append((peak, tpi))
        got = frontier(t)
        assert len(got) == len(want)
        assert [x for pair in got for x in pair] == pytest.approx(
            [x for pair in want for x in pair], rel=1e-9
        )
