"""Meta-device start (world size 4, CPU gloo): a toy built under ``torch.device("meta")`` is
split and sharded on meta, then every rank materialises and initialises only its own shards,
one full layer at a time (``uniap.executor.materialize``)."""

from __future__ import annotations

from typing import Any

import pytest
from grid import w4_cases

pytestmark = pytest.mark.dist

_NAMES = [c["name"] for c in w4_cases() if c.get("kind") == "meta"]


@pytest.mark.parametrize("name", _NAMES)
def test_world4_meta_start_equals_single_process_init_and_trains(
    results_w4: dict[str, Any], name: str
) -> None:
    """The full parameters after materialisation equal a single-process init with the same
    seed (init_model), exactly; two AdamW steps give the reference's losses; no rank ever
    holds the whole model: its shards plus the largest layer (the one full layer it holds
    while initialising) stay below the model's parameter bytes."""
    res = results_w4[name]
    assert "error" not in res, res.get("error")
    assert res["init_equal"]
    assert not res["on_meta_after"]
    assert res["losses_close"], (res["losses"], res["ref_losses"])
    for local in res["local_param_bytes"]:
        assert local + res["largest_layer_bytes"] < res["model_param_bytes"], res


def test_world4_meta_fsdp_dp4_holds_a_quarter(results_w4: dict[str, Any]) -> None:
    """Under FSDP over 4 ranks each rank's parameters are a quarter of the model's."""
    res = results_w4["meta_pp1_dp4_fsdp_c2"]
    assert "error" not in res, res.get("error")
    assert res["local_param_bytes"] == [res["model_param_bytes"] // 4] * 4
