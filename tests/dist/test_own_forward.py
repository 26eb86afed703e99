"""The model's own forward at pp = 1 (world size 4, one spawn): models that are not chains
train exactly as on one process, per-step losses and gradients (SGD, rtol 1e-4); gradient
accumulation over two ``train_step`` calls equals ``g1 + g2`` for DDP, FSDP and TP layers."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.dist

D, F = "DDP", "FSDP"


def _case(name: str, model: str, tp_layers: tuple, others: tuple, **extra: Any) -> dict:
    return {"name": name, "model": model, "tp_layers": tp_layers, "others": others, **extra}


CASES = [
    # the skip connection crosses a layout change (dp 4 -> dp 2 x tp 2 -> dp 4)
    _case("skip_tp2_blocks_fsdp_c2", "skip", (2, 2, F), (4, 1, D), c=2),
    _case("scaled_embedding_fsdp_recompute_c2", "scaled", (4, 1, F, True), (4, 1, F), c=2),
    _case("model_parameter_ddp", "model_param", (4, 1, D), (4, 1, D)),
    _case("model_parameter_fsdp_tp2_c2", "model_param", (2, 2, D), (4, 1, F), c=2),
    _case("keyword_inputs_own_loss_tp2_c2", "kwargs", (2, 2, F), (4, 1, F), c=2),
    _case("tied_embedding_fsdp_tp2", "tied", (2, 2, D), (4, 1, F)),
    _case("tied_embedding_ddp_c2", "tied", (4, 1, D), (4, 1, D), c=2),
    _case("accumulate_ddp_c2", "scaled", (4, 1, D), (4, 1, D), c=2, accumulate=True),
    # gradients zeroed in place between steps: classic DDP reduces them without a copy
    _case("zero_in_place_ddp_fsdp", "scaled", (4, 1, D), (4, 1, F), zero_in_place=True),
    _case("accumulate_fsdp", "model_param", (4, 1, F), (4, 1, F), accumulate=True),
    _case("accumulate_tp2_ddp_fsdp", "tied", (2, 2, D), (4, 1, F), accumulate=True),
    # the vocabulary-parallel head (dp 2 x tp 2) returns its sharded logits to the first
    # layer's layout (tp 4) by a batch gather over ranks holding the same vocabulary shard
    _case(
        "head_logits_gathered_to_tp4_base",
        "scaled",
        (2, 2, D),
        (4, 1, D),
        overrides={"tok": (1, 4, D)},
    ),
    # compile=...: every layer torch.compile'd (aot_eager on CPU), TP and FSDP layers included
    _case("compiled_tp2_fsdp_c2", "skip", (2, 2, F), (4, 1, D), c=2, compile="aot_eager"),
]


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    from harness import run_cases

    return run_cases(4, "own_forward:own_forward_case", CASES)


@pytest.mark.parametrize("name", [c["name"] for c in CASES])
def test_world4_own_forward_matches_one_process(results: dict[str, Any], name: str) -> None:
    """Losses and gradients under the plan equal the unmodified model's on one process."""
    res = results[name]
    assert "error" not in res, res.get("error")
    assert res["num_grads"] > 0
    assert res["losses_close"], f"losses {res['losses']} vs reference {res['ref_losses']}"
    assert not res["bad_grads"], res["bad_grads"]
