"""The planner is exact under tight memory: every bound it prunes by is valid, and the plan
equals the exhaustive optimum at every memory limit where the optimum changes."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from _tables import assert_bounds_keep_the_optimum
from torch import nn

from uniap import models
from uniap.bounds import bottleneck_lower_bound
from uniap.cluster import Cluster
from uniap.cost_model import CostModel, CostTables, evaluate_assignment
from uniap.errors import InfeasibleError
from uniap.exactness import MLP, optimum_curve, small_cluster, sweep, sweep_limits
from uniap.graph import build_graph
from uniap.planner import candidate_tables, plan_graph
from uniap.search import compositions, frontier

_DDP_FSDP = ("DDP", "FSDP")


def _cluster(nodes: int, per_node: int = 1) -> Cluster:
    return small_cluster(nodes, per_node)


def _seq7():
    with torch.device("meta"):
        m = nn.Sequential(
            MLP(64, 256),
            nn.LayerNorm(64),
            MLP(64, 128),
            MLP(64, 512),
            MLP(64, 256),
            nn.LayerNorm(64),
            MLP(64, 128),
        )
    return build_graph(m, torch.empty(2, 16, 64, device="meta"), name="seq7")


def _chain(seed: int):
    rng = np.random.default_rng(seed)
    blocks = [
        nn.LayerNorm(64) if rng.random() < 0.25 else MLP(64, int(rng.choice([64, 256, 1024])))
        for _ in range(int(rng.integers(3, 7)))
    ]
    with torch.device("meta"):
        m = nn.Sequential(*blocks)
    return build_graph(m, torch.empty(2, 16, 64, device="meta"), name=f"chain{seed}")


def test_stage_dependent_memory_keeps_the_optimum() -> None:
    """The reported case: pp=4, c=4 with stages 1/2/1/3 fits and beats pp=2 by 18 % (since a
    gradient sync longer than the backward is charged as exposed, 2/1/1/3 takes exactly the
    same time: either is the optimum); a greedy fill of the split bound called that candidate
    infeasible and the planner returned pp=2. DDP and FSDP only (the case as reported)."""
    p = plan_graph(
        _seq7(), _cluster(8).with_memory(1080000 / 0.9), global_batch_size=16, kinds=_DDP_FSDP
    )
    assert p.pp_degree == 4 and p.num_microbatches == 4
    assert [len(s.layers) for s in p.stages] in ([1, 2, 1, 3], [2, 1, 1, 3])
    assert p.predicted["time_per_iteration_s"] == pytest.approx(0.0189814, rel=1e-4)
    assert p.solver["status"] == "optimal"


def test_t5_with_three_plus_three_blocks_plans_at_every_limit() -> None:
    """t5-tiny with 3 + 3 blocks on 8 x 1 devices without recompute: the plan equals the
    enumeration at every step of the optimum and just below it (it raised InfeasibleError
    saying a plan needs less memory than the limit)."""
    m = models.build_model("t5-tiny", device="meta", n_layers=3, n_decoder_layers=3)
    g = build_graph(m, models.example_batch(m, 2, device="meta")[0], name="t5")
    checks = sweep(g, _cluster(8), global_batch_size=16, recompute=False, max_tp=1)
    assert len(checks) >= 10
    assert [c for c in checks if not c.ok] == []
    assert any(math.isinf(c.expected_s) for c in checks) and any(
        math.isfinite(c.expected_s) for c in checks
    )


@pytest.mark.parametrize(
    "seed,nodes,per_node,opts",
    [
        (0, 4, 1, {"schedules": ["1F1B"]}),
        (1, 4, 1, {"schedules": ["GPipe"], "recompute": False}),
        (2, 2, 2, {"schedules": ["GPipe", "1F1B"], "max_tp": 2}),
        (3, 8, 1, {"schedules": ["1F1B"], "max_tp": 1}),
        # interleaved 1F1B (v = 2 stages per rank) next to 1F1B: the planner picks either
        (4, 4, 1, {"schedules": ["1F1B", "Interleaved1F1B"], "max_tp": 1, "kinds": _DDP_FSDP}),
    ],
)
def test_planner_equals_enumeration_at_every_breakpoint(
    seed: int, nodes: int, per_node: int, opts: dict
) -> None:
    """Random chains of different layer sizes: at every memory limit where the optimum changes
    (and just below it) the planner's time equals the exhaustive optimum over every candidate,
    and it raises InfeasibleError exactly when nothing fits."""
    checks = sweep(
        _chain(seed), _cluster(nodes, per_node), global_batch_size=8, max_checks=24, **opts
    )
    assert [c for c in checks if not c.ok] == []


def test_planner_equals_enumeration_with_every_knapsack_front_coarsened(monkeypatch) -> None:
    """With the runs' knapsack fronts cut to two points wherever they grow larger (so every
    bound and split that rests on them is coarsened, :func:`uniap.bounds.coarsen_front`), the
    planner still equals the exhaustive optimum at every memory limit where it changes."""
    from uniap import bounds, pipeline_labels

    built = []
    knapsack = bounds._knapsack_runs

    def counted(*args, **kwargs):
        built.append(args[7])  # max_points
        return knapsack(*args, **kwargs)

    monkeypatch.setattr(bounds, "KNAPSACK_POINTS", 2)
    monkeypatch.setattr(pipeline_labels, "KNAPSACK_POINTS", 2)
    monkeypatch.setattr(bounds, "_knapsack_runs", counted)
    bounds._KNAPSACK_MEMO.clear()
    checks = sweep(
        _chain(0), _cluster(4), global_batch_size=8, max_checks=24, schedules=["1F1B"], max_tp=2
    )
    bounds._KNAPSACK_MEMO.clear()
    assert [c for c in checks if not c.ok] == []
    assert built and set(built) == {2}


def test_sweep_limits_bracket_every_step() -> None:
    """The sweep asks at each step of the curve and just below it, where the previous optimum
    holds."""
    curve = [(10.0, 5.0), (20.0, 3.0)]
    assert list(sweep_limits(curve)) == [
        (10.0 * (1 - 1e-6), math.inf),
        (10.0, 5.0),
        (20.0 * (1 - 1e-6), 5.0),
        (20.0, 3.0),
    ]


# ---------------------------------------------------------------------- each bound on its own


def _brute(t: CostTables) -> tuple[float, float]:
    """(the smallest bottleneck max_i p_i, the optimum) over every assignment that fits."""
    best_bottleneck = best = math.inf
    for stage_of in compositions(t.num_layers, t.num_stages):
        for strat in itertools.product(*t.allowed):
            ev = evaluate_assignment(t, stage_of, list(strat))
            if ev.fits:
                best_bottleneck = min(best_bottleneck, max(ev.stage_time_s) - t.stage_overhead_s)
                best = min(best, ev.time_per_iteration_s)
    return best_bottleneck, best


def _min_max_split(t: CostTables) -> float:
    """The min-max split of the layers' fastest times with each stage's leanest memory, by
    enumeration (what bottleneck_lower_bound computes by bisection and dynamic programming)."""
    mask = np.zeros_like(t.A, dtype=bool)
    for u, ks in enumerate(t.allowed):
        mask[u, ks] = True
    amin = np.where(mask, t.A, np.inf).min(axis=1)
    mmin = np.where(mask[:, :, None], t.M, np.inf).min(axis=1)
    best, n = math.inf, t.num_stages
    for stage_of in compositions(t.num_layers, n):
        st = np.asarray(stage_of)
        if all(mmin[st == i, i].sum() <= t.memory_limit_bytes * (1 + 1e-9) for i in range(n)):
            best = min(best, max(amin[st == i].sum() for i in range(n)))
    return best


def _candidate_tables(graph, cluster, **opts) -> list[CostTables]:
    cm = CostModel(
        graph, cluster, memory_fraction=0.9, max_tp=opts.get("max_tp"), kinds=opts.get("kinds")
    )
    pps = [p for p in (1, 2, 4, 8) if cluster.world_size % p == 0 and p <= graph.num_layers]
    return [t for _, _, _, t in candidate_tables(cm, pps, 8, None, opts.get("schedules"))]


@pytest.mark.parametrize("case", ["seq7", "chain3", "chain5", "chain5-interleaved"])
def test_every_bound_is_valid_through_the_memory_sweep(case: str) -> None:
    """For every candidate and every memory limit where its own optimum changes (and just
    below): the split bound equals the enumerated min-max split, the candidate bound, the
    segment bound (for any target) and the bottleneck bound stay below the optimum, each is
    +inf only when nothing fits, and the windows keep every assignment faster than a target."""
    interleaved = case.endswith("-interleaved")
    graph = _seq7() if case == "seq7" else _chain(int(case.removesuffix("-interleaved")[-1]))
    tables = _candidate_tables(
        graph,
        _cluster(8 if case == "seq7" else 4),
        max_tp=1,
        schedules=["Interleaved1F1B"] if interleaved else ["1F1B"],
        # seq7's 7 layers with three kinds exceed what the enumeration checks in time
        kinds=_DDP_FSDP if case == "seq7" else None,
    )
    checked = 0
    if interleaved:  # pp = 2, v = 2: four stages on five layers
        tables = [t for t in tables if t.virtual_stages == 2]
        assert tables
    for t0 in tables:
        n = t0.num_stages
        if math.comb(t0.num_layers - 1, n - 1) * np.prod([len(k) for k in t0.allowed]) > 20000:
            continue
        for limit, _ in list(sweep_limits(frontier(t0)))[:: 3 if interleaved else 5]:
            t = CostTables(**{**t0.__dict__, "memory_limit_bytes": limit})
            min_bottleneck, opt = _brute(t)
            split = bottleneck_lower_bound(t)
            assert (
                split == pytest.approx(_min_max_split(t), rel=1e-8)
                if math.isfinite(opt) or math.isfinite(split)
                else True
            )
            if interleaved:  # a rank's stages share its memory, the split sees one at a time
                assert math.isfinite(split) or math.isinf(opt)
            else:
                assert math.isinf(split) == math.isinf(opt)
            assert split <= min_bottleneck * (1 + 1e-12)
            assert_bounds_keep_the_optimum(t, opt)
            checked += 1
    assert checked >= 6


@pytest.mark.parametrize("seed", range(40))
def test_split_bound_equals_min_max_split_with_stage_dependent_memory(seed: int) -> None:
    """Random tables whose memory differs strongly between stages: bisection with the dynamic
    program equals the enumerated min-max split (a greedy fill does not)."""
    rng = np.random.default_rng(seed)
    L, pp = int(rng.integers(4, 10)), int(rng.integers(2, 6))
    pp = min(pp, L)
    K = 2
    A = rng.uniform(0.1, 2.0, size=(L, K))
    M = rng.uniform(0.0, 10.0, size=(L, K, 1)) * rng.uniform(0.2, 3.0, size=(1, 1, pp))
    t = CostTables(
        pp,
        4,
        A,
        np.zeros((L, K)),
        M,
        np.zeros((L, K), dtype=np.int64),
        np.zeros((L - 1, 1, 1)),
        np.zeros((L - 1, 1, 1)),
        0.0,
        [[0, 1]] * L,
    )
    peaks = sorted(
        {
            float(M[:, :, i].min(axis=1)[s:e].sum())
            for i in range(pp)
            for s in range(L)
            for e in range(s + 1, L + 1)
        }
    )
    for limit in peaks[:: max(1, len(peaks) // 25)]:
        t.memory_limit_bytes = limit
        want = _min_max_split(t)
        got = bottleneck_lower_bound(t)
        assert (math.isinf(want) and math.isinf(got)) or got == pytest.approx(want, rel=1e-8)


# ---------------------------------------------------------------------- illegal strategies


def test_infeasible_error_lists_the_candidates_and_never_contradicts_itself() -> None:
    """Below the leanest plan: InfeasibleError says what the leanest plan needs (more than the
    limit) and carries every candidate tried with its reason."""
    graph = _seq7()
    curve = optimum_curve(graph, _cluster(8), global_batch_size=16)
    cl = _cluster(8).with_memory(curve[0][0] * 0.99 / 0.9)
    with pytest.raises(InfeasibleError) as err:
        plan_graph(graph, cl, global_batch_size=16)
    e = err.value
    assert e.min_memory_bytes > cl.device_memory_bytes * 0.9
    assert e.min_memory_bytes == pytest.approx(curve[0][0], rel=1e-4)
    assert len(e.candidates) >= 8 and all(c["reason"] for c in e.candidates)
    assert "Tried" in str(e) and "pp=" in str(e)


@pytest.mark.parametrize("nodes,per_node,kind", [(4, 1, "ZeRO2"), (2, 2, "HSDP")])
def test_zero2_and_hsdp_are_the_optimum_between_ddp_and_fsdp(
    nodes: int, per_node: int, kind: str
) -> None:
    """Three MLP blocks (pp = 1): as the memory limit falls the optimum goes from every layer
    DDP through every layer ZeRO2 (4 x 1 devices) or HSDP with shard groups of 2 (2 x 2
    devices: sharded inside a node, replicated across the slow link) to every layer FSDP, with
    mixes in between; at every step of the curve and just below it the planner equals the
    enumeration."""
    with torch.device("meta"):
        m = nn.Sequential(*[MLP(64, 256) for _ in range(3)])
    g = build_graph(m, torch.empty(2, 16, 64, device="meta"), name="mlp3")
    cluster = _cluster(nodes, per_node)
    opts = {"recompute": False, "max_tp": 1, "pp_degrees": [1], "num_microbatches": [1, 2]}
    checks = sweep(g, cluster, global_batch_size=8, **opts)
    assert len(checks) >= 10 and [c for c in checks if not c.ok] == []
    kinds = []
    for peak, _ in optimum_curve(g, cluster, global_batch_size=8, **opts)[::-1]:
        p = plan_graph(g, cluster.with_memory(peak / 0.9), global_batch_size=8, **opts)
        kinds.append({ls.kind for ls in p.layer_strategies})
    assert kinds[0] == {"DDP"} and kinds[-1] == {"FSDP"}
    middle = kinds.index({kind})
    assert 0 < middle < len(kinds) - 1
    assert all("DDP" in k for k in kinds[:middle])  # more memory: some layer replicated
    assert all("FSDP" in k for k in kinds[middle + 1 :])  # less: some layer fully sharded


def test_planner_equals_enumeration_with_cpu_offload() -> None:
    """A random chain on 2 nodes x 2 devices whose host memory holds FSDP-offload's state
    (the full space, offload included, asked for explicitly): at every device-memory limit
    where the optimum changes, and just below it, the planner equals the enumeration."""
    cluster = Cluster.from_dict(
        {
            **_cluster(2, 2).to_dict(),
            "host": {
                "memory": "2 MiB",
                "link_bandwidth": "4 GB/s",
                "optimizer_time_per_param": "2 ns",
            },
        }
    )
    opts = {"schedules": ["1F1B"], "recompute": False, "kinds": ["DDP", "FSDP", "FSDP-offload"]}
    checks = sweep(_chain(4), cluster, global_batch_size=8, max_checks=16, **opts)
    assert len(checks) >= 8 and [c for c in checks if not c.ok] == []


def test_planner_equals_enumeration_with_vocabulary_parallel_embedding_and_head() -> None:
    """A GPT-style model whose embedding and head may take tp = 2 (vocabulary-parallel, next
    to the blocks' Megatron TP): the planner equals the enumeration at every step of the
    optimum."""
    from uniap.models import GPT, GPTConfig

    with torch.device("meta"):
        m = GPT(GPTConfig(vocab_size=512, seq_len=16, dim=32, n_layers=2, n_heads=4))
    g = build_graph(m, torch.zeros(2, 16, dtype=torch.long, device="meta"), name="vocab-gpt")
    cluster = _cluster(1, 2)
    t = next(t for t in _candidate_tables(g, cluster, max_tp=2) if t.pp == 1)
    for fqn in ("embed", "head"):
        u = g.fqns.index(fqn)
        assert any(t.strategies[k].tp == 2 for k in t.allowed[u]), fqn
    checks = sweep(g, cluster, global_batch_size=4, max_checks=16, max_tp=2)
    assert [c for c in checks if not c.ok] == []
    assert len(checks) >= 4
