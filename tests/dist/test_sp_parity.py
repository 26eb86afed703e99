"""Sequence parallelism (world size 4, one spawn): a uniap preset (gpt-tiny) and an unmodified
Hugging Face Llama train with dp = 2 x tp = 2 + sp on their TP layers (FSDP, ZeRO2, DDP as
FSDP2 ``replicate``; and the GPT in two pipeline stages of tp = 2) as on one process (losses
and every gradient, SGD with foreach), with and without recompute; and an SP layer (tp = 4)
saves for backward exactly the bytes the planner charges it (with recompute: the sequence
chunk of its input)."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.dist

CASES = [
    {"name": "gpt_dp2_tp2_sp_fsdp", "kind": "parity", "model": "gpt", "dp_kind": "FSDP"},
    {
        "name": "gpt_dp2_tp2_sp_zero2_recompute_c2",
        "kind": "parity",
        "model": "gpt",
        "dp_kind": "ZeRO2",
        "recompute": True,
        "c": 2,
    },
    {
        "name": "gpt_pp2_1f1b_c2_tp2_sp_recompute",
        "kind": "parity",
        "model": "gpt",
        "pp": 2,
        "c": 2,
        "recompute": True,
    },
    {"name": "llama_hf_dp2_tp2_sp_ddp", "kind": "parity", "model": "llama"},
    {
        "name": "llama_hf_dp2_tp2_sp_ddp_recompute",
        "kind": "parity",
        "model": "llama",
        "recompute": True,
    },
    {"name": "gpt_memory", "kind": "memory", "model": "gpt"},
    {"name": "llama_hf_memory", "kind": "memory", "model": "llama"},
    {"name": "gpt_memory_recompute", "kind": "memory", "model": "gpt", "recompute": True},
    {"name": "llama_hf_memory_recompute", "kind": "memory", "model": "llama", "recompute": True},
    # vocabulary-parallel head on the last of two pipeline stages (vocab_parallel.vocab_case)
    {"name": "gpt_pp2_vocab_tp2", "kind": "vocab", "family": "gpt", "pp": 2,
     "others": (1, 2, "DDP")},
    {"name": "gpt_pp2_softmax_loss_refused", "kind": "vocab", "family": "gpt", "pp": 2,
     "others": (1, 2, "DDP"), "loss": "softmax", "c": 2},
]  # fmt: skip


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    from harness import run_cases

    return run_cases(4, "sp_cases:sp_case", CASES)


@pytest.mark.parametrize("name", [c["name"] for c in CASES if c["kind"] == "parity"])
def test_dp2_tp2_sp_matches_one_process(results: dict[str, Any], name: str) -> None:
    """Training with sequence parallelism on the TP layers equals one process."""
    res = results[name]
    assert "error" not in res, res.get("error")
    case = next(c for c in CASES if c["name"] == name)
    assert res["num_sp"] >= 2, res["plan"]
    assert f"sp {case.get('dp_kind', 'DDP')}" in res["plan"], res["plan"]  # the plan as named
    assert res["num_grads"] > 0
    assert res["losses_close"], f"losses {res['losses']} vs reference {res['ref_losses']}"
    assert not res["bad_grads"], res["bad_grads"]
    assert not res["missing_grads"], res["missing_grads"]
    assert not res["partial_grads"], "gradients left unsummed over TP"


@pytest.mark.parametrize("name", [c["name"] for c in CASES if c["kind"] == "memory"])
def test_tp4_sp_saved_bytes_are_planned(results: dict[str, Any], name: str) -> None:
    """The bytes an SP layer saves for backward on a rank are the planner's number (with
    recompute: the chunk of its input). HF Llama: what SP saves less than TP is the planner's
    difference; its absolute bytes also hold the rotary tables, inputs of every layer whose
    size does not grow with the batch, which the per-sample trace scales with it (the same
    with or without SP), so only the GPT preset is compared absolutely without recompute."""
    res = results[name]
    assert "error" not in res, res.get("error")
    assert res["measured_sp"] < res.get("measured_tp", float("inf"))
    if "llama" in name and "measured_tp" in res:
        measured = res["measured_tp"] - res["measured_sp"]
        assert measured == pytest.approx(res["planned_tp"] - res["planned_sp"], rel=1e-9), res
    else:
        assert res["measured_sp"] == pytest.approx(res["planned_sp"], rel=1e-9), res
        if "measured_tp" in res:
            assert res["measured_tp"] == pytest.approx(res["planned_tp"], rel=1e-9), res


def test_pp2_vocab_parallel_head_matches_one_process(results: dict[str, Any]) -> None:
    """A vocabulary-parallel head (tp = 2) on the last of two pipeline stages: its loss runs
    under loss_parallel() inside the 1F1B schedule; losses and every gradient as on one
    process, each last-stage rank holding V / 2 of the logits."""
    res = results["gpt_pp2_vocab_tp2"]
    assert "error" not in res, res.get("error")
    assert "||" in res["plan"] and "tp2" in res["plan"], res["plan"]
    assert res["held_logits"] == [["DTensor", res["vocab_size"] // 2]], res["held_logits"]
    assert res["losses_close"], f"losses {res['losses']} vs reference {res['ref_losses']}"
    assert res["num_grads"] > 0
    assert not res["bad_grads"], res["bad_grads"]
    assert not res["missing_grads"], res["missing_grads"]


def test_pp2_refused_loss_reaches_every_stage(results: dict[str, Any]) -> None:
    """A loss that would gather the sharded logits, on the last of two stages, is refused on
    every rank after the first step (the first stage too, which never runs the loss), with
    the last stage's message: no rank waits for the process group's timeout."""
    from vocab_parallel import FIX

    res = results["gpt_pp2_softmax_loss_refused"]
    assert "error" not in res, res.get("error")
    expected = (
        "UniapError: the loss applies AmaxBackward0, LogBackward0, SoftmaxBackward0 to the "
        "logits of 'head'"
    )
    assert len(res["refused_on"]) == 4
    for said in res["refused_on"]:
        assert said is not None and said.startswith(expected), res["refused_on"]
        assert said.endswith(FIX), said
