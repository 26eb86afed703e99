"""Sequence parallelism on the planner side: the plan contract's ``sp`` flag, the layers' SP
plans found from the trace, the strategies offered, the cost model's SP terms, and the
planner equal to the exhaustive optimum with SP strategies in the space."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from uniap import models
from uniap.contract import LayerStrategy, Plan, Stage, Strategy
from uniap.cost_model import CostModel
from uniap.errors import ConfigError, PlanMismatchError
from uniap.exactness import optimum_curve, small_cluster, sweep
from uniap.graph import build_graph
from uniap.planner import plan_graph
from uniap.strategies import stage_strategies, why_not


@pytest.fixture(scope="module")
def gpt():
    m = models.build_model("gpt-tiny", n_layers=2)
    return build_graph(m, models.example_batch(m, 2, device="meta")[0], name="gpt-tiny")


def _plan(strategy: Strategy) -> Plan:
    return Plan(
        model_name="m",
        model_signature="s",
        num_layers=2,
        world_size=2,
        global_batch_size=4,
        num_microbatches=1,
        schedule="1F1B",
        stages=(
            Stage(
                (0, 1),
                (LayerStrategy("a", Strategy(2, 1)), LayerStrategy("b", strategy)),
            ),
        ),
    )


def test_sp_round_trips_and_absent_means_false() -> None:
    """``sp: true`` survives YAML and JSON; a layer without the field (older plan files) is not
    sequence parallel, and a plan without SP writes no ``sp`` field."""
    p = _plan(Strategy(1, 2, "DDP", True, 0, True))
    for text in (p.to_yaml(), p.to_json()):
        q = Plan.load(text)
        assert q == p and q.layer_strategies[1].sp and q.layer_strategies[1].recompute
    assert "sp: true" in p.to_yaml()
    plain = _plan(Strategy(1, 2))
    assert "sp" not in plain.to_json()
    assert not Plan.load(plain.to_yaml()).layer_strategies[1].sp
    assert "tp2 sp DDP +ckpt" in p.summary()


def test_sp_needs_tp_and_a_boolean() -> None:
    """``sp`` with tp = 1, or not a boolean, is one clear ConfigError."""
    with pytest.raises(ConfigError, match=r"'b': sequence parallelism \(sp\) needs tp > 1"):
        _plan(Strategy(2, 1, "DDP", False, 0, True))
    d = _plan(Strategy(1, 2)).to_dict()
    d["stages"][0]["layers"][1]["sp"] = "yes"
    with pytest.raises(ConfigError, match=r"layers\[1\]\.sp must be true or false, got 'yes'"):
        Plan.from_dict(d)


def test_blocks_get_an_sp_plan_found_from_the_trace(gpt) -> None:
    """Transformer blocks shard dimension 1 (the attention's query length) with the attention
    and MLP submodules as regions; embedding and head have none; the SP-sharded fraction is
    what is saved outside the pairs."""
    block = gpt.layer("blocks.0")
    assert (block.sp_seq_dim, block.sp_seq_len, block.sp_regions) == (1, 32, ("attn", "mlp"))
    assert 0 < block.sp_saved_fraction < 1 - block.tp_saved_fraction
    assert block.supports_sp(2) and block.supports_sp(4)
    assert gpt.layer("embed").sp_why_not(2) == (
        "its tensor parallelism is vocabulary-parallel, which has no sequence-parallel plan"
    )
    assert block.sp_why_not(1) == "sequence parallelism needs tp > 1"
    odd = dataclasses.replace(block, sp_seq_len=30)
    assert odd.sp_why_not(4) == (
        "its sequence length (30, dimension 1 of its input) is not divisible by tp=4"
    )


@pytest.mark.parametrize(
    "name,reason",
    [
        ("swin-tiny", "its attention runs over [16] positions, not the 64 of dimension 1"),
        ("t5-tiny", "its input has shape [2, 2, 32, 64], not (batch, sequence, features)"),
    ],
)
def test_layers_that_cannot_run_sp_say_why(name: str, reason: str) -> None:
    """Window attention (Swin) and a packed two-stream input (T5) get no SP plan, with the
    reason; the planner and the executor refuse SP for them."""
    from uniap.executor.sequence_parallel import check_sp_supported

    m = models.build_model(name)
    g = build_graph(m, models.example_batch(m, 2, device="meta")[0], pipeline_check=False)
    layer = next(la for la in g.layers if la.tp_pairs)
    assert layer.sp_excluded_reason.startswith(reason)
    s = Strategy(1, 2, "DDP", False, 0, True)
    assert why_not(layer, s, 4) == f"sequence parallelism is not possible: {layer.sp_why_not(2)}"
    with pytest.raises(PlanMismatchError, match="cannot run sequence parallel at tp=2: its "):
        check_sp_supported(layer, layer.fqn, 2)


def test_region_with_other_parameters_is_refused() -> None:
    """A post-norm block (BERT-style: the residual and its norm inside the attention module)
    has no SP plan: the region holds the norm's parameters besides its pair."""
    from torch import nn
    from torch.nn import functional as F

    class PostNormAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
            self.norm = nn.LayerNorm(16)

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = (p(x).view(b, s, 2, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, -1)
            return self.norm(x + self.o(a))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = PostNormAttention()

        def forward(self, x):
            return self.attn(x)

    with torch.device("meta"):
        m = nn.Sequential(Block(), Block())
    g = build_graph(m, torch.empty(2, 8, 16, device="meta"))
    assert g.layers[0].tp_pairs and not g.layers[0].sp_regions
    assert g.layers[0].sp_excluded_reason == (
        "region 'attn' holds parameters besides its Linear pair (norm.bias, norm.weight): ops "
        "after the pair inside it would mix whole and sequence-sharded tensors"
    )


def _token_mixing_block_graph(mix):
    """A pre-norm block of attention and MLP regions whose residual stream goes through
    ``mix`` between them."""
    from torch import nn
    from torch.nn import functional as F

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = (p(x).view(b, s, 2, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
            return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, -1))

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            return self.down(F.gelu(self.up(x)))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.n1, self.n2 = nn.LayerNorm(16), nn.LayerNorm(16)
            self.attn, self.mlp = Attention(), MLP()

        def forward(self, x):
            h = mix(x + self.attn(self.n1(x)))
            return h + self.mlp(self.n2(h))

    with torch.device("meta"):
        m = nn.Sequential(Block(), Block())
    return build_graph(m, torch.empty(2, 8, 16, device="meta"), pipeline_check=False)


@pytest.mark.parametrize(
    "mix,name",
    [
        (lambda h: h + 0.5 * h.mean(-1, keepdim=True) * h.view(2, 8, 2, 8).flatten(2), None),
        (lambda h: h + torch.cumsum(h, dim=1), "cumsum"),
        (lambda h: h + torch.roll(h, 1, 1), "roll"),
        (lambda h: torch.cat([h[:, :1], h[:, :-1]], dim=1), "__getitem__"),
    ],
)
def test_an_op_that_mixes_positions_between_the_regions_rules_out_sp(mix, name) -> None:
    """Between its regions SP shards the residual stream along the sequence; a call there
    that mixes positions (a cumulative sum, a roll, a token shift) would make DTensor gather
    it, uncharged: the layer gets no SP plan, naming the call. Position-wise calls (norms,
    reductions over the features, reshapes that keep batch and sequence) leave it."""
    layer = _token_mixing_block_graph(mix).layers[0]
    assert layer.tp_pairs
    if name is None:
        assert (layer.sp_regions, layer.sp_excluded_reason) == (("attn", "mlp"), "")
        return
    assert not layer.sp_regions
    assert layer.sp_excluded_reason == (
        f"its call {name!r} outside the regions ['attn', 'mlp'] may mix the positions of "
        "dimension 1, which sequence parallelism shards there (DTensor would gather them: "
        "communication the cost model does not charge)"
    )
    s = Strategy(1, 2, "DDP", False, 0, True)
    assert why_not(layer, s, 2) == f"sequence parallelism is not possible: {layer.sp_why_not(2)}"


def test_position_mixing_calls_are_told_apart() -> None:
    """:func:`uniap.tracing.mixes_positions` on calls of a (batch 2, sequence 8, ...) tensor:
    elementwise, last-dimension and shape-keeping calls act on every position apart; calls
    along the sequence (or over every dimension) mix; other tensors are not looked at."""
    from torch.nn import functional as F

    from uniap.tracing import mixes_positions

    x, w, other = torch.zeros(2, 8, 4), torch.zeros(4, 4), torch.zeros(3, 5, 4)
    x4 = torch.zeros(2, 8, 2, 2)

    def name(func, *args, **kwargs):
        return mixes_positions(func, args, kwargs, func(*args, **kwargs), (2, 8))

    wise = [
        (torch.add, x, x),
        (F.layer_norm, x, (4,)),
        (torch.mean, x, -1),
        (torch.Tensor.sum, x, 2),
        (torch.softmax, x, -1),
        (torch.Tensor.view, x, 2, 8, 2, 2),
        (torch.transpose, x4, 2, 3),
        (torch.Tensor.permute, x4, 0, 1, 3, 2),
        (torch.matmul, x, w),
        (torch.cat, [x, x], -1),
        (torch.Tensor.chunk, x, 2, -1),
        (torch.Tensor.__getitem__, x, (Ellipsis, slice(0, 2))),
        (torch.cumsum, other, 1),
        (torch.max, x, x),
    ]
    for func, *args in wise:
        assert name(func, *args) is None, func
    mixing = [
        (torch.cumsum, x, 1),
        (torch.mean, x, 1),
        (torch.Tensor.sum, x),
        (torch.roll, x, 1, 1),
        (torch.transpose, x, 1, 2),
        (torch.Tensor.view, x, 16, 4),
        (torch.cat, [x, x], 1),
        (torch.Tensor.__getitem__, x, (slice(None), slice(0, 4))),
        (torch.matmul, x, x.transpose(1, 2)),
        (torch.Tensor.flip, x, (1,)),
    ]
    shape, swapped = torch.Tensor.shape.__get__, torch.Tensor.mT.__get__
    assert mixes_positions(shape, (x,), {}, shape(x), (2, 8)) is None
    assert mixes_positions(swapped, (x,), {}, swapped(x), (2, 8)) == "mT"
    for func, *args in mixing:
        assert name(func, *args) == func.__name__, func


def test_sp_strategies_only_when_asked_and_only_with_tp() -> None:
    """``sequence_parallel`` adds one sp twin of every ``tp > 1`` strategy, none at tp = 1."""
    plain = stage_strategies(4)
    both = stage_strategies(4, sequence_parallel=True)
    assert not any(s.sp for s in plain)
    sp = [s for s in both if s.sp]
    assert sp and all(s.tp > 1 for s in sp)
    assert sorted(dataclasses.replace(s, sp=False) for s in sp) == sorted(
        s for s in plain if s.tp > 1
    )
    assert len(both) == len(plain) + len(sp)


def test_sp_costs_boundary_gathers_and_saves_activations(gpt) -> None:
    """At tp = 2 on the ring model, a pair's all-gather + reduce-scatter costs its two
    all-reduces, so SP's TP communication is TP's plus the boundary's two all-gathers (the
    output forward, the input's gradient backward) and the norms' gradient all-reduces; its
    activations are TP's less the
    SP-sharded share over tp; with recompute it keeps half of its input."""
    cluster = small_cluster(1, 2)
    cm = CostModel(gpt, cluster, sequence_parallel=True)
    u = gpt.fqns.index("blocks.0")
    layer, b = gpt.layers[u], 4
    kw = dict(pp=1, num_microbatches=1, microbatch_size=b, inflight=[1])
    tp = cm.layer_cost(u, Strategy(1, 2), **kw)
    sp = cm.layer_cost(u, Strategy(1, 2, "DDP", False, 0, True), **kw)
    in_bytes = gpt.layers[u - 1].output_bytes_per_sample * b
    out_bytes = layer.output_bytes_per_sample * b
    boundary = cm.profile.collective_s("all_gather", out_bytes, [0, 1])
    boundary += cm.profile.collective_s("all_gather", in_bytes, [0, 1])
    # and, at dp = 1, the all-reduce of each norm parameter's gradient after the backward
    assert len(layer.sp_replicated_param_bytes) == 4  # two LayerNorms' weights and biases
    norms = sum(
        cm.profile.collective_s("all_reduce", nb, [0, 1]) for nb in layer.sp_replicated_param_bytes
    )
    assert sp.parts["tp_comm"] == pytest.approx(tp.parts["tp_comm"] + boundary + norms, rel=1e-12)
    f, fs = layer.tp_saved_fraction, layer.sp_saved_fraction
    saved = layer.saved_bytes_per_sample * b
    assert tp.memory_bytes[0] - sp.memory_bytes[0] == pytest.approx(saved * fs / 2, rel=1e-12)
    assert cm.activation_bytes(u, b, 2, sp=True) == pytest.approx(
        saved * ((f + fs) / 2 + 1 - f - fs), rel=1e-12
    )
    assert cm.activation_bytes(u, b, 2, sp=True, recompute=True) == in_bytes / 2
    # with FSDP over dp = 2 and two micro-batches, FSDP2 sums the norms' gradients once, before
    # its reduce-scatter: in the per-iteration synchronisation
    cm4 = CostModel(gpt, small_cluster(1, 4), sequence_parallel=True)
    kw4 = dict(pp=1, num_microbatches=2, microbatch_size=b, inflight=[2])
    fsdp_tp = cm4.layer_cost(u, Strategy(2, 2, "FSDP"), **kw4)
    fsdp_sp = cm4.layer_cost(u, Strategy(2, 2, "FSDP", False, 0, True), **kw4)
    assert fsdp_sp.per_iteration_s - fsdp_tp.per_iteration_s == pytest.approx(norms, rel=1e-9)
    # the recomputed forward repeats the pairs' gathers and reduce-scatters
    sp_rc = cm.layer_cost(u, Strategy(1, 2, "DDP", True, 0, True), **kw)
    pairs_fwd = sum(
        cm.profile.collective_s("all_gather", n * b, [0, 1])
        + cm.profile.collective_s("reduce_scatter", p.allreduce_bytes_per_sample * b, [0, 1])
        for p in layer.tp_pairs
        for n in p.input_bytes_per_sample
    )
    assert sp_rc.parts["tp_comm"] == pytest.approx(sp.parts["tp_comm"] + pairs_fwd, rel=1e-12)


def test_planner_equals_enumeration_with_sequence_parallelism(gpt) -> None:
    """gpt-tiny (2 blocks) on 1 x 4 devices, SP offered: at every memory limit where the
    optimum changes (and just below it) the planner equals the exhaustive optimum over every
    candidate, SP strategies included, and SP is the optimum somewhere on the way down."""
    cluster = small_cluster(1, 4)
    opts = {
        "sequence_parallel": True,
        "kinds": ["DDP"],
        "pp_degrees": [1],
        "num_microbatches": [1, 2],
    }
    checks = sweep(gpt, cluster, global_batch_size=8, max_checks=16, **opts)
    assert len(checks) >= 6 and [c for c in checks if not c.ok] == []
    uses_sp = []
    for peak, _ in optimum_curve(gpt, cluster, global_batch_size=8, **opts):
        p = plan_graph(gpt, cluster.with_memory(peak / 0.9), global_batch_size=8, **opts)
        uses_sp.append(any(ls.sp for ls in p.layer_strategies))
        assert math.isfinite(p.predicted["time_per_iteration_s"])
    assert any(uses_sp)


def test_parallelize_refuses_sp_where_the_layer_cannot(gpt) -> None:
    """A plan asking for SP on a layer that has a TP plan but no SP plan is refused before any
    collective, naming the layer and why; on the real graph the same plan passes, and the
    cost model evaluates it whether or not it offers SP strategies."""
    from uniap.api import _check_plan

    sp = Strategy(1, 2, "DDP", False, 0, True)
    plan = Plan(
        model_name=gpt.name,
        model_signature=gpt.signature,
        num_layers=gpt.num_layers,
        world_size=2,
        global_batch_size=4,
        num_microbatches=1,
        schedule="1F1B",
        stages=(
            Stage(
                (0, 1),
                tuple(
                    LayerStrategy(f, sp if f.startswith("blocks") else Strategy(2, 1))
                    for f in gpt.fqns
                ),
            ),
        ),
    )
    _check_plan(plan, graph=gpt, fqns=gpt.fqns, world_size=2, global_batch_size=4)
    layers = tuple(
        dataclasses.replace(la, sp_regions=()) if la.fqn == "blocks.1" else la for la in gpt.layers
    )
    no_sp = dataclasses.replace(gpt, layers=layers)
    with pytest.raises(
        PlanMismatchError,
        match=r"^layer 'blocks.1' cannot run sequence parallel at tp=2: it has no "
        r"sequence-parallel plan; set sp: false for it$",
    ):
        _check_plan(plan, graph=no_sp, fqns=gpt.fqns, world_size=2, global_batch_size=4)
    cluster = small_cluster(1, 2)
    with_sp = CostModel(gpt, cluster, sequence_parallel=True).evaluate(plan)
    assert CostModel(gpt, cluster).evaluate(plan) == with_sp


def test_measured_profile_reads_measured_sp_bytes(gpt) -> None:
    """A measured profile's SP activation bytes round-trip through its dict and are what the
    cost model charges; a profile without them falls back to the TP bytes less the traced
    SP-sharded share."""
    from uniap.profiles import MeasuredProfile
    from uniap.profiles.measured import LayerProfile

    layer = gpt.layer("blocks.0")
    batches = [1, 2, 4]
    lp = LayerProfile(fqns=["blocks.0"], batches=batches)
    lp.activation_bytes[2] = [1000.0 * b for b in batches]
    old = LayerProfile.from_dict(lp.to_dict())
    assert "sp_activation_bytes" not in lp.to_dict()
    lp.sp_activation_bytes[2] = [700.0 * b for b in batches]
    assert LayerProfile.from_dict(lp.to_dict()).sp_activation_bytes == {2: [700.0, 1400.0, 2800.0]}

    def profile(layer_profile: LayerProfile) -> MeasuredProfile:
        return MeasuredProfile(
            model={},
            hardware={"devices_per_node": 2},
            versions={},
            layers={layer.cost_key: layer_profile},
            collectives={},
        )

    assert profile(lp).activation_bytes(layer, 2, 2, sp=True) == pytest.approx(1400.0)
    assert profile(lp).activation_bytes(layer, 2, 2) == pytest.approx(2000.0)
    share = layer.saved_bytes_per_sample * 2 * layer.sp_saved_fraction / 2
    assert profile(old).activation_bytes(layer, 2, 2, sp=True) == pytest.approx(2000.0 - share)
