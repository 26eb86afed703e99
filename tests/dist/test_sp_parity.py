"""Sequence parallelism (world size 2, one spawn): a uniap preset (gpt-tiny) and an unmodified
Hugging Face Llama train with tp = 2 + sp on their TP layers as on one process (losses and
every gradient, SGD with foreach), with and without recompute; and an SP layer saves for
backward exactly the bytes the planner charges it (with recompute: the sequence chunk of its
input)."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.dist

CASES = [
    {"name": "gpt_tp2_sp", "kind": "parity", "model": "gpt"},
    {
        "name": "gpt_tp2_sp_recompute_c2",
        "kind": "parity",
        "model": "gpt",
        "recompute": True,
        "c": 2,
    },
    {"name": "llama_hf_tp2_sp", "kind": "parity", "model": "llama"},
    {"name": "llama_hf_tp2_sp_recompute", "kind": "parity", "model": "llama", "recompute": True},
    {"name": "gpt_memory", "kind": "memory", "model": "gpt"},
    {"name": "llama_hf_memory", "kind": "memory", "model": "llama"},
    {"name": "gpt_memory_recompute", "kind": "memory", "model": "gpt", "recompute": True},
    {"name": "llama_hf_memory_recompute", "kind": "memory", "model": "llama", "recompute": True},
]


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    from harness import run_cases

    return run_cases(2, "sp_cases:sp_case", CASES)


@pytest.mark.parametrize("name", [c["name"] for c in CASES if c["kind"] == "parity"])
def test_tp2_sp_matches_one_process(results: dict[str, Any], name: str) -> None:
    """Training with sequence parallelism on the TP layers equals one process."""
    res = results[name]
    assert "error" not in res, res.get("error")
    assert res["num_sp"] >= 2, res["plan"]
    assert res["num_grads"] > 0
    assert res["losses_close"], f"losses {res['losses']} vs reference {res['ref_losses']}"
    assert not res["bad_grads"], res["bad_grads"]
    assert not res["partial_grads"], "gradients left unsummed over TP"


@pytest.mark.parametrize("name", [c["name"] for c in CASES if c["kind"] == "memory"])
def test_tp2_sp_saved_bytes_are_planned(results: dict[str, Any], name: str) -> None:
    """The bytes an SP layer saves for backward on a rank are the planner's number."""
    res = results[name]
    assert "error" not in res, res.get("error")
    assert res["measured"] == pytest.approx(res["planned"], rel=1e-6), res
