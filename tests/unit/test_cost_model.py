"""The cost model: plans' predictions are its evaluation, shared rows are exact, and a strategy
a layer may not use is one ConfigError naming the layer and the rule."""

from __future__ import annotations

import pytest
import torch
from _tables import synthetic_graph
from torch import nn

from uniap.cluster import Cluster, load_cluster
from uniap.contract import LayerStrategy, Plan, Stage, Strategy
from uniap.cost_model import CostModel
from uniap.errors import ConfigError
from uniap.exactness import MLP, small_cluster
from uniap.graph import ModelGraph, build_graph
from uniap.planner import plan


def _cluster(nodes: int, per_node: int = 1) -> Cluster:
    return small_cluster(nodes, per_node)


def _chain3():
    """The 3-layer chain of test_exactness (seed 3)."""
    import numpy as np

    rng = np.random.default_rng(3)
    blocks = [
        nn.LayerNorm(64) if rng.random() < 0.25 else MLP(64, int(rng.choice([64, 256, 1024])))
        for _ in range(int(rng.integers(3, 7)))
    ]
    with torch.device("meta"):
        m = nn.Sequential(*blocks)
    return build_graph(m, torch.empty(2, 16, 64, device="meta"), name="chain3")


@pytest.mark.parametrize(
    "model,cluster,batch",
    [
        ("gpt-tiny", "cpu-4", 16),
        ("t5-tiny", "cpu-4", 8),
        ("swin-tiny", "cpu-2", 8),
        ("llama-7b", "a100-2x8", 64),
        ("bert-huge", "a100-pcie-2x8", 64),
    ],
)
def test_predicted_tpi_equals_cost_model_evaluate(model: str, cluster: str, batch: int) -> None:
    """The plan's predicted TPI and memory are CostModel.evaluate() of the plan."""
    p = plan(model, cluster, global_batch_size=batch)
    from uniap import models
    from uniap.graph import build_graph

    m = models.build_model(model, device="meta")
    # the plan's precision (bf16-mixed by default on the GPU presets): the graph in its dtype
    dtype = getattr(__import__("torch"), p.precision.param_dtype)
    graph = build_graph(
        m, models.example_batch(model, 2, device="meta")[0], name=model, dtype=dtype
    )
    ev = CostModel(graph, load_cluster(cluster), precision=p.precision).evaluate(p)
    assert ev.time_per_iteration_s == pytest.approx(p.predicted["time_per_iteration_s"], rel=1e-12)
    assert ev.peak_memory_bytes == pytest.approx(p.predicted["peak_memory_bytes"], rel=1e-12)
    assert ev.fits


def test_identical_layers_share_rows_exactly() -> None:
    """Cost tables computed once per distinct layer equal the tables computed layer by layer."""
    import dataclasses

    import numpy as np

    base = synthetic_graph(4, 2)
    layers = list(base.layers)
    layers = (
        layers[:2] + [dataclasses.replace(layers[1], fqn=f"rep.{j}") for j in range(3)] + layers[2:]
    )
    graph = ModelGraph("repeated", tuple(layers))
    cluster = load_cluster("cpu-4")
    fast, slow = CostModel(graph, cluster), CostModel(graph, cluster)
    slow._rep = list(range(graph.num_layers))  # no sharing
    assert fast._representatives() != slow._rep
    for pp, c in [(1, 1), (1, 2), (2, 2), (2, 4), (4, 8)]:
        a, b = fast.tables(pp, c, 8), slow.tables(pp, c, 8)
        for name in ("A", "G", "M", "layout", "R", "Rp"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        for part in a.breakdown:
            np.testing.assert_array_equal(a.breakdown[part], b.breakdown[part])
        assert a.allowed == b.allowed


def _plan_with(graph, world: int, layers: list[LayerStrategy], c: int = 1) -> Plan:
    return Plan(
        model_name=graph.name,
        model_signature=graph.signature,
        num_layers=graph.num_layers,
        world_size=world,
        global_batch_size=8,
        num_microbatches=c,
        schedule="1F1B",
        stages=(Stage(layers=tuple(layers), ranks=tuple(range(world))),),
    )


def test_evaluate_rejects_illegal_strategies_with_one_error() -> None:
    """A strategy a layer may not use is a ConfigError naming the layer and the rule (it gave
    NaN with fits=True, or inf), for c = 1 and c > 1."""
    with torch.device("meta"):
        m = nn.Sequential(MLP(64, 256), nn.LayerNorm(64), nn.Linear(64, 64), MLP(64, 128))
    graph = build_graph(m, torch.empty(2, 16, 64, device="meta"), name="mixed")
    cm = CostModel(graph, _cluster(2, 2), max_tp=2)
    fqns = graph.fqns
    norm = next(f for f, layer in zip(fqns, graph.layers) if not layer.tp_pairs)
    for c in (1, 2):
        layers = [
            LayerStrategy(f, Strategy(2 if f == norm else 4, 2 if f == norm else 1)) for f in fqns
        ]
        with pytest.raises(
            ConfigError, match=rf"layer '{norm}' may not use dp2 tp2 DDP: tensor parallelism"
        ):
            cm.evaluate(_plan_with(graph, 4, layers, c))
    lean = [f for f in fqns if not any(s.recompute for s in cm.allowed_strategies(f, 1, 1, 8))]
    assert lean, "some layer of the chain keeps too little for recompute to pay"
    layers = [LayerStrategy(f, Strategy(4, 1, "FSDP", recompute=(f == lean[0]))) for f in fqns]
    with pytest.raises(
        ConfigError,
        match=rf"layer '{lean[0]}' may not use dp4 tp1 FSDP \+ckpt: recompute saves no memory",
    ):
        cm.evaluate(_plan_with(graph, 4, layers))
    layers = [LayerStrategy(f, Strategy(1, 4)) for f in fqns]
    with pytest.raises(
        ConfigError, match=r"strategy dp1 tp4 DDP is not offered on a stage of 4 devices"
    ):
        cm.evaluate(_plan_with(graph, 4, layers))


def test_allowed_strategies_is_what_the_tables_offer() -> None:
    """CostModel.allowed_strategies lists exactly the strategies of the cost tables' rows."""
    graph = _chain3()
    cm = CostModel(graph, _cluster(2, 2), max_tp=2)
    for pp, c in ((1, 1), (1, 2), (2, 2)):
        t = cm.tables(pp, c, 8)
        for u, fqn in enumerate(graph.fqns):
            assert cm.allowed_strategies(fqn, pp, c, 8) == [t.strategies[k] for k in t.allowed[u]]
    with pytest.raises(ConfigError, match="unknown layer 'nope'"):
        cm.allowed_strategies("nope", 1, 1, 8)


def _blocks(n: int, d: int = 64, h: int = 1024) -> ModelGraph:
    with torch.device("meta"):
        m = nn.Sequential(*[MLP(d, h) for _ in range(n)])
    return build_graph(m, torch.empty(2, 16, d, device="meta"), name=f"mlp{n}")


def _serial_stream_exposure(hideable_s: list[float], backward_s: list[float]) -> float:
    """When the last hideable collective of a stage ends after its backward: a serial stream,
    the collective of layer v released when its backward is done (last layer first)."""
    clock = comm = 0.0
    for h, b in zip(reversed(hideable_s), reversed(backward_s)):
        clock += b
        comm = max(comm, clock) + h
    return max(comm - clock, 0.0)


@pytest.mark.parametrize("microbatch", [1, 2, 16])
@pytest.mark.parametrize("kind", ["DDP", "FSDP"])
def test_gradient_sync_longer_than_backward_is_exposed(kind: str, microbatch: int) -> None:
    """Micro-batches of 1-2 samples on a slow network: each layer's gradient sync outlasts its
    backward, and the stage's sync time is what a serial stream gives (not ``(1 - rho) S``);
    with 16 samples the backward covers it but for the stage's first layer."""
    n, batch = 4, 4 * microbatch
    cm = CostModel(_blocks(n), small_cluster(4, 1, inter_gbit_s=1), recompute=False)
    t = cm.tables(1, 1, batch)
    k = next(j for j, s in enumerate(t.strategies) if (s.dp, s.tp, s.kind) == (4, 1, kind))
    rho = cm.profile.overlap_coefficient
    costs = [
        cm.layer_cost(
            u, t.strategies[k], pp=1, num_microbatches=1, microbatch_size=batch, inflight=[1]
        )
        for u in range(n)
    ]
    bwd = [cm.profile.layer_compute_s(cm.graph.layers[u], batch / 4, 1)[1] for u in range(n)]
    bwd[-1] += cm.profile.loss_s(cm.graph.layers[-1], batch / 4)
    op = "all_reduce" if kind == "DDP" else "reduce_scatter"
    p_bytes = cm.graph.layers[0].param_bytes
    if kind == "DDP":  # classic DDP: the layer's share of 25 MiB buckets
        from uniap.contract import DDP_BUCKET_BYTES

        s_one = p_bytes / DDP_BUCKET_BYTES * cm._group_time(op, DDP_BUCKET_BYTES, "dp", 1, 4, 1)
    else:
        s_one = cm._group_time(op, p_bytes, "dp", 1, 4, 1)
    full = [s_one] * n
    expected = sum((1 - rho) * s for s in full) + _serial_stream_exposure(
        [rho * s for s in full], bwd
    )
    ev = cm.evaluate(_one_stage_plan(cm, Strategy(4, 1, kind), batch))
    opt = sum(c.parts["optimizer"] for c in costs)
    assert ev.sync_time_s[0] - opt == pytest.approx(expected, rel=1e-9)
    if microbatch <= 2:  # the sync outlasts the backward: more than (1 - rho) S + one layer's
        assert rho * s_one > max(bwd)
        assert ev.sync_time_s[0] - opt > sum((1 - rho) * s for s in full) + rho * s_one
    else:  # the backward covers all but the first layer's
        assert rho * s_one < min(bwd)
        assert ev.sync_time_s[0] - opt == pytest.approx(sum(full) - (n - 1) * rho * s_one)


def _one_stage_plan(cm: CostModel, s: Strategy, batch: int) -> Plan:
    g = cm.graph
    return Plan(
        model_name=g.name,
        model_signature=g.signature,
        num_layers=g.num_layers,
        world_size=cm.cluster.world_size,
        global_batch_size=batch,
        num_microbatches=1,
        schedule="1F1B",
        stages=(
            Stage(tuple(range(cm.cluster.world_size)), tuple(LayerStrategy(f, s) for f in g.fqns)),
        ),
    )


@pytest.mark.parametrize("c", [1, 2])
def test_zero2_memory_and_communication_terms(c: int) -> None:
    """ZeRO2 holds whole parameters next to sharded gradients and optimizer state, gathers once
    per iteration (hidden by rho with c == 1, whole in the sync with c > 1) and reduce-scatters
    in every micro-batch; its memory is below DDP's, above FSDP's with one micro-batch and below
    it with several."""
    cm = CostModel(_blocks(2), small_cluster(4, 1), recompute=False)
    layer, rho = cm.graph.layers[0], cm.profile.overlap_coefficient
    p_bytes, dp = layer.param_bytes, 4
    o_bytes = layer.num_params * cm.opt_bytes

    def cost(kind: str):
        return cm.layer_cost(
            0, Strategy(dp, 1, kind), pp=1, num_microbatches=c, microbatch_size=8, inflight=[1]
        )

    z, f, d = cost("ZeRO2"), cost("FSDP"), cost("DDP")
    act = cm.profile.activation_bytes(layer, 8 / dp, 1)
    assert z.memory_bytes[0] == pytest.approx(p_bytes + (2 * p_bytes + o_bytes) / dp + act)
    assert (z.parts["param_bytes"], z.parts["grad_bytes"], z.parts["optimizer_bytes"]) == (
        pytest.approx(p_bytes + p_bytes / dp),
        pytest.approx(p_bytes / dp),
        pytest.approx(o_bytes / dp),
    )
    if c == 1:  # FSDP reshards after forward
        assert f.memory_bytes[0] < z.memory_bytes[0] < d.memory_bytes[0]
    else:  # FSDP keeps whole parameters and gradients across micro-batches
        assert z.memory_bytes[0] < f.memory_bytes[0] < d.memory_bytes[0]
    ag = cm._group_time("all_gather", p_bytes, "dp", 1, dp, 1)
    rs = cm._group_time("reduce_scatter", p_bytes, "dp", 1, dp, 1)
    bwd = cm.profile.layer_compute_s(layer, 8 / dp, 1)[1]
    per_microbatch = (1 - rho) * rs + max(rho * rs - bwd, 0.0) + (1 - rho) * ag * (c == 1)
    assert z.parts["fsdp_comm"] == pytest.approx(per_microbatch)
    assert z.parts["dp_sync"] == pytest.approx(ag if c > 1 else 0.0)
    assert z.first_exposed_s == pytest.approx(min(rho * rs, bwd))
    assert z.parts["optimizer"] == pytest.approx(f.parts["optimizer"])


def test_kinds_restrict_the_strategies_offered() -> None:
    """``kinds`` offers only those data-parallel kinds (dp == 1 stays DDP); an unknown kind is
    one ConfigError naming the known ones."""
    g = _blocks(2)
    every = CostModel(g, small_cluster(4, 1), recompute=False).strategies(1)
    assert [str(s) for s in every if s.tp == 1] == [
        "dp4xtp1-DDP",
        "dp4xtp1-FSDP",
        "dp4xtp1-ZeRO2",
    ]
    two = CostModel(g, small_cluster(4, 1), recompute=False, kinds=["FSDP", "ZeRO2"])
    assert {s.kind for s in two.strategies(1)} == {"FSDP", "ZeRO2"}
    assert {s.kind for s in two.strategies(4)} == {"DDP"}  # one device per stage
    with pytest.raises(
        ConfigError,
        match=r"choose one or more of \['DDP', 'FSDP', 'ZeRO2', 'HSDP', 'FSDP-offload'\]",
    ):
        CostModel(g, small_cluster(4, 1), kinds=["ZeRO3"])


@pytest.mark.parametrize("c", [1, 2])
def test_hsdp_terms_shard_inside_a_node_and_all_reduce_across(c: int) -> None:
    """HSDP with shard groups of 2 on 2 x 2 devices: gathers and reduce-scatters on the
    intra-node pair, the reduced shard all-reduced across the nodes; state sharded by 2."""
    cm = CostModel(_blocks(2), small_cluster(2, 2), recompute=False)
    assert [str(s) for s in cm.strategies(1) if s.kind == "HSDP"] == ["dp4xtp1-HSDP2"]
    layer, rho = cm.graph.layers[0], cm.profile.overlap_coefficient
    p_bytes = layer.param_bytes
    o_bytes = layer.num_params * cm.opt_bytes
    h = cm.layer_cost(
        0,
        Strategy(4, 1, "HSDP", False, 2),
        pp=1,
        num_microbatches=c,
        microbatch_size=8,
        inflight=[1],
    )
    ag = cm.profile.collective_s("all_gather", p_bytes, [0, 1])
    sync = cm.profile.collective_s("reduce_scatter", p_bytes, [0, 1])
    sync += cm.profile.collective_s("all_reduce", p_bytes / 2, [0, 2])
    bwd = cm.profile.layer_compute_s(layer, 2, 1)[1]
    exposed = (1 - rho) * sync + max(rho * sync - bwd, 0.0) + (ag if c > 1 else 0.0)
    assert h.parts["dp_sync"] == pytest.approx(exposed)
    assert h.parts["fsdp_comm"] == pytest.approx((1 - rho) * 2 * ag if c == 1 else 0.0)
    act = cm.profile.activation_bytes(layer, 2, 1)
    whole = 2 * p_bytes if c > 1 else 0.0
    assert h.memory_bytes[0] == pytest.approx(whole + (2 * p_bytes + o_bytes) / 2 + act)


def _vocab_gpt():
    """A GPT-style model whose embedding and head (vocabulary 64) can take tp = 2."""
    from uniap.models import GPT, GPTConfig

    with torch.device("meta"):
        m = GPT(GPTConfig(vocab_size=64, seq_len=8, dim=32, n_layers=2, n_heads=4))
    return build_graph(m, torch.zeros(2, 8, dtype=torch.long, device="meta"), name="vocab-gpt")


def test_vocabulary_parallel_embedding_and_head_costs() -> None:
    """Embedding at tp=2: one all-reduce of its output [b, s, h] (forward), the token table
    halved, the position table whole. Head at tp=2: one all-reduce of its input's gradient
    [b, s, h] (backward) plus loss parallel's three fp32 all-reduces per token, its weight
    halved, the loss's logits copy halved, its working memory the tp = 1 loss's and one more
    logits-shaped temporary, each halved (uniap.profiles.analytic.loss_parallel_bytes)."""
    graph = _vocab_gpt()
    cm = CostModel(graph, _cluster(1, 2), max_tp=2)
    profile, b, group = cm.profile, 4, [0, 1]
    tp2 = Strategy(1, 2, "DDP")
    embed, head = graph.layers[0], graph.layers[-1]
    ar = lambda nbytes: profile.collective_s("all_reduce", nbytes, group)  # noqa: E731
    cost = cm.layer_cost(0, tp2, pp=1, num_microbatches=1, microbatch_size=b, inflight=[1])
    assert cost.parts["tp_comm"] == pytest.approx(ar(b * 8 * 32 * 4))
    token, position = 64 * 32 * 4, 8 * 32 * 4
    assert embed.param_bytes == token + position
    assert cost.parts["param_bytes"] == pytest.approx(token / 2 + position)
    assert cost.parts["optimizer_bytes"] == pytest.approx((64 * 32 / 2 + 8 * 32) * 8)
    last = graph.num_layers - 1
    cost = cm.layer_cost(last, tp2, pp=1, num_microbatches=2, microbatch_size=b, inflight=[2])
    assert cost.parts["tp_comm"] == pytest.approx(ar(b * 8 * 32 * 4) + 3 * ar(4 * 8 * b))
    assert cost.parts["param_bytes"] == head.param_bytes / 2 == 32 * 64 * 4 / 2
    logits = b * 8 * 64 * 4  # [b, s, V] fp32
    static = 2 * head.param_bytes / 2 + head.num_params / 2 * 8
    # two micro-batches in flight: their saved inputs (replicated), one loss copy of the
    # logits held, plus the loss's working memory (analytic: the logits and their gradient,
    # and loss parallel's shifted logits), the logits V / 2 wide on a rank
    expected = static + 2 * head.saved_bytes_per_sample * b + logits / 2 + 3 * logits / 2
    assert cost.memory_bytes[0] == pytest.approx(expected)
    assert profile.loss_working_bytes(head, b, 1) == pytest.approx(2 * logits)
    assert profile.loss_working_bytes(head, b, 2) == pytest.approx(3 * logits / 2)


def _evaluate_by_loop(t, stage_of, strategy_of):
    """The sums of :func:`uniap.cost_model.evaluate_assignment` written as its definition, one
    layer after the other: ``(p, o, s, mem, host)``."""
    V, pp, L = t.num_stages, t.pp, t.num_layers
    p, o = [0.0] * V, [0.0] * max(V - 1, 0)
    s, first, mem, host = [0.0] * pp, [0.0] * pp, [0.0] * pp, [0.0] * pp
    for u in range(L):
        i, k = stage_of[u], strategy_of[u]
        r = i % pp
        if k not in t.allowed[u]:
            p[i] = float("inf")
            continue
        p[i] += float(t.A[u, k])
        s[r] += float(t.G[u, k])
        first[r] = max(first[r], float(t.F[u, k]))
        mem[r] += float(t.M[u, k, i])
        host[r] += float(t.Mh[u, k])
        if u + 1 < L:
            a, b = t.layout[u, k], t.layout[u + 1, strategy_of[u + 1]]
            if stage_of[u + 1] == i:
                p[i] += float(t.R[u, a, b])
            else:
                o[i] += float(t.Rp[u, a, b])
    p = [x + t.stage_overhead_s for x in p]
    s = [x + f for x, f in zip(s, first)]
    return p, o, s, mem, host


@pytest.mark.parametrize("v", [1, 2])
def test_evaluation_sums_equal_the_per_layer_loop_bit_for_bit(v: int) -> None:
    """The evaluation's numpy sums (stage and link times, syncs, memory, host memory) are the
    per-layer loop's to the last bit, in the loop's order, on random tables and assignments
    of 40 layers, some with a strategy the layer may not use (an infinite stage time). The
    planner's exactness rests on one function scoring every plan the same way."""
    import numpy as np

    from uniap.cost_model import CostTables, evaluate_assignment

    rng = np.random.default_rng(7 + v)
    for trial in range(40):
        L, pp, K, C = 40, int(rng.integers(1, 5)), 6, 3
        V = pp * v
        A = rng.uniform(0.1, 2.0, size=(L, K)) * 10.0 ** rng.integers(-6, 1, size=(L, K))
        M = rng.uniform(1.0, 10.0, size=(L, K, V)) * 1e9
        layout = rng.integers(0, C, size=(L, K))
        R = rng.uniform(0.0, 0.5, size=(L - 1, C, C)) * 1e-3
        Rp = rng.uniform(0.0, 0.5, size=(L - 1, C, C)) * 1e-3
        allowed = [sorted(rng.choice(K, size=4, replace=False).tolist()) for _ in range(L)]
        t = CostTables(
            pp, 8, A, rng.uniform(0, 1e-3, size=(L, K)), M, layout, R, Rp, 4e10, allowed,
            F=rng.uniform(0, 1e-3, size=(L, K)), Mh=rng.uniform(0, 1e9, size=(L, K)),
            virtual_stages=v, schedule="Interleaved1F1B" if v > 1 else "1F1B",
            stage_overhead_s=1e-4,
        )  # fmt: skip
        cuts = np.sort(rng.choice(np.arange(1, L), size=V - 1, replace=False))
        stage_of = np.searchsorted(cuts, np.arange(L), side="right").tolist()
        strategy_of = [int(rng.choice(allowed[u])) for u in range(L)]
        if trial % 4 == 3:  # a strategy the layer may not use
            u = int(rng.integers(L))
            strategy_of[u] = next(k for k in range(K) if k not in allowed[u])
        ev = evaluate_assignment(t, stage_of, strategy_of)
        p, o, s, mem, host = _evaluate_by_loop(t, stage_of, strategy_of)
        assert (ev.stage_time_s, ev.link_time_s, ev.sync_time_s) == (p, o, s)
        assert (ev.peak_memory_bytes, ev.host_memory_bytes) == (mem, host)
        assert all(type(x) is float for x in [*ev.stage_time_s, *ev.peak_memory_bytes])
        assert (ev.time_per_iteration_s == float("inf")) == (trial % 4 == 3)
