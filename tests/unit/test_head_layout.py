"""A vocabulary-parallel head in a model that runs its own forward takes its loss in the first
layer's batch layout, which works only when the head's TP degree divides the first layer's
(:mod:`uniap.executor.vocab_loss`). The planner must return only plans the executor runs:
when the best plan breaks that rule it searches the layout cases
(:func:`uniap.planner.head_layout_cases`), and its plan equals the exhaustive optimum over
every plan that keeps the rule."""

from __future__ import annotations

import pytest
import torch

from uniap.cluster import load_cluster
from uniap.cost_model import CostModel
from uniap.executor.vocab_loss import check_head_layout
from uniap.graph import build_graph
from uniap.planner import candidate_tables, head_layout_cases, plan_graph
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


def _optimum(graph, cluster, layer_tp=None) -> float:
    cm = CostModel(graph, cluster, layer_tp=layer_tp, **KW)
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
    cases = head_layout_cases(graph, cluster.world_size)
    head, first = graph.layers[-1].fqn, graph.layers[0].fqn
    assert cases[0] == {head: frozenset({1}), first: frozenset({1, 2, 4})}
    assert _optimum(graph, cluster) < min(_optimum(graph, cluster, case) for case in cases)
    plan = plan_graph(graph, cluster, global_batch_size=8, **KW)
    tps = {ls.fqn: (ls.dp, ls.tp) for ls in plan.layer_strategies}
    assert tps[first][1] % tps[head][1] == 0
    check_head_layout(plan, {layer.fqn: layer for layer in graph.layers}, tps[first])
    expected = min(_optimum(graph, cluster, case) for case in cases)
    assert plan.predicted["time_per_iteration_s"] == pytest.approx(expected, rel=1e-9)


def test_no_layout_cases_for_a_declared_chain_or_a_head_without_vocabulary_tp() -> None:
    """A declared chain runs the loss on the head's output where it is: no rule."""
    from uniap import models

    m = models.build_model("gpt-tiny", device="meta")
    g = build_graph(m, models.example_batch(m, 2, device="meta")[0], name="gpt-tiny")
    assert g.extra["pipeline_split"] == "chain" and head_layout_cases(g, 4) == []


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
    expected = _optimum(graph, cluster, held)
    assert plan.predicted["time_per_iteration_s"] == pytest.approx(expected, rel=1e-9)
