"""Distributed parity: training under a plan equals single-process training (CPU, gloo).

Every case runs three AdamW steps (``foreach=True``, CUDA's default, on ``pm.param_groups()``;
``fused=True`` in the ``fused_`` cases) and compares the per-step losses and the final full
parameters with a single-process reference (same seed, same global batches), rtol 1e-4, and
every rank's gradients after the first backward (DTensor gradients made full) with the
reference's, rtol 1e-4 plus 1e-5 x the largest reference gradient entry (``cases.py`` says
why): AdamW's update does not see a gradient's scale, the gradient check does. The
``clip_`` cases also clip with ``pm.clip_grad_norm_`` and compare the norms with
``torch.nn.utils.clip_grad_norm_`` on one process.
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
    assert res["grads_close"], (
        f"gradients after the first backward differ: {res['bad_grads']} "
        f"(worst {res['worst_grad']}: {res['worst_grad_error']:.3g})"
    )
    if res["grad_norms"] or res["ref_grad_norms"]:
        assert res["grad_norms_close"], (
            f"gradient norms {res['grad_norms']} vs reference {res['ref_grad_norms']}"
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


@pytest.mark.parametrize(
    ("world", "name"),
    [
        (2, "fused_pp1_ddp_fsdptp2_tp2_fsdp_c2"),
        (4, "clip_fused_pp1_ddp_dp2tp2fsdp_tp4_fsdp_c2"),
        (4, "clip_fused_pp2_fsdp_tp2_1f1b_c2"),
    ],
)
def test_fused_adamw_steps_on_a_stage_mixing_plain_tensors_and_dtensors(
    results_w2: dict[str, Any], results_w4: dict[str, Any], world: int, name: str
) -> None:
    """AdamW(fused=True) on pm.param_groups() steps where rank 0's stage holds plain tensors
    (classic DDP / TP-replicated norms) and DTensors, one group of each."""
    res = (results_w2 if world == 2 else results_w4)[name]
    _check(res)
    assert res["tensor_kinds"] == ["dtensor", "plain"], res["tensor_kinds"]
    assert res["num_param_groups"] == 2


@pytest.mark.parametrize(
    "name",
    [
        "clip_fused_pp1_ddp_dp2tp2fsdp_tp4_fsdp_c2",
        "clip_fused_pp2_fsdp_tp2_1f1b_c2",
        "clip_pp4_1f1b_c4",
    ],
)
def test_world4_clip_grad_norm_equals_single_process(results_w4: dict[str, Any], name: str) -> None:
    """pm.clip_grad_norm_ returns torch's single-process global norm at pp = 1, 2, 4 and clips
    by it (the clipped training still matches)."""
    res = results_w4[name]
    _check(res)
    assert len(res["grad_norms"]) == 3
    assert all(n > 0.05 for n in res["ref_grad_norms"]), "the clip must be active"
    for post in res["post_clip_norms"]:
        assert post == pytest.approx(0.05, rel=1e-4), res["post_clip_norms"]


def test_world2_gradient_check_fails_gradients_summed_over_ranks(
    results_w2: dict[str, Any],
) -> None:
    """Gradients doubled after each backward (a sum over the 2 data-parallel ranks instead of
    the mean): the losses stay within tolerance (Adam's update hardly sees the scale) but the
    gradient check fails on every parameter, by the factor 2."""
    res = results_w2["control_pp1_dp2_fsdp_grads_summed_c2"]
    assert "error" not in res, res.get("error")
    assert res["losses_close"], "Adam's update was expected not to see the scale"
    assert not res["grads_close"]
    assert res["bad_grads"], res
    assert all(b.endswith("|g| / |g_ref| = 2") for b in res["bad_grads"]), res["bad_grads"]


@pytest.mark.parametrize("world", [2, 4])
def test_one_fsdp_root_per_stage(
    results_w2: dict[str, Any], results_w4: dict[str, Any], world: int
) -> None:
    """Every parity case whose (rank 0) stage has FSDP2 layers (fully_shard or replicate) has
    exactly one FSDP root, the stage module; a stage without them has none."""
    results = results_w2 if world == 2 else results_w4
    cases = cases_of(w2_cases() if world == 2 else w4_cases(), "parity")
    checked = 0
    for name in cases:
        res = results[name]
        assert "error" not in res, f"{name}: {res.get('error')}"
        if res["fsdp2_layers"]:
            assert res["fsdp_roots"] == 1 and res["fsdp_root_is_stage"], (name, res)
            checked += 1
        else:
            assert res["fsdp_roots"] == 0, (name, res)
    assert checked >= 5
