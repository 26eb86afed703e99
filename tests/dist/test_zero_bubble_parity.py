"""Interleaved zero bubble (``ScheduleInterleavedZeroBubble``, v = 2 stages per rank, stage j
on the ranks of stage j % pp, each backward split into input and weight gradients) trains
like one process: world 4, CPU gloo, one spawn for every case.

Each case trains the toy chain for three SGD steps (momentum, ``foreach=True``) under a plan
with pp * 2 stages and compares with single-process training on the same global batches:
the losses of every step, every gradient after the first backward and the final parameters
(``cases.parity_case``).
"""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.dist

D = "DDP"
ZB = "InterleavedZeroBubble"


def _zero_bubble(
    name: str, pp: int, per_stage: list, *, c: int, n_blocks: int = 2, **extra: Any
) -> dict:
    """A parity case: the toy's layers split evenly over ``len(per_stage)`` stages, stage j on
    the 4 // pp ranks of rank group j % pp with strategy ``per_stage[j]`` (dp, tp, kind[,
    recompute]); dp = 1 everywhere (:attr:`uniap.schedules.ScheduleSpec.data_parallel`)."""
    from toy import toy_fqns

    from uniap.contract import LayerStrategy, Plan, Stage, Strategy

    fqns, n = toy_fqns(n_blocks), len(per_stage)
    g = 4 // pp
    per = len(fqns) // n
    stages = []
    for j, strat in enumerate(per_stage):
        names = fqns[j * per : (j + 1) * per]
        layers = tuple(LayerStrategy(f, Strategy(*strat)) for f in names)
        r = j % pp
        stages.append(Stage(tuple(range(r * g, (r + 1) * g)), layers))
    plan = Plan(
        model_name="Toy",
        model_signature="toy",
        num_layers=len(fqns),
        world_size=4,
        global_batch_size=8,
        num_microbatches=c,
        schedule=ZB,
        stages=tuple(stages),
    )
    return {
        "name": name,
        "model": "toy",
        "n_blocks": n_blocks,
        "plan": plan.to_dict(),
        "via": "apply_plan",
        "optimizer": "sgd",
        **extra,
    }


def _cases() -> list[dict]:
    plain = (1, 1, D)
    return [
        # four ranks with two stages each, the last rank's first stage feeding rank 0's second
        _zero_bubble("pp4_v2_c4", 4, [plain] * 8, c=4, n_blocks=6),
        _zero_bubble("pp4_v2_c8", 4, [plain] * 8, c=8, n_blocks=6, forward=True),
    ]


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    from harness import run_cases

    return run_cases(4, "cases:run_case", _cases())


@pytest.mark.parametrize("name", [c["name"] for c in _cases()])
def test_zero_bubble_matches_reference(results: dict[str, Any], name: str) -> None:
    """Losses, gradients after the first backward and final parameters match one process."""
    res = results[name]
    assert "error" not in res, res.get("error")
    assert ZB in res["plan"]
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
