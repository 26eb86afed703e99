"""A model that runs its own forward keeps the values between its layers in the first layer's
layout (the base) and reshards around every layer in another layout; a vocabulary-parallel
head takes its loss in that base batch layout, which works only when the head's TP degree
divides the first layer's (:mod:`uniap.executor.vocab_loss`). The planner searches one case
per base (:func:`uniap.planner.layout_cases`), priced with that base, and its plan equals the
exhaustive optimum over every plan the executor runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uniap.cluster import load_cluster
from uniap.cost_model import CostModel
from uniap.executor.vocab_loss import check_head_layout
from uniap.graph import build_graph
from uniap.planner import candidate_tables, layout_cases, plan_graph
from uniap.search import frontier
from uniap.strategies import divisors

transformers = pytest.importorskip("transformers")

KW = {"recompute": False, "kinds": ("DDP", "FSDP")}


def _llama(scaled_embedding: bool):
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        vocab_size=8192,
        max_position_embeddings=256,
        use_cache=False,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    # an embedding that counts its rows' frequency keeps tp = 1 (the sharded lookup cannot)
    model.model.embed_tokens.scale_grad_by_freq = scaled_embedding
    inputs = {"input_ids": torch.zeros(2, 128, dtype=torch.long)}
    return build_graph(model, inputs, name="llama")


def _optimum(graph, cluster, layer_tp=None, base_tp=None) -> float:
    cm = CostModel(graph, cluster, layer_tp=layer_tp, base_tp=base_tp, **KW)
    pps = [p for p in divisors(cluster.world_size) if p <= graph.num_layers]
    limit = cm.memory_limit_bytes
    best = float("inf")
    for _, _, _, t in candidate_tables(cm, pps, 8, None, None):
        best = min([best] + [tpi for peak, tpi in frontier(t) if peak <= limit])
    return best


def test_head_at_a_degree_the_first_layer_cannot_share_is_replanned() -> None:
    """The embedding keeps tp = 1; unrestricted, the best plan puts the head at tp = 2 (the
    premise); the planner's plan keeps the head at a degree that divides the first layer's,
    the executor's check accepts it, and its time is the exhaustive optimum over the layout
    cases (every plan the executor can run)."""
    graph, cluster = _llama(scaled_embedding=True), load_cluster("cpu-4")
    assert graph.extra["pipeline_split"] != "chain"
    cases = layout_cases(graph, cluster.world_size, 4)
    head, first = graph.layers[-1].fqn, graph.layers[0].fqn
    assert cases == [(1, {first: frozenset({1}), head: frozenset({1})})]
    assert _optimum(graph, cluster) < min(_optimum(graph, cluster, c, b) for b, c in cases)
    plan = plan_graph(graph, cluster, global_batch_size=8, **KW)
    tps = {ls.fqn: (ls.dp, ls.tp) for ls in plan.layer_strategies}
    assert tps[first][1] % tps[head][1] == 0
    check_head_layout(plan, {layer.fqn: layer for layer in graph.layers}, tps[first])
    expected = min(_optimum(graph, cluster, c, b) for b, c in cases)
    assert plan.predicted["time_per_iteration_s"] == pytest.approx(expected, rel=1e-9)


def test_no_layout_cases_for_a_declared_chain_or_a_head_without_vocabulary_tp() -> None:
    """A declared chain runs the loss on the head's output where it is: no rule."""
    from uniap import models

    m = models.build_model("gpt-tiny", device="meta")
    g = build_graph(m, models.example_batch(m, 2, device="meta")[0], name="gpt-tiny")
    assert g.extra["pipeline_split"] == "chain" and layout_cases(g, 4, 4) == []


def test_vocab_parallel_false_keeps_embedding_and_head_at_tp1() -> None:
    """``vocab_parallel=False`` (for a loss other than cross-entropy, which loss_parallel() would
    refuse): the unrestricted plan puts the head at tp > 1 (the premise); the restricted one
    keeps the embedding and head at tp = 1, and its time is the exhaustive optimum over the
    plans that do."""
    graph, cluster = _llama(scaled_embedding=False), load_cluster("cpu-4")
    head, first = graph.layers[-1].fqn, graph.layers[0].fqn
    free = plan_graph(graph, cluster, global_batch_size=8, **KW)
    assert {ls.fqn: ls.tp for ls in free.layer_strategies}[head] > 1
    plan = plan_graph(graph, cluster, global_batch_size=8, vocab_parallel=False, **KW)
    tps = {ls.fqn: ls.tp for ls in plan.layer_strategies}
    assert tps[head] == tps[first] == 1
    held = {head: frozenset({1}), first: frozenset({1})}
    expected = _optimum(graph, cluster, held, 1)
    assert plan.predicted["time_per_iteration_s"] == pytest.approx(expected, rel=1e-9)


def test_own_forward_plans_pay_a_reshard_in_and_out_of_every_layer_off_the_base() -> None:
    """What the executor runs for a model with its own forward: every layer whose layout is
    not the first layer's reshards its inputs in and its outputs back, and checks a signature
    on every call. The base-priced cost model charges exactly that per such layer (a chain's
    ``R`` only at layout changes), ``evaluate`` prices a plan with its own first layer as the
    base, and the planner's plan equals the exhaustive optimum over the base cases."""
    graph, cluster = _llama(scaled_embedding=False), load_cluster("cpu-4")
    cases = layout_cases(graph, cluster.world_size, 4)
    assert [b for b, _ in cases] == [1, 2, 4]
    L = graph.num_layers
    for beta, _ in cases:
        cm = CostModel(graph, cluster, base_tp=beta, **KW)
        t = cm.tables(1, 1, 8)
        base = t.layout[0][[k for k in range(t.num_strategies) if t.allowed_mask()[0, k]][0]]
        assert set(t.layout[0][t.allowed_mask()[0]]) == {base}  # the first layer at the base
        for u in range(L - 1):
            assert (t.R[u, :, base] == 0).all()
            for b in range(t.num_layouts):
                if b != base:  # the same charge whatever the previous layer's layout
                    assert (t.R[u, :, b] > 0).all() and np.ptp(t.R[u, :, b]) == 0
    # a plan with its blocks off the base: charged per block, not per change of layout
    plan = plan_graph(graph, cluster, global_batch_size=8, **KW)
    expected = min(_optimum(graph, cluster, c, b) for b, c in cases)
    assert plan.predicted["time_per_iteration_s"] == pytest.approx(expected, rel=1e-9)
    chain = CostModel(graph, cluster, **KW)
    assert chain.evaluate(plan).time_per_iteration_s == pytest.approx(
        plan.predicted["time_per_iteration_s"], rel=1e-9
    )


def test_a_base_case_stopped_at_its_limit_keeps_the_plan_unproven(monkeypatch) -> None:
    """The plan is the best over the base cases, and it is proven only when every case is:
    a case that stopped at its time limit with a bound below the plan's time makes the plan
    ``time_limit`` with that gap (cases stand in for slow searches here)."""
    import dataclasses

    import uniap.planner as planner

    graph, cluster = _llama(scaled_embedding=False), load_cluster("cpu-4")
    real = planner._plan_graph
    template = real(
        graph, cluster, global_batch_size=8, profile=None, schedules=None, pp_degrees=None,
        num_microbatches=None, memory_fraction=0.9, max_tp=None, recompute=False,
        kinds=KW["kinds"], sequence_parallel=False, time_limit_s=10, threads=1, seed=0,
        say=None, progress_interval_s=5.0, precision=None, base_tp=1,
    )  # fmt: skip
    fake = {1: (1.0, 0.0), 2: (1.1, 0.2), 4: (1.3, 0.0)}  # base tp -> (time, gap)

    def stand_in(*args, base_tp=None, **kwargs):
        tpi, gap = fake[base_tp]
        status = "time_limit" if gap else "optimal"
        return dataclasses.replace(
            template,
            predicted={**template.predicted, "time_per_iteration_s": tpi},
            solver={**template.solver, "status": status, "gap": gap},
        )

    monkeypatch.setattr(planner, "_plan_graph", stand_in)
    got = plan_graph(graph, cluster, global_batch_size=8, **KW)
    assert got.predicted["time_per_iteration_s"] == 1.0
    assert got.solver["status"] == "time_limit"
    assert got.solver["gap"] == pytest.approx(1 - 1.1 * 0.8)
    fake[2] = (1.1, 0.05)  # its bound above the plan: proven
    got = plan_graph(graph, cluster, global_batch_size=8, **KW)
    assert got.solver["status"] == "optimal" and got.solver["gap"] == 0.0
