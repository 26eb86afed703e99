"""ZeRO2 layers (FSDP2 ``fully_shard(reshard_after_forward=False)``, gradients reduce-scattered
after every micro-batch) and HSDP layers (``fully_shard`` on a 2-D (replicate, shard) mesh)
train like one process: world 4, CPU gloo, one spawn for every case.

A parity case runs three AdamW steps (``foreach=True``) of the 4-layer toy chain under a plan
mixing ZeRO2 with DDP / FSDP (pp = 1 and pp = 2) and compares with single-process training of
the same model on the same global batches (:func:`cases.parity_case`): every rank's gradients
after the first ``train_step`` (DTensor gradients through ``full_tensor()``), the losses of
every step and the final parameters. A comm-count case counts one iteration's collectives: what
the cost model charges for ZeRO2 (one all-gather per iteration, one reduce-scatter per
micro-batch).
"""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.dist

D, F, Z, H = "DDP", "FSDP", "ZeRO2", "HSDP"


def _cases() -> list[dict]:
    from grid import toy

    return [
        toy("pp1_dp4_zero2_c1", 4, [[(4, 1, Z)]]),
        toy("pp1_dp4_zero2_ddp_fsdp_c2", 4, [[(4, 1, Z), (4, 1, D), (4, 1, F), (4, 1, Z)]], c=2),
        toy("pp1_dp2tp2_zero2_c2", 4, [[(4, 1, Z), (2, 2, Z), (2, 2, F), (4, 1, D)]], c=2),
        toy("pp2_dp2_zero2_fsdp_1f1b_c4", 4, [[(2, 1, Z)], [(2, 1, F)]], c=4, schedule="1F1B"),
        toy("pp2_dp2_ddp_zero2_gpipe_c2", 4, [[(2, 1, D)], [(2, 1, Z), (2, 1, D)]], c=2),
        # HSDP: shard groups of 2 consecutive ranks, replicated twice
        toy("pp1_dp4_hsdp2_c1", 4, [[(4, 1, H, False, 2)]]),
        toy(
            "pp1_dp4_hsdp2_zero2_fsdp_c2",
            4,
            [[(4, 1, H, False, 2), (4, 1, Z), (4, 1, F), (4, 1, H, True, 2)]],
            c=2,
        ),
        # 4 layers with parameters, each gathered once per iteration and reduce-scattered in
        # each of the c micro-batches' backward
        toy(
            "comm_pp1_zero2_c1",
            4,
            [[(4, 1, Z)]],
            kind="comm_count",
            expect={"all_gather_single@4": 4, "reduce_scatter_single@4": 4},
        ),
        toy(
            "comm_pp1_zero2_c4",
            4,
            [[(4, 1, Z)]],
            c=4,
            B=16,
            kind="comm_count",
            expect={"all_gather_single@4": 4, "reduce_scatter_single@4": 16},
        ),
        # HSDP (c = 1): per layer two all-gathers and one reduce-scatter inside the shard group
        # of 2, one all-reduce of the shard across the 2 replicas
        toy(
            "comm_pp1_hsdp2_c1",
            4,
            [[(4, 1, H, False, 2)]],
            kind="comm_count",
            expect={"all_gather_single@2": 8, "reduce_scatter_single@2": 4, "all_reduce@2": 4},
        ),
    ]


def zero2_case(case: dict) -> dict[str, Any] | None:
    """Run on every rank by the harness: parity or comm-count."""
    from cases import comm_count_case, parity_case

    return comm_count_case(case) if case.get("kind") == "comm_count" else parity_case(case)


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    """Every case in one spawned group of 4."""
    from harness import run_cases

    return run_cases(4, "test_zero2_parity:zero2_case", _cases())


@pytest.mark.parametrize("name", [c["name"] for c in _cases() if "kind" not in c])
def test_zero2_plan_matches_reference(results: dict[str, Any], name: str) -> None:
    """Gradients after the first step, losses and final parameters equal single-process
    training's."""
    res = results[name]
    assert "error" not in res, res.get("error")
    assert res["grads_close"], res["bad_grads"]
    assert res["losses_close"], f"losses {res['losses']} vs reference {res['ref_losses']}"
    assert res["params_close"], (res["bad_params"], res["extra_params"])


@pytest.mark.parametrize("name", [c["name"] for c in _cases() if c.get("kind") == "comm_count"])
def test_zero2_collectives_are_what_the_cost_model_charges(
    results: dict[str, Any], name: str
) -> None:
    """One all-gather per layer and iteration, one reduce-scatter per layer and micro-batch."""
    res = results[name]
    assert "error" not in res, res.get("error")
    case = next(c for c in _cases() if c["name"] == name)
    assert res["counts"] == case["expect"]
