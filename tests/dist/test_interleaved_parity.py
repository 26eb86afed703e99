"""Interleaved 1F1B (``ScheduleInterleaved1F1B``) and interleaved zero bubble
(``ScheduleInterleavedZeroBubble``, each backward split into input and weight gradients; dp = 1,
plain DDP replicas summed after the step, or FSDP reduce-scattered by torch's schedule after the
last weight gradient, :attr:`uniap.schedules.ScheduleSpec.after_step_kinds`),
v = 2 stages per rank (and v = 3, 4), stage j
on the ranks of stage j % pp, train like one process: world 4, CPU gloo, one spawn for every
case.

Each case trains the toy chain for three SGD steps (momentum, ``foreach=True``) under a plan
with pp * v stages and compares with single-process training on the same global batches:
the losses of every step, every gradient after the first backward (DTensor gradients made
full) and the final parameters (``cases.parity_case``).
"""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.dist

D, F, OFF = "DDP", "FSDP", "FSDP-offload"
ZB = "InterleavedZeroBubble"


def _interleaved(
    name: str,
    pp: int,
    per_stage: list,
    *,
    c: int,
    n_blocks: int = 2,
    schedule: str = "Interleaved1F1B",
    **extra: Any,
) -> dict:
    """A parity case: the toy's layers split evenly over ``len(per_stage)`` stages, stage j on
    the 4 // pp ranks of rank group j % pp, stage j's layers with ``per_stage[j]`` (one
    ``(dp, tp, kind)`` for all, or one per layer)."""
    from toy import toy_fqns

    from uniap.contract import LayerStrategy, Plan, Stage, Strategy

    fqns, n = toy_fqns(n_blocks), len(per_stage)
    g = 4 // pp
    per = len(fqns) // n
    stages = []
    for j, strat in enumerate(per_stage):
        names = fqns[j * per : (j + 1) * per]
        strats = strat if isinstance(strat, list) else [strat] * len(names)
        layers = tuple(LayerStrategy(f, Strategy(*s)) for f, s in zip(names, strats))
        r = j % pp
        stages.append(Stage(tuple(range(r * g, (r + 1) * g)), layers))
    plan = Plan(
        model_name="Toy",
        model_signature="toy",
        num_layers=len(fqns),
        world_size=4,
        global_batch_size=8,
        num_microbatches=c,
        schedule=schedule,
        stages=tuple(stages),
    )
    assert plan.virtual_stages == n // pp and plan.pp_degree == pp
    return {
        "name": name,
        "model": "toy",
        "n_blocks": n_blocks,
        "plan": plan.to_dict(),
        "via": "apply_plan",
        "optimizer": "sgd",
        "v": n // pp,
        **extra,
    }


def _cases() -> list[dict]:
    return [
        _interleaved("pp2_v2_dp2_ddp_c2", 2, [(2, 1, D)] * 4, c=2),
        _interleaved("pp2_v2_dp2_fsdp_c4", 2, [(2, 1, F)] * 4, c=4, forward=True),
        # TP on the blocks, FSDP around them, a reshard into and out of each block's stage
        _interleaved("pp2_v2_fsdp_tp2_c2", 2, [(2, 1, F), (1, 2, D), (1, 2, F), (2, 1, D)], c=2),
        # four ranks with two stages each, the last rank's first stage feeding rank 0's second
        _interleaved("pp4_v2_c4", 4, [(1, 1, D)] * 8, c=4, n_blocks=6),
        # zero bubble: four ranks with two stages each, dp = 1
        _interleaved("zb_pp4_v2_c4", 4, [(1, 1, D)] * 8, c=4, n_blocks=6, schedule=ZB),
        # zero bubble with data parallelism: plain replicas, gradients summed after the step
        _interleaved("zb_pp2_v2_dp2_ddp_c2", 2, [(2, 1, D)] * 4, c=2, schedule=ZB),
        _interleaved(
            "zb_pp4_v2_c8", 4, [(1, 1, D)] * 8, c=8, n_blocks=6, schedule=ZB, forward=True
        ),
        # zero bubble with FSDP: torch's schedule reduce-scatters after the last weight gradient
        _interleaved("zb_pp2_v2_dp2_fsdp_c4", 2, [(2, 1, F)] * 4, c=4, schedule=ZB, forward=True),
        _interleaved(
            "zb_pp2_v2_dp2_fsdp_bf16_c4",
            2,
            [(2, 1, F)] * 4,
            c=4,
            schedule=ZB,
            precision="bf16-mixed",
        ),
        # FSDP, plain replicas and TP at dp = 1 in one zero-bubble plan
        _interleaved(
            "zb_pp2_v2_mixed_c2", 2, [(2, 1, F), (2, 1, D), (1, 2, D), (2, 1, F)], c=2, schedule=ZB
        ),
        # FSDP-offload on stages of one device (dp = 1), each of a rank's stages its own root
        _interleaved(
            "pp4_v2_dp1_offload_c4",
            4,
            [
                (1, 1, OFF),
                (1, 1, D),
                (1, 1, OFF),
                (1, 1, D),
                (1, 1, OFF),
                (1, 1, OFF),
                (1, 1, D),
                (1, 1, OFF),
            ],
            c=4,
            n_blocks=6,
        ),
        # more stages per rank: v = 4 (eight stages over two rank groups), zero bubble at v = 3
        _interleaved("pp2_v4_dp2_fsdp_c4", 2, [(2, 1, F)] * 8, c=4, n_blocks=6),
        _interleaved(
            "zb_pp2_v3_mixed_c2",
            2,
            [(2, 1, F), (2, 1, D), (1, 2, D), (2, 1, F), (2, 1, D), (2, 1, F)],
            c=2,
            n_blocks=4,
            schedule=ZB,
        ),
    ]


def _comm_cases() -> list[dict]:
    """Collectives of rank 0 (stages 0 and 2: one FSDP layer each) in one zero-bubble
    iteration: each layer's parameters gathered once (kept from the first forward) and its
    gradient reduce-scattered once, after the stage's last weight gradient (what the cost
    model charges: ``G = ag + rs``)."""
    from toy import toy_signature

    case = _interleaved(
        "zb_comm_pp2_v2_dp2_fsdp_c4",
        2,
        [(2, 1, F)] * 4,
        c=4,
        schedule=ZB,
        kind="comm_count",
        expect={"all_gather_single@2": 2, "reduce_scatter_single@2": 2},
    )
    case["plan"]["model"]["signature"] = toy_signature()  # parallelize checks it
    return [case]


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    from harness import run_cases

    return run_cases(4, "cases:run_case", _cases() + _comm_cases())


def test_zero_bubble_fsdp_collectives_per_iteration(results: dict[str, Any]) -> None:
    """Rank 0 issues exactly the collectives the cost model charges under zero bubble."""
    for case in _comm_cases():
        res = results[case["name"]]
        assert "error" not in res, res.get("error")
        assert res["counts"] == case["expect"]


@pytest.mark.parametrize("name", [c["name"] for c in _cases()])
def test_interleaved_matches_reference(results: dict[str, Any], name: str) -> None:
    """Losses, gradients after the first backward and final parameters match one process."""
    res = results[name]
    assert "error" not in res, res.get("error")
    schedule = ZB if name.startswith("zb_") else "Interleaved1F1B"
    v = next(c["v"] for c in _cases() if c["name"] == name)
    assert schedule in res["plan"] and f" v={v} " in res["plan"]
    assert res["losses_close"], f"losses {res['losses']} vs reference {res['ref_losses']}"
    assert res["grads_close"], (
        f"gradients after the first backward differ: {res['bad_grads']} "
        f"(worst {res['worst_grad']}: {res['worst_grad_error']:.3g})"
    )
    assert res["params_close"], (
        f"parameters differ: {res['bad_params']} (worst {res['worst_param']}: "
        f"{res['worst_param_diff']:.3g})"
    )
    if "forward_close" in res:
        assert res["forward_close"], "forward() output differs from the reference model's"
    if name == "pp4_v2_dp1_offload_c4":  # every FSDP-offload layer, and only those
        assert res["offloaded"] == ["blocks.1", "blocks.3", "blocks.4", "embed", "head"], res
