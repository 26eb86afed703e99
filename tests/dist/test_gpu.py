"""The parity grid on CUDA with NCCL (one GPU per rank); skipped without enough GPUs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from grid import cases_of, w2_cases
from harness import run_cases

pytestmark = [
    pytest.mark.dist,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

_W2 = cases_of(w2_cases(), "parity")


@pytest.fixture(scope="module")
def gpu_results_w2() -> dict[str, Any]:
    cases = [c for c in w2_cases() if c["name"] in _W2 and c.get("plan")]
    return run_cases(2, "cases:run_case", cases, device="cuda")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("name", [n for n in _W2 if not n.startswith("planned")])
def test_gpu_world2_matches_reference(gpu_results_w2: dict[str, Any], name: str) -> None:
    """World size 2 on two GPUs (NCCL): training under the plan matches one-GPU training."""
    res = gpu_results_w2[name]
    assert "error" not in res, res.get("error")
    assert res["losses_close"] and res["params_close"], res


def test_gpu_world1_runs_on_cuda() -> None:
    """A one-rank plan runs on cuda:0 with NCCL and matches one-GPU training."""
    from grid import toy

    case = toy("pp1_world1_cuda", 1, [[(1, 1, "DDP")]], c=2)
    res = run_cases(1, "cases:run_case", [case], device="cuda")["pp1_world1_cuda"]
    assert "error" not in res, res.get("error")
    assert res["losses_close"] and res["params_close"], res
