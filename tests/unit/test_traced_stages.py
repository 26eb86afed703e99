"""Splitting a model's own forward into pipeline stages by tracing it, on one process: the
routed stages compute the model (outputs and gradients, a value passed through a middle
stage), the refusals name the failure, device constants are retargeted, and the planner
offers pp > 1 at tp = 1 to a traced model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from uniap.errors import PlanMismatchError
from uniap.executor.traced_stages import (
    RoutedForward,
    retarget_device,
    trace_inputs,
    trace_split,
)
from uniap.graph import build_graph


class _Skip(nn.Module):
    """An embedding whose output skips both blocks and reaches the head (three stages: the
    skip passes through the middle one), a model-level scale, a dict output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.head = nn.Linear(8, 16)
        self.scale = nn.Parameter(torch.full((8,), 1.5))

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        h0 = self.tok(ids) * self.scale
        h = self.blocks[1](torch.relu(self.blocks[0](h0)))
        logits = self.head(h + h0)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return out


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:
            h = h * 2
        return self.b(h)


def _run(split, values):
    for k, stage in enumerate(split.stages):
        values = RoutedForward(stage.forward, split.routing, k)(*values)
    return split.output(values)


def test_three_traced_stages_compute_the_model_and_its_gradients() -> None:
    model = _Skip()
    ids, labels = torch.randint(16, (4, 5)), torch.randint(16, (4, 5))
    args, kwargs = trace_inputs((ids,), {"labels": labels}, batch=4, rows=2)
    split = trace_split(model, ["blocks.0", "blocks.1"], args, kwargs)
    assert len(split.stages) == 3
    assert split.routing.root_inputs == ("ids", "labels")
    # the scaled embedding reaches stage 2 through stage 1, as do the labels
    assert len(split.routing.live[1]) == 3 and ("labels", None) in split.routing.live[1]
    out = _run(split, split.root_values((ids[:2],), {"labels": labels[:2]}))
    ref = model(ids[:2], labels=labels[:2])
    assert isinstance(out, dict) and set(out) == {"logits", "loss"}
    torch.testing.assert_close(out["logits"], ref["logits"], rtol=0, atol=0)
    out["loss"].backward()
    ref["loss"].backward()
    got = {n: p.grad for s in split.stages for n, p in s.named_parameters() if p.grad is not None}
    want = {n: p.grad for n, p in model.named_parameters()}
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-7)
    # the template is untouched: the stages hold copies
    assert model.tok.weight is not split.stages[0].get_parameter("tok.weight")


def test_a_forward_export_cannot_trace_is_refused_with_the_failure() -> None:
    with pytest.raises(PlanMismatchError) as e:
        trace_split(_DataDependent(), ["b"], (torch.randn(2, 8),), {})
    msg = str(e.value)
    assert msg.startswith(
        "_DataDependent cannot be split into 2 pipeline stages: torch.export could not trace "
        "its forward ("
    )
    assert msg.endswith(
        "plan with pp=1 (any model runs there), or declare the model a chain (nn.Sequential or "
        "uniap_layer_fqns()) if feeding each layer's output to the next is its forward"
    )


def test_planner_side_check_and_the_graph_record() -> None:
    graph = build_graph(_Skip(), torch.zeros(2, 5, dtype=torch.long))
    assert graph.extra["pipeline_split"] == "traced"
    dd = build_graph(_Skip(), torch.zeros(2, 5, dtype=torch.long), pipeline_check=False)
    assert dd.extra["pipeline_split"] is None
    assert dd.extra["pipeline_split_error"] == "not checked (pipeline_check=False)"
    chain = build_graph(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), torch.zeros(2, 8))
    assert chain.extra["pipeline_split"] == "chain"


def test_planner_offers_pp2_at_tp1_to_a_traced_model() -> None:
    from uniap.cluster import load_cluster
    from uniap.cost_model import CostModel
    from uniap.planner import plan_graph

    graph = build_graph(_Skip(), torch.zeros(2, 5, dtype=torch.long))
    cluster = load_cluster("cpu-4")
    cm = CostModel(graph, cluster)
    assert {s.tp for s in cm.strategies(1)} == {1, 2, 4}
    assert {s.tp for s in cm.strategies(2)} == {1}
    plan = plan_graph(graph, cluster, global_batch_size=8, pp_degrees=[2])
    assert plan.pp_degree == 2 and {ls.tp for ls in plan.layer_strategies} == {1}


def test_device_constants_are_retargeted() -> None:
    class Arange(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x) + torch.arange(4, device=x.device))

    split = trace_split(Arange(), ["b"], (torch.randn(2, 4),), {})
    stage = split.stages[0]
    devices = lambda: {  # noqa: E731
        str(n.kwargs["device"])
        for m in stage.modules()
        if isinstance(getattr(m, "graph", None), torch.fx.Graph)
        for n in m.graph.nodes
        if "device" in n.kwargs
    }
    assert devices() == {"cpu"}
    retarget_device(stage, torch.device("meta"))
    assert devices() == {"meta"}


def test_a_discovered_chain_is_ordered_as_the_forward_runs_it() -> None:
    """BART registers layernorm_embedding after the encoder layers but runs it before them:
    the graph's chain follows the forward, so the model can be split."""
    import hf_own_forward as hf

    graph = build_graph(hf.build("bart"), hf.batch("bart", 2, 0))
    fqns = list(graph.fqns)
    assert fqns.index("model.encoder.layernorm_embedding") < fqns.index("model.encoder.layers.0")
    assert graph.extra["pipeline_split"] == "traced"
