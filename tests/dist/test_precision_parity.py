"""bf16-mixed precision (``Plan.precision``) against a single-process reference under
``torch.autocast(bfloat16)`` with fp32 master weights (world size 4, CPU gloo).

The cases (``grid.precision_cases``: DDP, FSDP, TP, FSDP x TP, pp = 2 1F1B) train three steps
of SGD with momentum, whose updates are linear in the gradients, so comparing each tensor's
total update compares the gradients. Tolerances:

* losses: relative 2e-3. The same bf16 model evaluated with different reduction orders (TP
  shards, micro-batches) differs by a few bf16 roundings of the logits' contributions to a
  mean; observed below 3e-4.
* updates: relative error ``|d - d_ref| / |d_ref|`` at most 5e-2 per tensor. bf16's unit
  roundoff is 2^-8 (0.39%); a gradient passes through about ten bf16 roundings (matmul
  outputs, saved activations) in forward and backward, whose errors add like a random walk
  (~1.2%; the observed worst is ~2%, and the fp32 and bf16 references themselves differ by
  1.3%). 5% keeps a margin while every real defect fails: a gradient summed over the wrong
  group or a dropped micro-batch is off by 25% or more.

What makes these runs mixed precision, checked separately (the tolerances alone could not
tell bf16 from fp32 compute): every nn.Linear computed in bfloat16 during training, and the
parameters (master copy) and the optimizer state are float32.
"""

from __future__ import annotations

from typing import Any

import pytest
from grid import precision_cases

pytestmark = pytest.mark.dist

_NAMES = [c["name"] for c in precision_cases()]


@pytest.mark.parametrize("name", _NAMES)
def test_world4_bf16_mixed_matches_autocast_reference(
    results_w4: dict[str, Any], name: str
) -> None:
    """bf16-mixed training matches torch.autocast(bfloat16) training on one process, with
    bf16 compute, fp32 master parameters and fp32 optimizer state."""
    res = results_w4[name]
    assert "error" not in res, res.get("error")
    assert res["losses_close"], f"losses {res['losses']} vs reference {res['ref_losses']}"
    assert res["params_close"], (
        f"updates differ: {res['bad_params']} (worst {res['worst_param']}: "
        f"{res['worst_param_diff']:.3g})"
    )
    assert res["linear_output_dtypes"] == ["torch.bfloat16"], res["linear_output_dtypes"]
    assert res["master_dtypes"] == ["torch.float32"], res["master_dtypes"]
    assert res["optimizer_state_dtypes"] == ["torch.float32"], res["optimizer_state_dtypes"]
    if res["forward_dtype"] is not None:
        assert res["forward_dtype"] == "torch.bfloat16"
