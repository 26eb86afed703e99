"""The model's own forward, pure logic: free parameters (model-level and tied), batch slicing
of keyword inputs, Hugging Face outputs kept intact, and the planner's pp = 1 restriction for
models that are not declared chains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from uniap.contract import LayerStrategy, Plan, Stage, Strategy
from uniap.errors import ConfigError, PlanMismatchError
from uniap.executor.model_forward import check_free_layouts, free_parameters
from uniap.executor.reshard import map_tensors, microbatches
from uniap.graph import build_graph, is_declared_chain


class _Net(nn.Module):
    def __init__(self, tied: bool = False, model_param: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(16, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16, bias=False)
        if tied:
            self.head.weight = self.tok.weight
        if model_param:
            self.scale = nn.Parameter(torch.ones(8))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) * (self.scale if hasattr(self, "scale") else 1.0)
        return self.head(self.body(h) + h)


FQNS = ["tok", "body", "head"]


def _plan(layouts: list[tuple[int, int]]) -> Plan:
    layers = tuple(
        LayerStrategy(f, Strategy(dp, tp)) for f, (dp, tp) in zip(FQNS, layouts, strict=True)
    )
    return Plan(
        model_name="net",
        model_signature="x",
        num_layers=3,
        world_size=4,
        global_batch_size=8,
        num_microbatches=1,
        schedule="1F1B",
        stages=(Stage((0, 1, 2, 3), layers),),
    )


def test_free_parameters_are_model_level_and_tied_ones() -> None:
    """A parameter outside every layer has no owner; a tied one names both layers."""
    assert free_parameters(_Net(), FQNS) == {}
    assert free_parameters(_Net(model_param=True), FQNS) == {"scale": ()}
    assert free_parameters(_Net(tied=True), FQNS) == {"tok.weight": ("head", "tok")}


def test_tied_layers_in_different_layouts_refused_naming_both() -> None:
    """A tied weight is one data-parallel unit: its layers must share the first layout."""
    free = free_parameters(_Net(tied=True), FQNS)
    assert check_free_layouts(free, _plan([(4, 1), (2, 2), (4, 1)])) == (4, 1)
    with pytest.raises(PlanMismatchError) as e:
        check_free_layouts(free, _plan([(4, 1), (4, 1), (2, 2)]))
    assert str(e.value) == (
        "parameter 'tok.weight' (shared by layers head, tok) is trained as one data-parallel "
        "unit in the first layer's layout (dp=4, tp=1), but layer 'head' runs at dp=2, tp=2; "
        "give 'head' dp=4, tp=1 or untie the parameter"
    )


def test_microbatches_slice_batch_tensors_and_pass_the_rest() -> None:
    """Tensors with the global batch dim are sliced per micro-batch and DP shard; others pass."""
    ids = torch.arange(8).unsqueeze(1)
    table = torch.zeros(3, 5)
    batch = {"input_ids": ids, "bias": table, "flag": True, "none": None}
    parts = microbatches(batch, batch_size=8, num_microbatches=2, dp=2, dp_index=1)
    assert [p["input_ids"].flatten().tolist() for p in parts] == [[2, 3], [6, 7]]
    assert all(p["bias"] is table and p["flag"] is True and p["none"] is None for p in parts)


def test_map_tensors_keeps_hugging_face_outputs() -> None:
    """A ModelOutput stays a ModelOutput (attribute access such as ``.loss`` keeps working)."""
    from transformers.modeling_outputs import CausalLMOutput

    out = CausalLMOutput(loss=torch.tensor(1.0), logits=torch.ones(2, 3))
    mapped = map_tensors(lambda t: t * 2, out)
    assert isinstance(mapped, CausalLMOutput)
    assert float(mapped.loss) == 2.0 and mapped.logits.sum() == 12


class _Reversed(nn.Module):
    """Runs its layers in another order than the chain's."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(self.b(x))


def test_planner_offers_only_pp1_for_a_model_it_cannot_split() -> None:
    """Planning a model whose layers do not run in chain order never yields pp > 1; asking
    for it says why. A model with a skip connection that torch.export traces is split."""
    from uniap.cluster import load_cluster
    from uniap.planner import plan_graph

    assert not is_declared_chain(_Net()) and is_declared_chain(nn.Sequential(nn.Linear(2, 2)))
    assert build_graph(_Net(), torch.zeros(2, 4, dtype=torch.long)).extra["pipeline_split"] == (
        "traced"
    )
    graph = build_graph(_Reversed(), torch.zeros(2, 8), layer_fqns=["a", "b"])
    assert graph.extra["pipeline_splittable"] is False
    assert graph.extra["pipeline_split_error"] == (
        "its layers do not run one after the other: a runs after b"
    )
    cluster = load_cluster("cpu-4")
    assert plan_graph(graph, cluster, global_batch_size=8).pp_degree == 1
    with pytest.raises(ConfigError) as e:
        plan_graph(graph, cluster, global_batch_size=8, pp_degrees=[2])
    assert str(e.value) == (
        "_Reversed cannot be split into pipeline stages: its layers do not run one after the "
        "other: a runs after b; plan with pp_degrees=[1], or define uniap_layer_fqns() if "
        "running its layers one after the other is its forward"
    )


def test_free_parameters_are_charged_whole_whatever_the_layer_kind() -> None:
    """The executor keeps free parameters (model-level, tied) out of every data-parallel
    wrapper: whole on each rank, their gradient all-reduced once per iteration. The graph
    records them on their first owner (and the tied copy on the head); the cost model charges
    them whole under FSDP as under DDP, where the layer's own parameters are sharded."""
    from uniap.cluster import load_cluster
    from uniap.cost_model import CostModel

    ids = torch.zeros(2, 4, dtype=torch.long)
    g = build_graph(_Net(tied=True, model_param=True), ids, pipeline_check=False)
    tok, body, head = (g.layer(f) for f in FQNS)
    assert (tok.free_params, tok.tied_copy_params) == (16 * 8 + 8, 0)
    assert (body.free_params, head.free_params, head.num_params) == (0, 0, 0)
    assert head.tied_copy_params == 16 * 8
    plain = build_graph(_Net(), ids, pipeline_check=False)
    assert all(layer.free_params == layer.tied_copy_params == 0 for layer in plain.layers)

    cm = CostModel(g, load_cluster("cpu-4"), recompute=False)
    t = cm.tables(1, 1, 8)
    names = [s.name if hasattr(s, "name") else str(s) for s in cm.strategies(1)]
    elem = tok.param_bytes / tok.num_params
    free_bytes = tok.free_params * elem
    for k, s in enumerate(cm.strategies(1)):
        if s.tp != 1 or not t.allowed_mask()[0, k]:
            continue
        # tok holds nothing but free parameters: whole, whatever the kind
        assert t.breakdown["param_bytes"][0, k] == pytest.approx(free_bytes), names[k]
        assert t.breakdown["optimizer_bytes"][0, k] == pytest.approx(
            tok.free_params * cm.opt_bytes
        ), names[k]
        if s.dp > 1:  # the gradient all-reduce of the free parameters, once per iteration
            assert t.G[0, k] > 0, names[k]
    # pipeline stages: the head's stage holds a copy of the tied weight too
    t2 = cm.tables(2, 2, 8)
    k = next(k for k, s in enumerate(cm.strategies(2)) if s.kind == "FSDP" and s.dp > 1)
    assert t2.breakdown["param_bytes"][2, k] == pytest.approx(head.tied_copy_params * elem)
