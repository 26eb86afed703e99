"""FSDP-offload layers (FSDP2 ``fully_shard(offload_policy=CPUOffloadPolicy())``: sharded
parameters, gradients and optimizer state in host memory, gathered and reduced in every
micro-batch) train like one process: world 4, CPU gloo, one spawn for every case.

FSDP2's CPU offload runs on CPU devices with gloo (the host-device copies are no-ops there), so
the executor's path is the one a GPU run takes. A parity case runs three SGD steps (momentum,
``foreach=True``) of the 4-layer toy chain under a plan mixing FSDP-offload with DDP / FSDP
(pp = 1, pp = 2, and pp = 4: offload on stages of one device) and compares with
single-process training on the same global batches (:func:`cases.parity_case`): every rank's
gradients after the first ``train_step`` (DTensor gradients through ``full_tensor()``), the
losses of every step and the final parameters; it also reads which layers FSDP2 really
offloads. A comm-count case counts one iteration's collectives:
what the cost model charges (two all-gathers and one reduce-scatter per layer and micro-batch).
"""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.dist

D, F, OFF = "DDP", "FSDP", "FSDP-offload"


def _cases() -> list[dict]:
    from grid import toy

    return [
        toy("pp1_dp4_offload_c1", 4, [[(4, 1, OFF)]], optimizer="sgd"),
        toy(
            "pp1_dp4_offload_fsdp_ddp_c2",
            4,
            [[(4, 1, OFF), (4, 1, F), (4, 1, D), (4, 1, OFF, True)]],
            c=2,
            optimizer="sgd",
        ),
        toy(
            "pp2_dp2_offload_fsdp_1f1b_c4",
            4,
            [[(2, 1, OFF)], [(2, 1, F), (2, 1, OFF)]],
            c=4,
            schedule="1F1B",
            optimizer="sgd",
        ),
        # stages of one device: offload at dp = 1 (fully_shard over the one rank: the whole
        # layer's state on the host) next to a plain layer, recompute on the last
        toy(
            "pp4_dp1_offload_ddp_1f1b_c4",
            4,
            [[(1, 1, OFF)], [(1, 1, D)], [(1, 1, OFF)], [(1, 1, OFF, True)]],
            c=4,
            schedule="1F1B",
            optimizer="sgd",
        ),
        # built on the meta device: each rank materialises only its host shards
        toy("meta_pp1_dp4_offload_fsdp_c2", 4, [[(4, 1, OFF), (4, 1, F)]], c=2, kind="meta"),
        # 4 layers with parameters, each gathered twice (forward, backward) and
        # reduce-scattered once in each of the c micro-batches
        toy(
            "comm_pp1_offload_c2",
            4,
            [[(4, 1, OFF)]],
            c=2,
            kind="comm_count",
            expect={"all_gather_single@4": 16, "reduce_scatter_single@4": 8},
        ),
    ]


def offload_case(case: dict) -> dict[str, Any] | None:
    """Run on every rank by the harness: parity, meta start or comm-count."""
    from cases import comm_count_case, meta_case, parity_case

    kind = case.get("kind")
    if kind == "meta":
        return meta_case(case)
    return comm_count_case(case) if kind == "comm_count" else parity_case(case)


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    """Every case in one spawned group of 4."""
    from harness import run_cases

    return run_cases(4, "test_offload_parity:offload_case", _cases())


@pytest.mark.parametrize("name", [c["name"] for c in _cases() if "kind" not in c])
def test_offload_plan_matches_reference(results: dict[str, Any], name: str) -> None:
    """Gradients after the first step, losses and final parameters equal single-process
    training's, and exactly the plan's FSDP-offload layers are offloaded by FSDP2."""
    from uniap.contract import Plan

    res = results[name]
    assert "error" not in res, res.get("error")
    plan = Plan.from_dict(next(c for c in _cases() if c["name"] == name)["plan"])
    assert res["offloaded"] == sorted(ls.fqn for ls in plan.layer_strategies if ls.kind == OFF)
    assert res["grads_close"], res["bad_grads"]
    assert res["losses_close"], f"losses {res['losses']} vs reference {res['ref_losses']}"
    assert res["params_close"], (res["bad_params"], res["extra_params"])


def test_offload_from_the_meta_device_materialises_only_shards(results: dict[str, Any]) -> None:
    """A meta-device toy: initial parameters equal a single-process init with the same seed,
    the losses of two AdamW steps equal the reference's, each rank holds a quarter."""
    res = results["meta_pp1_dp4_offload_fsdp_c2"]
    assert "error" not in res, res.get("error")
    assert res["init_equal"] and not res["on_meta_after"] and res["losses_close"], res
    assert res["local_param_bytes"] == [res["model_param_bytes"] // 4] * 4


@pytest.mark.parametrize("name", [c["name"] for c in _cases() if c.get("kind") == "comm_count"])
def test_offload_collectives_are_what_the_cost_model_charges(
    results: dict[str, Any], name: str
) -> None:
    """Two all-gathers and one reduce-scatter per layer and micro-batch."""
    res = results[name]
    assert "error" not in res, res.get("error")
    case = next(c for c in _cases() if c["name"] == name)
    assert res["counts"] == case["expect"]
