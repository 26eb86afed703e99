"""``uniap.api.parallelize``: refusals before any collective, plan broadcast and agreement,
planning on rank 0, checkpoints, and the collectives each strategy really issues."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch.distributed as dist
from grid import D, F, cases_of, w2_cases, w4_cases
from toy import build_toy, make_plan, toy_batch, toy_fqns, toy_loss, toy_signature

from uniap.api import parallelize, plan_hash
from uniap.errors import PlanMismatchError
from uniap.graph import build_graph
from uniap.models import build_model, example_batch, loss_fn_for


@pytest.fixture
def launched_world_of_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process looks like rank 0 of a torchrun world of 2 that has not communicated."""
    assert not dist.is_initialized()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # any rendezvous attempt would fail loudly
    yield
    assert not dist.is_initialized(), "a refused plan must not initialise the process group"


def _gpt_plan(world_size: int) -> Any:
    graph = build_graph(build_model("gpt-tiny"), example_batch("gpt-tiny", 2)[0], name="gpt-tiny")
    return make_plan(
        list(graph.fqns),
        world_size,
        [[(world_size, 1, D)]],
        global_batch_size=8,
        num_microbatches=1,
        model_name="gpt-tiny",
        signature=graph.signature,
    )


def test_plan_for_another_world_size_refused_before_any_collective(
    launched_world_of_2: None,
) -> None:
    """A plan for 4 devices on a world of 2 is refused, saying both sizes, before rendezvous."""
    model = build_model("gpt-tiny", device="cpu")
    with pytest.raises(
        PlanMismatchError, match="world size: the plan is for 4 devices, 2 were launched"
    ):
        parallelize(
            model,
            plan=_gpt_plan(4),
            loss_fn=loss_fn_for("gpt-tiny"),
            global_batch_size=8,
            example_inputs=example_batch("gpt-tiny", 8)[0],
        )


def test_plan_for_another_model_refused_before_any_collective(launched_world_of_2: None) -> None:
    """A gpt-tiny plan on bert-tiny is refused, naming the layer counts and signatures."""
    model = build_model("bert-tiny", device="cpu")
    with pytest.raises(PlanMismatchError) as err:
        parallelize(
            model,
            plan=_gpt_plan(2),
            loss_fn=loss_fn_for("bert-tiny"),
            global_batch_size=8,
            example_inputs=example_batch("bert-tiny", 8)[0],
        )
    msg = str(err.value)
    assert "layers: the plan has 7 layers, the model 4" in msg
    assert "model signature: plan" in msg and "(model 'gpt-tiny')" in msg


def test_cluster_of_another_size_refused_before_any_collective(launched_world_of_2: None) -> None:
    """Planning for the 4-device cpu-4 cluster on a world of 2 is refused."""
    with pytest.raises(
        PlanMismatchError, match="cluster 'cpu-4' has 4 devices but 2 processes were launched"
    ):
        parallelize(
            build_toy(),
            "cpu-4",
            loss_fn=toy_loss,
            global_batch_size=8,
            example_inputs=toy_batch(8)[0],
        )


def test_tp_on_layer_without_tp_plan_refused_before_any_collective(
    launched_world_of_2: None,
) -> None:
    """tp=2 on an embedding whose table is tied to the head (no TP plan, per
    Layer.supports_tp) is refused with the reason."""

    def tied_toy():
        m = build_toy()
        m.head.proj.weight = m.embed.tok.weight
        return m

    x = toy_batch(8)[0]
    plan = make_plan(
        toy_fqns(),
        2,
        [[(1, 2, D), (1, 2, D), (1, 2, D), (2, 1, D)]],
        global_batch_size=8,
        num_microbatches=1,
        signature=build_graph(tied_toy(), x).signature,
    )
    with pytest.raises(
        PlanMismatchError,
        match="layer 'embed' cannot run at tp=2: embedding/head: the vocabulary weight "
        "embed.tok.weight is tied to head.proj.weight",
    ):
        parallelize(tied_toy(), plan=plan, loss_fn=toy_loss, global_batch_size=8, example_inputs=x)


def test_other_global_batch_refused_before_any_collective(launched_world_of_2: None) -> None:
    """A plan made for a global batch of 8 is refused for 16."""
    plan = make_plan(
        toy_fqns(),
        2,
        [[(2, 1, D)]],
        global_batch_size=8,
        num_microbatches=1,
        signature=toy_signature(),
    )
    with pytest.raises(PlanMismatchError, match="global batch size: the plan is for 8 samples"):
        parallelize(
            build_toy(),
            plan=plan,
            loss_fn=toy_loss,
            global_batch_size=16,
            example_inputs=toy_batch(16)[0],
        )


def test_plan_hash_ignores_predictions_but_not_strategies() -> None:
    """The agreement hash covers what runs, not what was predicted."""
    a = make_plan(toy_fqns(), 2, [[(2, 1, D)]], global_batch_size=8, num_microbatches=1)
    b = dataclasses.replace(
        make_plan(toy_fqns(), 2, [[(2, 1, D)]], global_batch_size=8, num_microbatches=1),
        predicted={"time_per_iteration_s": 1.0},
    )
    c = make_plan(toy_fqns(), 2, [[(2, 1, F)]], global_batch_size=8, num_microbatches=1)
    assert plan_hash(a) == plan_hash(b) != plan_hash(c)


# ------------------------------------------------------------------ spawned (one group per size)
@pytest.mark.dist
def test_world2_ranks_with_different_plans_all_refuse(results_w2: dict[str, Any]) -> None:
    """Rank 1 holding another plan: every rank raises, naming rank 1 and both hashes."""
    res = results_w2["consistency_rank1_other_plan"]
    assert "error" not in res, res.get("error")
    assert len(res["errors"]) == 2
    for msg in res["errors"]:
        assert msg is not None and "rank 1's plan (hash" in msg and "differs from rank 0's" in msg


@pytest.mark.dist
@pytest.mark.parametrize("name", ["planned_gpt_tiny_cpu2", "planned_sequential_cpu2"])
def test_world2_planned_on_rank0_matches_reference(results_w2: dict[str, Any], name: str) -> None:
    """plan=None: rank 0 plans, broadcasts, every rank trains it; parity holds."""
    res = results_w2[name]
    assert "error" not in res, res.get("error")
    assert res["losses_close"] and res["params_close"], res


@pytest.mark.dist
@pytest.mark.parametrize("name", ["planned_bert_tiny_cpu4"])
def test_world4_planned_on_rank0_matches_reference(results_w4: dict[str, Any], name: str) -> None:
    """plan=None on 4 ranks: planned, broadcast, trained with parity."""
    res = results_w4[name]
    assert "error" not in res, res.get("error")
    assert res["losses_close"] and res["params_close"], res


@pytest.mark.dist
@pytest.mark.parametrize(
    ("world", "name"),
    [(2, n) for n in cases_of(w2_cases(), "checkpoint")]
    + [(4, n) for n in cases_of(w4_cases(), "checkpoint")],
)
def test_dcp_state_dict_round_trip(
    results_w2: dict[str, Any], results_w4: dict[str, Any], world: int, name: str
) -> None:
    """dcp.save(pm.state_dict()) then dcp.load + load_state_dict restores every full tensor."""
    res = (results_w2 if world == 2 else results_w4)[name]
    assert "error" not in res, res.get("error")
    assert res["changed_by_training"] and res["restored_equal"], res


@pytest.mark.dist
@pytest.mark.parametrize(
    ("world", "name"),
    [(2, n) for n in cases_of(w2_cases(), "comm_count")]
    + [(4, n) for n in cases_of(w4_cases(), "comm_count")],
)
def test_collectives_per_iteration(
    results_w2: dict[str, Any], results_w4: dict[str, Any], world: int, name: str
) -> None:
    """Rank 0 issues exactly the collectives the cost model charges (kind@group size)."""
    cases = {c["name"]: c for c in (w2_cases() if world == 2 else w4_cases())}
    res = (results_w2 if world == 2 else results_w4)[name]
    assert "error" not in res, res.get("error")
    assert res["counts"] == cases[name]["expect"]


def test_world1_without_torchrun_trains_like_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside torchrun, parallelize makes a world of one (gloo on CPU) and trains exactly like
    the plain model; the process group it created is torn down afterwards."""
    import os

    import torch

    saved_env = dict(os.environ)  # parallelize sets the rendezvous variables of a world of one
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not dist.is_initialized()
    plan = make_plan(
        toy_fqns(),
        1,
        [[(1, 1, D)]],
        global_batch_size=8,
        num_microbatches=2,
        signature=toy_signature(),
    )
    x, y = toy_batch(8)
    try:
        pm = parallelize(
            build_toy(), plan=plan, loss_fn=toy_loss, global_batch_size=8, example_inputs=x
        )
        loss = pm.train_step(x, y)
        ref = build_toy()
        ref_loss = toy_loss(ref(x), y)
        ref_loss.backward()
        assert loss == pytest.approx(ref_loss.item(), rel=1e-6)
        grads = dict(pm.named_parameters())
        for name, p in ref.named_parameters():
            torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-5, atol=1e-7)
        with pytest.raises(
            ValueError, match="batch dim \\[4\\] but the plan is for a global batch of 8"
        ):
            pm.train_step(x[:4], y[:4])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved_env)


def test_world1_train_step_writes_the_training_log(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """ParallelModel.train_step feeds its TrainingLog: rank 0 logs step, loss, time and throughput
    (``uniap.training``), every ``every`` steps."""
    import logging
    import os

    saved_env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    plan = make_plan(
        toy_fqns(),
        1,
        [[(1, 1, D)]],
        global_batch_size=8,
        num_microbatches=2,
        signature=toy_signature(),
    )
    x, y = toy_batch(8)
    try:
        pm = parallelize(
            build_toy(), plan=plan, loss_fn=toy_loss, global_batch_size=8, example_inputs=x
        )
        pm.training_log.every = 2
        with caplog.at_level(logging.INFO, logger="uniap.training"):
            losses = [pm.train_step(x, y) for _ in range(3)]
        lines = [r.getMessage() for r in caplog.records if r.name == "uniap.training"]
        assert [line.split(" |")[0] for line in lines] == ["step 1", "step 2"]
        assert (
            f"loss {losses[1]:.4f}" in lines[1]
            and "samples/s" in lines[1]
            and "/iteration" in lines[1]
        )
        assert pm.training_log.step == 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved_env)


@pytest.mark.dist
def test_world2_peak_memory_counts_state_and_recompute_shrinks_activations(
    results_w2: dict[str, Any],
) -> None:
    """DDP dp2: parameters and gradients are the whole model, AdamW keeps two moments of it
    (plus step counters); recomputing the blocks leaves well under half the saved activations."""
    res = results_w2["memory_pp1_dp2_ddp_c2"]
    assert "error" not in res, res.get("error")
    plain, rc, full = res["plain"], res["recompute"], res["model_param_bytes"]
    for m in (plain, rc):
        assert m["parameters_bytes"] == m["gradients_bytes"] == full
        assert 2 * full < m["optimizer_state_bytes"] <= 2 * full + 1024
        terms = ("parameters_bytes", "gradients_bytes", "optimizer_state_bytes")
        assert m["peak"] == sum(m[k] for k in terms) + m["activations_peak_bytes"]
    assert 0 < rc["activations_peak_bytes"] < plain["activations_peak_bytes"] / 2
