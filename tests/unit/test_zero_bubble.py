"""Interleaved zero bubble (torch's ``ScheduleInterleavedZeroBubble``, v = 2): its order of
operations against torch's, its time (the longest path through that order) and in-flight
memory, the solver and the bounds against enumeration, and plans that use it."""

from __future__ import annotations

import numpy as np
import pytest
from _tables import (
    assert_bounds_keep_the_optimum,
    assert_program_equals_enumeration,
    preset_plan_tables,
)

from uniap.bounds import bottleneck_lower_bound
from uniap.cost_model import CostTables, evaluate_assignment
from uniap.schedules import (
    get_schedule,
    inflight_microbatches,
    schedule_makespan,
    zero_bubble_order,
)
from uniap.search import compositions

ZB = "InterleavedZeroBubble"
SHAPES = [
    (2, 2, 2), (2, 2, 4), (4, 2, 4), (4, 2, 8), (4, 2, 12), (3, 2, 6), (2, 1, 4),
    (2, 3, 6), (4, 4, 8),
]  # fmt: skip


def _torch_order(pp: int, v: int, c: int) -> dict[int, list[tuple[str, int, int]]]:
    """torch's own ``pipeline_order`` of ``ScheduleInterleavedZeroBubble`` for ``(pp, v, c)``,
    built by the class's own methods without stages or a process group."""
    from torch.distributed.pipelining.schedules import (
        ScheduleInterleavedZeroBubble,
        _ComputationType,
    )

    kind = {
        _ComputationType.FORWARD: "F",
        _ComputationType.BACKWARD_INPUT: "B",
        _ComputationType.BACKWARD_WEIGHT: "W",
    }
    s = object.__new__(ScheduleInterleavedZeroBubble)
    s.pp_group_size, s.n_local_stages, s._n_microbatches = pp, v, c
    s.number_of_rounds = max(1, c // pp)
    s.microbatches_per_round = c // s.number_of_rounds
    s.pipeline_order = {r: s._calculate_single_rank_operations(r) for r in range(pp)}
    s.pipeline_order = s._add_bubbles_to_actions(pp * v)
    return {
        r: [(kind[a.computation_type], a.microbatch_index, a.stage_index) for a in ops if a]
        for r, ops in s.pipeline_order.items()
    }


@pytest.mark.parametrize("pp,v,c", SHAPES)
def test_order_and_inflight_follow_torchs_schedule(pp: int, v: int, c: int) -> None:
    """Each rank's operations are torch's, in torch's order; each stage's in-flight count is
    the most micro-batches between their forward and their weight gradient in that order."""
    torch_order = _torch_order(pp, v, c)
    for r in range(pp):
        assert zero_bubble_order(pp, v, c, r) == torch_order[r]
    for j in range(pp * v):
        alive, peak = 0, 0
        for kind, _, stage in torch_order[j % pp]:
            if stage == j:
                alive += {"F": 1, "B": 0, "W": -1}[kind]
                peak = max(peak, alive)
        assert inflight_microbatches(ZB, j, pp, c, v) == peak


def _brute_makespan(pp, v, c, f, b, w, link) -> float:
    """Each rank runs torch's order, an operation starting when its rank is free and its
    input is there: repeated relaxation until nothing moves (independent of the DAG code)."""
    orders = _torch_order(pp, v, c)
    S = pp * v
    end: dict[tuple[str, int, int], float] = {}
    pos = [0] * pp
    free = [0.0] * pp
    while any(pos[r] < len(orders[r]) for r in range(pp)):
        moved = False
        for r in range(pp):
            while pos[r] < len(orders[r]):
                kind, m, j = orders[r][pos[r]]
                if kind == "F":
                    need = [(("F", m, j - 1), link[j - 1] / 2)] if j else []
                elif kind == "B":
                    need = [(("B", m, j + 1), link[j] / 2)] if j < S - 1 else [(("F", m, j), 0)]
                else:
                    need = [(("B", m, j), 0.0)]
                if any(n not in end for n, _ in need):
                    break
                start = max([free[r]] + [end[n] + d for n, d in need])
                end[kind, m, j] = free[r] = start + {"F": f, "B": b, "W": w}[kind][j]
                pos[r] += 1
                moved = True
        assert moved, "deadlock"
    return max(free)


@pytest.mark.parametrize("pp,v,c", SHAPES)
def test_makespan_is_the_simulated_schedule(pp: int, v: int, c: int) -> None:
    """The longest path equals an independent simulation of torch's order with random stage
    times; equal stages give c v (F + B + W) + (pp - 1) (F + B - W) when F = B = W (the zero
    bubble paper's ZB-H1 bubble), a third of interleaved 1F1B's (pp - 1)(F + B + W)."""
    rng = np.random.default_rng(pp * 100 + v * 10 + c)
    S = pp * v
    for _ in range(10):
        f, b, w = (rng.uniform(0.1, 2.0, S).tolist() for _ in range(3))
        link = rng.uniform(0.0, 0.5, S - 1).tolist()
        assert schedule_makespan(ZB, pp, v, c, f, b, w, link) == pytest.approx(
            _brute_makespan(pp, v, c, f, b, w, link)
        )
    one = [1.0] * S
    assert schedule_makespan(ZB, pp, v, c, one, one, one) == pytest.approx(3 * v * c + pp - 1)


def _random_zb(seed: int) -> CostTables:
    """Small random tables with v = 2 stages per rank (v = 3 for seeds 4, 9, ...), a split
    backward and a binding memory limit."""
    rng = np.random.default_rng(seed)
    pp, v = 2, 3 if seed % 5 == 4 else 2
    L = int(rng.integers(4, 7))
    if v == 3:
        L = pp * v + 1
    K = int(rng.integers(2, 4))
    C = int(rng.integers(1, K + 1))
    c = int(rng.choice([2, 4]))
    layout = np.tile(rng.integers(0, C, size=K), (L, 1))
    A = rng.uniform(0.3, 2.0, size=(L, K))
    allowed = []
    for u in range(L):
        ks = sorted(rng.choice(K, size=int(rng.integers(1, K + 1)), replace=False).tolist())
        allowed.append(ks)
        A[u, [k for k in range(K) if k not in ks]] = np.inf
    Af = np.where(np.isfinite(A), A * rng.uniform(0.2, 0.4, size=(L, K)), 0.0)
    Aw = np.where(np.isfinite(A), A * rng.uniform(0.0, 0.4, size=(L, K)), 0.0)
    if seed % 2:  # a run of identical layers (symmetry rows)
        for u in range(2, L):
            A[u], Af[u], Aw[u], allowed[u] = A[1], Af[1], Aw[1], list(allowed[1])
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
        pp, c, A, G, M, layout, R, Rp, 1e30, allowed, F=F, schedule=ZB, virtual_stages=v,
        Af=Af, Aw=Aw, stage_overhead_s=0.01 * (seed % 2),
    )  # fmt: skip
    peaks = [
        max(evaluate_assignment(t, st, [min(allowed[u]) for u in range(L)]).peak_memory_bytes)
        for st in compositions(L, pp * v)
    ]
    t.memory_limit_bytes = float(min(peaks) + rng.uniform(0.0, 0.6) * (max(peaks) - min(peaks)))
    return t


@pytest.mark.parametrize("seed", range(10))
def test_solver_and_bounds_equal_enumeration(seed: int) -> None:
    """The program (cold, and warm-started with a cutoff) equals exhaustive search over every
    split into pp * v stages and every strategy; its objective is the longest path of the
    returned assignment; every bound stays below the optimum and every window keeps every
    faster assignment."""
    t = _random_zb(seed)
    got = assert_program_equals_enumeration(t)
    if got is None:
        return
    opt, stage_of, sol = got
    assert_bounds_keep_the_optimum(t, opt)
    assert bottleneck_lower_bound(t) <= max(
        evaluate_assignment(t, stage_of, sol.strategy_of).stage_time_s
    )


def test_spec() -> None:
    """The spec names torch's class, two stages per rank and c a multiple of pp."""
    spec = get_schedule(ZB)
    assert spec.torch_class == "ScheduleInterleavedZeroBubble" and spec.split_backward
    assert spec.stages_per_rank == (2,) and spec.interleaved
    assert "multiple of the pipeline degree (2)" in spec.why_not(2, 2, 3)


@pytest.fixture
def fake_world(request: pytest.FixtureRequest):
    """A fake process group (no communication) of ``(world, rank)``."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world, rank = request.param
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    yield rank
    dist.destroy_process_group()


def _toy_plan(world: int, pp: int, strategy: tuple) -> object:
    """The toy with one layer per stage, 2 pp stages on pp rank groups, every layer with
    ``strategy``."""
    from toy import toy_fqns

    from uniap.contract import LayerStrategy, Plan, Stage, Strategy

    fqns, g = toy_fqns(2 * pp - 2), world // pp
    layer = [(LayerStrategy(f, Strategy(*strategy)),) for f in fqns]
    stages = [
        Stage(tuple(range((j % pp) * g, (j % pp + 1) * g)), layer[j]) for j in range(len(fqns))
    ]
    return Plan(
        model_name="Toy",
        model_signature="toy",
        num_layers=len(fqns),
        world_size=world,
        global_batch_size=4 * g,
        num_microbatches=pp,
        schedule=ZB,
        stages=tuple(stages),
    )


@pytest.mark.parametrize("fake_world", [(4, 1)], indirect=True)
def test_executor_runs_torchs_class_and_refuses_data_parallel_and_recompute(
    fake_world: int,
) -> None:
    """dp = 1 at pp = 4: torch's ScheduleInterleavedZeroBubble over the rank's two stages;
    dp = 2 DDP at tp = 1 runs as plain replicas (no wrapper; their gradients summed after the
    step); dp = 2 FSDP at tp = 1 hands torch each stage's FSDP2 root itself (torch turns the
    sync off in every backward and reduce-scatters after the last weight gradient), with the
    parameters kept gathered after the forward; a layer with DDP or FSDP at tp > 1 (their
    reductions would run in the hooks, before the weight gradients exist) or with activation
    checkpointing is one error naming the fix."""
    import torch
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.pipelining import ScheduleInterleavedZeroBubble
    from toy import build_toy, toy_layers, toy_loss

    from uniap.errors import UniapError
    from uniap.executor import apply_plan

    cpu = torch.device("cpu")
    pm = apply_plan(
        build_toy(6), _toy_plan(4, 4, (1, 1, "DDP")), loss_fn=toy_loss, layers=toy_layers(6),
        device=cpu,
    )  # fmt: skip
    assert isinstance(pm._schedule, ScheduleInterleavedZeroBubble)
    assert [s.stage_index for s in pm._schedule._stages] == [1, 5]
    replicas = apply_plan(
        build_toy(2), _toy_plan(4, 2, (2, 1, "DDP")), loss_fn=toy_loss, device=cpu
    )
    assert replicas._ddp is None and replicas._free_sync is not None
    assert {id(p) for p in replicas._free_sync.params} == {
        id(p) for p in replicas.module.parameters()
    }
    sharded = apply_plan(
        build_toy(2), _toy_plan(4, 2, (2, 1, "FSDP")), loss_fn=toy_loss, device=cpu
    )
    assert sharded._free_sync is None
    for st in sharded._schedule._stages:
        assert isinstance(st.submod, FSDPModule)  # torch's own FSDP path, not a plain wrapper
        groups = [
            fully_shard.state(m)._fsdp_param_group
            for m in st.submod.modules()
            if isinstance(m, FSDPModule)
        ]
        groups = [g for g in groups if g is not None]  # the layer's (the root holds none)
        assert len(groups) == 1 and groups[0].post_forward_mesh_info is None  # kept gathered
    with pytest.raises(
        UniapError,
        match=r"InterleavedZeroBubble computes weight gradients outside autograd's backward "
        r"hooks, where DDP and FSDP reduce them \(pytorch/pytorch#144530\); layer 'embed' has "
        r"dp=2, tp=1 ZeRO2: re-plan with schedule Interleaved1F1B, or give it dp=1 with kind "
        r"DDP, or tp=1 with kind DDP \(plain replicas, their gradients summed after the step\) "
        r"or FSDP \(reduce-scattered after the last weight gradient\)",
    ):
        apply_plan(build_toy(2), _toy_plan(4, 2, (2, 1, "ZeRO2")), loss_fn=toy_loss, device=cpu)
    # offload at dp = 1 copies its gradients out in those hooks too
    with pytest.raises(UniapError, match=r"layer 'embed' has dp=1, tp=1 FSDP-offload: re-plan"):
        offload = (1, 1, "FSDP-offload")
        apply_plan(build_toy(6), _toy_plan(4, 4, offload), loss_fn=toy_loss, device=cpu)
    with pytest.raises(UniapError, match=r"cannot run activation checkpointing \(layer 'embed'\)"):
        apply_plan(build_toy(6), _toy_plan(4, 4, (1, 1, "DDP", True)), loss_fn=toy_loss, device=cpu)


def test_planner_offers_zero_bubble_without_wrappers() -> None:
    """gpt-tiny on 2 CPUs at pp = 2 (one device per stage): offered both interleaved
    schedules, the planner picks zero bubble, whose predicted time is CostModel.evaluate()'s
    and below interleaved 1F1B's; every layer has dp = 1 and no recompute. On 4 CPUs at
    pp = 2 (two devices per stage) zero bubble offers the layers dp = 1 (TP over the stage),
    plain DDP replicas at tp = 1, whose all-reduce it charges whole (no overlap), or FSDP at
    tp = 1, whose reduce-scatter it charges whole (``G`` = interleaved 1F1B's with the overlap
    coefficient at 0) with FSDP's memory at c > 1; never ZeRO2, HSDP or recompute. With an
    all-ZeRO2 kind list the norm (no TP) has no strategy, an error naming the rule."""
    from uniap import models
    from uniap.cluster import load_cluster
    from uniap.cost_model import CostModel
    from uniap.errors import ConfigError
    from uniap.graph import build_graph
    from uniap.planner import plan

    kw = {"global_batch_size": 16, "pp_degrees": [2]}
    one = plan("gpt-tiny", "cpu-2", schedules=["Interleaved1F1B"], **kw)
    both = plan("gpt-tiny", "cpu-2", schedules=["Interleaved1F1B", ZB], **kw)
    assert both.schedule == ZB and both.virtual_stages == 2
    assert all(ls.dp == 1 and not ls.recompute for ls in both.layer_strategies)
    tpi = both.predicted["time_per_iteration_s"]
    assert tpi < one.predicted["time_per_iteration_s"]
    m = models.build_model("gpt-tiny", device="meta")
    g = build_graph(m, models.example_batch(m, 2, device="meta")[0], name="gpt-tiny")
    cm = CostModel(g, load_cluster("cpu-2"), precision=both.precision)
    assert cm.evaluate(both).time_per_iteration_s == pytest.approx(tpi)
    cm4 = CostModel(g, load_cluster("cpu-4"))
    t = cm4.tables(2, 4, 16, ZB)
    strategies = cm4.strategies(2)
    offered = {strategies[k] for row in t.allowed for k in row}
    assert all(s.dp == 1 or (s.kind in ("DDP", "FSDP") and s.tp == 1) for s in offered)
    assert {s.kind for s in offered if s.dp == 2} == {"DDP", "FSDP"}
    assert not any(s.recompute for s in offered)
    plain = cm4.tables(2, 4, 16, "Interleaved1F1B")
    norm = g.fqns.index("norm")
    k = next(k for k in t.allowed[norm] if strategies[k].dp == 2)
    if t.G[norm, k] > 0:  # the after-step all-reduce: never less than the overlapped one
        assert t.G[norm, k] >= plain.G[norm, k] - 1e-15
    assert cm4.profile.overlap_coefficient > 0
    cm0 = CostModel(g, load_cluster("cpu-4"))
    cm0.profile.overlap_coefficient = 0.0
    t0, plain0 = cm0.tables(2, 4, 16, ZB), cm0.tables(2, 4, 16, "Interleaved1F1B")
    fsdp = [
        (u, k)
        for u, row in enumerate(t.allowed)
        for k in row
        if strategies[k].kind == "FSDP" and strategies[k].dp == 2 and t.G[u, k] > 0
    ]
    assert fsdp
    index = {s: k for k, s in enumerate(strategies)}
    for u, k in fsdp:
        # the memory's FSDP part is interleaved 1F1B's (c > 1: whole parameters and gradients
        # next to the shards); the activations follow each schedule's order, so compare
        # against the same layer as a plain replica
        d = index[strategies[k].__class__(2, 1, "DDP")]
        assert t.M[u, k] - t.M[u, d] == pytest.approx(plain.M[u, k] - plain.M[u, d])
        assert t.G[u, k] > plain.G[u, k]  # the reduce-scatter exposed whole
        assert t0.G[u, k] == pytest.approx(plain0.G[u, k])  # ... which is all that differs
    with pytest.raises(
        ConfigError,
        match=r"layer 'norm' has no strategy for micro-batch size 4 on 2 devices per stage "
        r"\(InterleavedZeroBubble runs layers without recompute, with dp = 1, or at tp = 1 "
        r"with kind DDP \(plain replicas\) or FSDP\)",
    ):
        CostModel(g, load_cluster("cpu-4"), kinds=("ZeRO2",)).tables(2, 4, 16, ZB)


def test_weight_gradient_split_analytic_measured_and_old_profiles(caplog) -> None:
    """The analytic split is the FLOP share of the parameter products (gpt-tiny's block: its
    four projections and MLP, not attention; nothing for the embedding's lookup); a measured
    profile reads its ``wgrad_s``, and a profile file without it (older files) gets the FLOP
    share of its measured backward, said in one INFO line; the profiler's input-gradient
    timing is 0 for an embedding and below the whole backward for a Linear."""
    import logging

    import torch
    from test_profiles import fake_profile

    from uniap import models
    from uniap.cluster import load_cluster
    from uniap.graph import build_graph
    from uniap.profiler.compute import time_input_grad, time_layer
    from uniap.profiles import AnalyticProfile
    from uniap.profiles.analytic import weight_grad_fraction
    from uniap.profiles.measured import MeasuredProfile

    m = models.build_model("gpt-tiny", device="meta")
    g = build_graph(m, models.example_batch(m, 2, device="meta")[0], name="gpt-tiny")
    embed, block = g.layers[0], g.layers[1]
    assert 0.0 < block.wgrad_flops_per_sample < block.bwd_flops_per_sample / 2  # attention: B
    assert block.wgrad_flops_per_sample < block.fwd_flops_per_sample
    assert embed.wgrad_flops_per_sample == 0.0  # a lookup: no product
    analytic = AnalyticProfile(load_cluster("cpu-2"))
    fwd, bwd = analytic.layer_compute_s(block, 4, 1)
    w = analytic.weight_grad_s(block, 4, 1)
    assert 0 < w < bwd and w == pytest.approx(
        (bwd - analytic.layer_overhead_s) * weight_grad_fraction(block)
    )
    old = MeasuredProfile.from_dict(fake_profile(g).to_dict())
    assert not any(lp.wgrad_s for lp in old.layers.values())
    with caplog.at_level(logging.INFO, logger="uniap.profiles.measured"):
        for _ in range(2):
            w_old = old.weight_grad_s(block, 4, 1)
    assert w_old == pytest.approx(old.layer_compute_s(block, 4, 1)[1] * weight_grad_fraction(block))
    said = [r for r in caplog.records if "no weight-gradient split" in r.message]
    assert len(said) == 1
    new = fake_profile(g)
    for lp in new.layers.values():
        lp.wgrad_s = {tp: [0.5 * x for x in ys] for tp, ys in lp.bwd_s.items()}
    new = MeasuredProfile.from_dict(new.to_dict())
    assert new.weight_grad_s(block, 4, 1) == pytest.approx(
        0.5 * new.layer_compute_s(block, 4, 1)[1]
    )

    cpu = torch.device("cpu")
    emb = torch.nn.Embedding(64, 32)
    assert time_input_grad(emb, (torch.randint(0, 64, (4, 8)),), cpu, warmup=0, repeats=1) == 0
    lin = torch.nn.Linear(256, 256)
    x = (torch.randn(64, 256),)
    assert 0 < time_input_grad(lin, x, cpu, warmup=1, repeats=3)
    assert time_layer(lin, x, cpu, warmup=1, repeats=3)[1] > 0


def test_timeline_of_a_zero_bubble_plan_is_the_cost_models_schedule() -> None:
    """`uniap show --plot` draws a zero-bubble plan in torch's zero-bubble order with the
    weight gradients apart (it drew interleaved 1F1B without them): every F, B and W of every
    stage and micro-batch, and its compute ends where the cost model's longest path ends;
    `uniap show`'s time breakdown sums to the same TPI."""
    from uniap.planner import plan
    from uniap.plot import timeline
    from uniap.report import plan_report

    p = plan("gpt-tiny", "cpu-2", global_batch_size=16, schedules=[ZB], pp_degrees=[2])
    assert p.schedule == ZB
    pp, v, c = p.pp_degree, p.virtual_stages, p.num_microbatches
    detail = plan_report(p)["stage_detail"]
    ops = timeline(p.schedule, c, detail, v)
    for r, row in enumerate(ops):
        mine = [(k, m) for k, m, _, _ in row if k in "FBW"]
        assert mine == [(k, m) for k, m, _ in zero_bubble_order(pp, v, c, r)]
    end = max(b for row in ops for k, _, _, b in row if k in "FBW")
    f = [d["forward_s"] for d in detail]
    b = [d["backward_s"] for d in detail]
    w = [d["weight_grad_s"] for d in detail]
    link = [d["send_s"] for d in detail[:-1]]
    assert end == pytest.approx(schedule_makespan(ZB, pp, v, c, f, b, w, link), rel=1e-9)
    t, stage_of, strategy_of = preset_plan_tables(p, "cpu-2")  # the drawn compute: the TPI's
    ev = evaluate_assignment(t, stage_of, strategy_of)
    tpi = end + max(ev.sync_time_s) + t.step_overhead_s
    assert tpi == pytest.approx(ev.time_per_iteration_s, rel=1e-9)
    assert tpi == pytest.approx(p.predicted["time_per_iteration_s"], rel=1e-9)
    # the time breakdown sums to it too (the 1F1B formula's bubble over-counted it)
    breakdown = plan_report(p)["time_breakdown_s"]
    assert sum(breakdown.values()) == pytest.approx(tpi, rel=1e-9)
    assert 0 <= breakdown["bubble"] < end


def test_explain_columns_hold_the_long_schedule_name() -> None:
    """`uniap explain` sizes its schedule column to the longest name tried, so each row's
    time ends under the header's (InterleavedZeroBubble pushed its row's columns right)."""
    from uniap.explain import render_explain
    from uniap.planner import plan
    from uniap.report import fmt_seconds

    p = plan("gpt-tiny", "cpu-2", global_batch_size=16, schedules=["1F1B", ZB])
    lines = render_explain(p).splitlines()
    head = next(x for x in lines if "time/iter" in x)
    right = head.index("time/iter") + len("time/iter")
    rows = [r for r in p.solver["best_per_pp"] if r["time_per_iteration_s"] is not None]
    assert {r["schedule"] for r in rows} == {"1F1B", ZB}
    for r in rows:
        t = fmt_seconds(r["time_per_iteration_s"])
        line = next(x for x in lines if f" {r['schedule']} " in x and t in x)
        assert line.index(t) + len(t) == right, (head, line)
