"""CPU offload (the FSDP-offload kind): the cluster's host section, the cost model's terms,
the host-memory constraint, the planner's search with offload when nothing fits without it,
and the planner equal to the enumeration through host-memory limits."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from torch import nn

from uniap.cli import main
from uniap.cluster import Cluster
from uniap.contract import DEVICE_KINDS, OFFLOAD, Strategy
from uniap.cost_model import CostModel, evaluate_assignment
from uniap.errors import ConfigError, InfeasibleError
from uniap.exactness import MLP, optimum_curve, small_cluster, sweep
from uniap.graph import build_graph
from uniap.milp import solve
from uniap.planner import candidate_tables, plan_graph
from uniap.search import compositions, exhaustive

_HOST = {"memory": "1 GiB", "link_bandwidth": "4 GB/s", "optimizer_time_per_param": "2 ns"}


def _host_cluster(nodes: int = 1, per_node: int = 4, **host: str) -> Cluster:
    d = small_cluster(nodes, per_node).to_dict()
    return Cluster.from_dict({**d, "host": {**_HOST, **host}})


def _mlp3():
    with torch.device("meta"):
        m = nn.Sequential(MLP(64, 256), MLP(64, 512), MLP(64, 128))
    return build_graph(m, torch.empty(2, 16, 64, device="meta"), name="mlp3")


# ---------------------------------------------------------------------- cluster
def test_a10_preset_declares_host_memory_link_and_cpu_optimizer() -> None:
    """The 2 x 24 GB preset: datasheet device, Azure NV72ads A10 v5 host."""
    c = Cluster.preset("a10-1x2")
    assert (c.world_size, c.device_memory_bytes) == (2, 24e9)
    assert c.host_memory_bytes == 880 * 2**30 and c.offload_enabled
    assert c.host_link_bandwidth_bytes_per_s == 24e9
    assert c.host_optimizer_s_per_param == pytest.approx(1.4e-9)
    assert Cluster.from_yaml(c.to_yaml()) == c
    assert "host 880 GiB per node" in c.describe()
    assert not Cluster.preset("a100-2x8").offload_enabled  # no host section: no offload


@pytest.mark.parametrize(
    "host,message",
    [
        (
            {"memroy": "1 GiB"},
            "host.memroy: unknown key (did you mean 'memory'?); valid keys here: memory, "
            "link_bandwidth, optimizer_time_per_param",
        ),
        ({"memory": "1 GiB"}, "host.link_bandwidth: missing field; add e.g. link_bandwidth:"),
        ({**_HOST, "memory": 64}, "host.memory"),
        ({**_HOST, "link_bandwidth": "4 GiB"}, "host.link_bandwidth"),
    ],
)
def test_bad_host_section_names_the_field(host: dict, message: str) -> None:
    d = small_cluster(1, 2).to_dict()
    with pytest.raises(ConfigError, match=None) as e:
        Cluster.from_dict({**d, "host": host}, "c.yaml")
    assert message in str(e.value) and str(e.value).startswith("c.yaml: ")


def test_partial_host_fields_in_the_constructor_are_refused() -> None:
    c = small_cluster(1, 2)
    with pytest.raises(ConfigError, match="host_link_bandwidth_bytes_per_s must be a positive"):
        c.replace(host_memory_bytes=1e9)


# ---------------------------------------------------------------------- cost model
def test_offload_terms_are_the_documented_formulas() -> None:
    """One layer, FSDP-offload on dp = 4: device memory is activations only, host memory
    (2 P + O) / dp, per micro-batch two gathers (host-to-device copy + all-gather) and one
    reduce (reduce-scatter + device-to-host copy, synchronous when it accumulates), the CPU
    AdamW step once per iteration."""
    g, cluster = _mlp3(), _host_cluster()
    cm = CostModel(g, cluster, recompute=False, max_tp=1)
    c, b, u = 2, 4, 1
    off = Strategy(4, 1, OFFLOAD)
    fsdp = Strategy(4, 1, "FSDP")
    inflight = [1]
    got = cm.layer_cost(u, off, pp=1, num_microbatches=c, microbatch_size=b, inflight=inflight)
    ref = cm.layer_cost(u, fsdp, pp=1, num_microbatches=1, microbatch_size=b, inflight=inflight)
    layer = g.layers[u]
    rho = cm.profile.overlap_coefficient
    P, n = layer.param_bytes, layer.num_params
    O = n * cm.opt_bytes  # noqa: E741 - the docstring's name
    shard_s = n / 4 * 4 / 4e9  # fp32 master shard over the 4 GB/s host link
    ag = cm._group_time("all_gather", P, "dp", 1, 4, 1)
    rs = cm._group_time("reduce_scatter", P, "dp", 1, 4, 1)
    fwd, bwd = cm.profile.layer_compute_s(layer, b / 4, 1)
    # c = 2: the copy-out of an accumulating gradient is synchronous, charged whole
    fsdp_s = (1 - rho) * (2 * (shard_s + ag) + rs) + shard_s + max(rho * rs - bwd, 0.0)
    assert got.per_microbatch_s == pytest.approx(fwd + bwd + fsdp_s)
    one = cm.layer_cost(u, off, pp=1, num_microbatches=1, microbatch_size=b, inflight=inflight)
    red = rs + shard_s  # c = 1: the copy-out overlaps like the reduce-scatter
    fsdp_s = (1 - rho) * (2 * (shard_s + ag) + red) + max(rho * red - bwd, 0.0)
    assert one.per_microbatch_s == pytest.approx(fwd + bwd + fsdp_s)
    assert one.first_exposed_s == pytest.approx(min(rho * red, bwd))
    assert got.per_iteration_s == pytest.approx(n / 4 * 4 * 2e-9)  # 4 ranks share the CPUs
    assert got.first_exposed_s == pytest.approx(min(rho * rs, bwd))
    assert got.host_bytes == pytest.approx((2 * P + O) / 4)
    activations = ref.memory_bytes[0] - (2 * P + O) / 4
    assert got.memory_bytes[0] == pytest.approx(activations)
    assert got.parts["param_bytes"] == got.parts["optimizer_bytes"] == 0.0


def test_offload_on_one_device_moves_the_whole_layer_and_casts_in_fsdp2() -> None:
    """FSDP-offload at dp = 1: no collective (one rank), the host copies move the whole
    layer, the host holds 2 P + O; under bf16-mixed no autocast copy of the weights per
    micro-batch in flight (FSDP2 casts them), which plain dp = 1 layers hold."""
    from uniap.precision import resolve_precision

    with torch.device("meta"):
        m = nn.Sequential(MLP(64, 256), MLP(64, 512), MLP(64, 128))
    x = torch.empty(2, 16, 64, device="meta")
    g = build_graph(m, x, name="mlp3", dtype=torch.bfloat16)
    d = _host_cluster(1, 2).to_dict()
    d["device"]["peak_flops"]["bfloat16"] = "100 GFLOP/s"
    cluster = Cluster.from_dict(d)
    cm = CostModel(g, cluster, recompute=False, precision=resolve_precision("bf16-mixed"))
    c, b, u, inflight = 2, 4, 1, [2]
    off, ddp = Strategy(1, 1, OFFLOAD), Strategy(1, 1, "DDP")
    got = cm.layer_cost(u, off, pp=2, num_microbatches=c, microbatch_size=b, inflight=inflight)
    plain = cm.layer_cost(u, ddp, pp=2, num_microbatches=c, microbatch_size=b, inflight=inflight)
    layer = g.layers[u]
    n = layer.num_params
    P = n * 2  # bf16 parameters
    master = 2 * P + n * cm.opt_bytes  # 16 bytes per parameter under bf16-mixed (2 P + O)
    assert master == 16 * n
    rho = cm.profile.overlap_coefficient
    shard_s = n * 4 / 4e9  # the whole fp32 master copy over the 4 GB/s host link
    fwd, bwd = cm.profile.layer_compute_s(layer, b, 1)
    fsdp_s = (1 - rho) * 2 * shard_s + shard_s  # c = 2: the copy-out charged whole
    assert got.per_microbatch_s == pytest.approx(fwd + bwd + fsdp_s)
    assert got.host_bytes == pytest.approx(master)
    # plain: the master state on the device and one bf16 copy per micro-batch in flight
    assert plain.memory_bytes[0] - got.memory_bytes[0] == pytest.approx(master + 2 * P)


def test_offload_is_offered_only_with_host_memory() -> None:
    g = _mlp3()
    plain = CostModel(g, small_cluster(1, 4))
    assert OFFLOAD not in {s.kind for s in plain.strategies(1)}
    with pytest.raises(ConfigError, match="declares none; add a host section"):
        CostModel(g, small_cluster(1, 4), kinds=["FSDP", OFFLOAD])
    kinds = {(s.kind, s.tp) for s in CostModel(g, _host_cluster(), max_tp=4).strategies(1)}
    assert (OFFLOAD, 1) in kinds and (OFFLOAD, 2) not in kinds and (OFFLOAD, 4) not in kinds
    # stages of one device (dp = 1): plain, or the whole layer's state offloaded
    assert {s.kind for s in plain.strategies(4)} == {"DDP"}
    one = CostModel(g, _host_cluster()).strategies(4)
    assert {(s.kind, s.dp, s.tp) for s in one} == {("DDP", 1, 1), (OFFLOAD, 1, 1)}


def test_host_memory_limit_is_a_constraint_of_the_program() -> None:
    """Below the host bytes of the all-offload assignment it does not fit; the MILP then
    keeps some layer on the device, and its optimum equals the enumeration's."""
    g = _mlp3()
    cm = CostModel(g, _host_cluster(), recompute=False, max_tp=1, kinds=["FSDP", OFFLOAD])
    t = cm.tables(1, 2, 8)
    k_off = next(k for k, s in enumerate(t.strategies) if s.kind == OFFLOAD)
    all_off = [k_off] * 3
    ev = evaluate_assignment(t, [0] * 3, all_off)
    host = ev.host_node_bytes  # the node's 4 ranks, each with its shards
    assert ev.host_memory_bytes == [pytest.approx(float(t.Mh[:, k_off].sum()))] and ev.fits
    assert host == pytest.approx(4 * ev.host_memory_bytes[0])
    tight = dataclasses.replace(t, host_limit_bytes=host * 0.99, memory_limit_bytes=1e12)
    assert not evaluate_assignment(tight, [0] * 3, all_off).fits
    best = exhaustive(tight)
    sol = solve(tight)
    assert sol.status == "optimal" and sol.strategy_of != all_off
    assert sol.time_per_iteration_s == pytest.approx(best[0], rel=1e-9)


# ---------------------------------------------------------------------- planner
def test_llama7b_on_two_24gb_gpus_gets_an_offload_plan(capsys: pytest.CaptureFixture) -> None:
    """The 2 x 24 GB preset: no plan fits on the devices alone; `uniap plan` returns one
    with FSDP-offload layers."""
    code = main(
        [
            "plan",
            "--model",
            "llama-7b",
            "--cluster",
            "a10-1x2",
            "--global-batch-size",
            "8",
            "--precision",
            "bf16-mixed",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "FSDP-offload" in out, out


def test_llama7b_on_one_24gb_gpu_gets_an_offload_plan(tmp_path, capsys) -> None:
    """One A10 (24 GB), 880 GiB of host memory: Llama-7B's training state (112 GB) fits no
    device plan; the planner offloads it (dp = 1: the whole state on the host, ZeRO-Offload
    on one GPU) instead of saying that no plan fits."""
    d = Cluster.preset("a10-1x2").to_dict()
    path = tmp_path / "a10-1x1.yaml"
    path.write_text(Cluster.from_dict({**d, "name": "a10-1x1", "devices_per_node": 1}).to_yaml())
    out_plan = tmp_path / "plan.yaml"
    args = ["plan", "--model", "llama-7b", "--cluster", str(path), "--global-batch-size", "8"]
    code = main([*args, "--precision", "bf16-mixed", "--out", str(out_plan)])
    cap = capsys.readouterr()
    out = cap.out + cap.err
    assert code == 0, out
    from uniap.contract import Plan

    plan = Plan.load(out_plan)
    assert plan.world_size == 1
    assert {ls.dp for ls in plan.layer_strategies} == {1}
    assert "no plan fits without CPU offload" in out and "FSDP-offload" in out, out
    assert sum(ls.kind == OFFLOAD for ls in plan.layer_strategies) >= 20, out
    # the candidates no program ran for are counted, so that none goes unmentioned
    pruned = sum(c["status"] == "pruned" for c in plan.solver["candidates"])
    n = len(plan.solver["candidates"])
    assert f"{pruned} of {n} candidates settled by their lower bounds" in out and pruned, out
    pred = plan.predicted
    assert max(pred["peak_memory_bytes"]) <= pred["memory_limit_bytes"]
    assert pred["host_memory_bytes"] <= pred["host_memory_limit_bytes"]


def _host_limits(graph, cluster, opts) -> list[float]:
    """The host bytes of every assignment's fullest node, over every candidate."""
    cm = CostModel(graph, cluster, max_tp=opts.get("max_tp"), recompute=opts["recompute"])
    values = set()
    for _, _, _, t in candidate_tables(cm, opts["pp_degrees"], 8, opts["num_microbatches"]):
        for stage_of in compositions(t.num_layers, t.pp):
            for strategy_of in itertools.product(*t.allowed):
                ev = evaluate_assignment(t, stage_of, list(strategy_of))
                values.add(ev.host_node_bytes)
    return sorted(values)


def test_planner_equals_enumeration_through_host_memory_limits() -> None:
    """Device memory below every plan without offload: at every host-memory limit where the
    optimum changes (and just below it) the planner, searching with offload because nothing
    else fits, returns exactly the exhaustive optimum over every kind, or InfeasibleError
    exactly when nothing fits."""
    g = _mlp3()
    opts = {"recompute": False, "max_tp": 1, "pp_degrees": [1, 2], "num_microbatches": [1, 2]}
    base = _host_cluster()
    curve = optimum_curve(g, base, global_batch_size=8, kinds=DEVICE_KINDS, **opts)
    cluster = base.with_memory(curve[0][0] * 0.95 / 0.9)  # no plan without offload fits
    with pytest.raises(InfeasibleError):
        plan_graph(g, cluster, global_batch_size=8, kinds=DEVICE_KINDS, **opts)
    limits = [v * f for v in _host_limits(g, cluster, opts) if v > 0 for f in (1 - 1e-6, 1)]
    assert len(limits) >= 6
    checks = 0
    for limit in limits:
        c = cluster.replace(host_memory_bytes=limit / 0.9)
        cm = CostModel(g, c, max_tp=1, recompute=False)
        expected = min(
            exhaustive(t)[0]
            for *_, t in candidate_tables(cm, opts["pp_degrees"], 8, opts["num_microbatches"])
        )
        try:
            p = plan_graph(g, c, global_batch_size=8, **opts)  # default kinds: offload as needed
            got = p.predicted["time_per_iteration_s"]
            assert p.solver["status"] == "optimal"
            assert any(ls.kind == OFFLOAD for ls in p.layer_strategies)
            pred = p.predicted
            assert pred["host_memory_bytes"] <= pred["host_memory_limit_bytes"] * (1 + 1e-9)
            assert pred["host_memory_limit_bytes"] == pytest.approx(limit)
        except InfeasibleError:
            got = math.inf
        assert got == pytest.approx(expected, rel=1e-6) or got == expected == math.inf, limit
        checks += 1
    assert checks == len(limits)


def test_planner_equals_enumeration_at_every_device_memory_breakpoint_with_offload() -> None:
    """The full space (DDP, FSDP, FSDP-offload asked for explicitly) at every device-memory
    limit where the optimum changes: from all-DDP through mixes to all-offload, the planner
    equals the enumeration."""
    g = _mlp3()
    opts = {"recompute": False, "max_tp": 1, "pp_degrees": [1, 2], "num_microbatches": [1, 2]}
    opts["kinds"] = ["DDP", "FSDP", OFFLOAD]
    checks = sweep(g, _host_cluster(), global_batch_size=8, **opts)
    assert len(checks) >= 8 and [c for c in checks if not c.ok] == []
    lean = optimum_curve(g, _host_cluster(), global_batch_size=8, **opts)[0][0]
    p = plan_graph(g, _host_cluster().with_memory(lean / 0.9), global_batch_size=8, **opts)
    assert {ls.kind for ls in p.layer_strategies} == {OFFLOAD}  # the leanest plan offloads


def test_planner_equals_enumeration_with_offload_on_stages_of_one_device() -> None:
    """2 devices, pp = 1 and 2 (pp = 2: stages of one device, where offload is the one
    kind besides plain DDP): at every device-memory limit where the optimum changes the
    planner equals the enumeration, and the leanest plan offloads at dp = 1."""
    g = _mlp3()
    opts = {"recompute": False, "max_tp": 1, "pp_degrees": [1, 2], "num_microbatches": [1, 2]}
    opts["kinds"] = ["DDP", "FSDP", OFFLOAD]
    cluster = _host_cluster(1, 2)
    checks = sweep(g, cluster, global_batch_size=8, **opts)
    assert len(checks) >= 6 and [c for c in checks if not c.ok] == []
    curve = optimum_curve(
        g,
        cluster,
        global_batch_size=8,
        pp_degrees=[2],
        **{k: v for k, v in opts.items() if k != "pp_degrees"},
    )
    lean = curve[0][0]
    p = plan_graph(
        g, cluster.with_memory(lean / 0.9), global_batch_size=8, **{**opts, "pp_degrees": [2]}
    )
    assert {(ls.kind, ls.dp) for ls in p.layer_strategies} == {(OFFLOAD, 1)}


def test_too_little_host_memory_says_so() -> None:
    """Device memory that only offload fits, host memory that no offload plan fits: the error
    names host memory, not device memory."""
    g = _mlp3()
    opts = {"recompute": False, "max_tp": 1, "pp_degrees": [1], "num_microbatches": [1]}
    curve = optimum_curve(g, _host_cluster(), global_batch_size=8, kinds=DEVICE_KINDS, **opts)
    cluster = _host_cluster(memory="1 KiB").with_memory(curve[0][0] * 0.95 / 0.9)
    with pytest.raises(InfeasibleError, match="no plan fits in host memory: plans that fit the"):
        plan_graph(g, cluster, global_batch_size=8, **opts)


@pytest.mark.parametrize("dp,tp", [(2, 2), (1, 4)])
def test_plan_refuses_offload_with_tp(dp: int, tp: int) -> None:
    from uniap.contract import LayerStrategy, Plan, Stage

    stage = Stage((0, 1, 2, 3), (LayerStrategy("a", Strategy(dp, tp, OFFLOAD)),))
    message = (
        f"invalid plan: layer 'a': FSDP-offload needs tp = 1, got tp = {tp}; offload the layer "
        "data parallel only, or keep its TP with another kind"
    )
    with pytest.raises(ConfigError) as e:
        Plan("m", "sig", 1, 4, 8, 1, "1F1B", (stage,))
    assert str(e.value) == message


def test_plan_accepts_offload_on_a_stage_of_one_device() -> None:
    from uniap.contract import LayerStrategy, Plan, Stage

    stages = tuple(
        Stage((i,), (LayerStrategy(f"l{i}", Strategy(1, 1, OFFLOAD if i else "DDP")),))
        for i in range(2)
    )
    plan = Plan("m", "sig", 2, 2, 8, 2, "1F1B", stages)
    assert Plan.from_dict(plan.to_dict()) == plan
    assert plan.layer_strategies[1].strategy.offloaded


def test_verify_refuses_tables_where_host_memory_may_bind() -> None:
    """The independent DP tracks no host memory: it answers only where the host limit cannot
    bind (then it equals the enumeration) and refuses the rest."""
    from uniap.verify import optimum

    g = _mlp3()
    cm = CostModel(g, _host_cluster(), recompute=False, max_tp=1, kinds=["FSDP", OFFLOAD])
    t = cm.tables(1, 2, 8)
    assert optimum(t).time_per_iteration_s == pytest.approx(exhaustive(t)[0], rel=1e-9)
    tight = dataclasses.replace(t, host_limit_bytes=float(t.Mh.max()))
    with pytest.raises(ValueError, match="does not track host memory"):
        optimum(tight)


def test_host_constraint_counts_each_stages_ranks_on_each_node() -> None:
    """3 nodes x 2 devices, pp = 2 (stages of 3 ranks): node 1 holds one rank of each stage,
    so its host bytes are one stage-0 rank's plus one stage-1 rank's."""
    g = _mlp3()
    cluster = _host_cluster(3, 2)
    cm = CostModel(g, cluster, recompute=False, max_tp=1, kinds=["DDP", OFFLOAD])
    t = cm.tables(2, 1, 6)
    assert t.host_ranks.tolist() == [[0, 2], [1, 1], [2, 0]]
    assert t.host_limit_bytes == pytest.approx(2**30 * 0.9)
    k_off = next(k for k, s in enumerate(t.strategies) if s.kind == OFFLOAD)
    k_ddp = next(k for k, s in enumerate(t.strategies) if s.kind == "DDP")
    ev = evaluate_assignment(t, [0, 1, 1], [k_off, k_ddp, k_off])
    h0, h2 = float(t.Mh[0, k_off]), float(t.Mh[2, k_off])
    assert ev.host_memory_bytes == [pytest.approx(h0), pytest.approx(h2)]
    assert ev.host_node_bytes == pytest.approx(max(2 * h0, h0 + h2, 2 * h2))


def test_no_plan_without_host_section_suggests_one() -> None:
    g = _mlp3()
    opts = {"recompute": False, "max_tp": 1, "pp_degrees": [1], "num_microbatches": [1]}
    with pytest.raises(InfeasibleError, match="or a host section in the cluster YAML, to plan"):
        plan_graph(g, small_cluster(1, 4).with_memory(1000.0), global_batch_size=8, **opts)
