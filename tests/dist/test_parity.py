"""Distributed parity: training under a plan equals single-process training (CPU, gloo).

Every case runs three AdamW steps and compares the per-step losses and the final full
parameters with a single-process reference (same seed, same global batches), rtol 1e-4.
The plans are in ``grid.py``; all cases of one world size share one spawned group.
"""

from __future__ import annotations

from typing import Any

import pytest
from grid import cases_of, w2_cases, w4_cases

pytestmark = pytest.mark.dist


def _check(res: dict[str, Any]) -> None:
    assert "error" not in res, res.get("error")
    assert res["losses_close"], f"losses {res['losses']} vs reference {res['ref_losses']}"
    assert res["params_close"], (
        f"parameters differ: {res['bad_params']} extra {res['extra_params']} "
        f"(worst {res['worst_param']}: {res['worst_param_diff']:.3g})"
    )
    if "forward_close" in res:
        assert res["forward_close"], "forward() output differs from the reference model's"


@pytest.mark.parametrize("name", cases_of(w2_cases(), "parity"))
def test_world2_matches_reference(results_w2: dict[str, Any], name: str) -> None:
    """World size 2: training under the plan matches single-process training."""
    _check(results_w2[name])


@pytest.mark.parametrize("name", cases_of(w4_cases(), "parity"))
def test_world4_matches_reference(results_w4: dict[str, Any], name: str) -> None:
    """World size 4: training under the plan matches single-process training."""
    _check(results_w4[name])


@pytest.mark.parametrize(
    "name", ["hf_gpt2_pp1_dp2_fsdp_c2", "hf_llama_pp1_tp2_c2", "hf_bert_pp2_1f1b_c2"]
)
def test_world2_hf_model_matches_reference(results_w2: dict[str, Any], name: str) -> None:
    """World size 2: a Hugging Face model adapted by uniap.models.hf trains like one process."""
    pytest.importorskip("transformers")
    _check(results_w2[name])
