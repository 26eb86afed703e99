"""FSDP-offload layers (FSDP2 ``fully_shard(offload_policy=CPUOffloadPolicy())``: sharded
parameters, gradients and optimizer state in host memory, gathered and reduced in every
micro-batch) train like one process: world 4, CPU gloo, one spawn for every case.

FSDP2's CPU offload runs on CPU devices with gloo (the host-device copies are no-ops there),
so the executor's path is the one a GPU run takes. A parity case runs three SGD steps
(momentum, ``foreach=True``) of the 4-layer toy chain under a plan mixing FSDP-offload with
DDP / FSDP (pp = 1 and pp = 2) and compares on rank 0 with single-process training on the same
global batches: the gradients after the first ``train_step`` (DTensor gradients through
``full_tensor()``), the losses of every step and the final parameters; it also reads which
layers FSDP2 really offloads. A comm-count case counts one iteration's collectives: what the
cost model charges (two all-gathers and one reduce-scatter per layer and micro-batch).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

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


def _offloaded(pm: Any) -> list[str]:
    """The layers whose FSDP2 parameters this rank keeps in host memory (CPUOffloadPolicy)."""
    from torch.distributed.fsdp import FSDPModule

    out = []
    for name, m in pm.module.named_modules():
        if name and isinstance(m, FSDPModule):
            group = m._get_fsdp_state()._fsdp_param_group
            if group is not None and all(p.offload_to_cpu for p in group.fsdp_params):
                out.append(name)
    return out


def _parity(case: dict) -> dict[str, Any] | None:
    from cases import ATOL, RTOL, _compare, _reference, _setup, make_optimizer
    from test_zero2_parity import _full_grads

    from uniap.api import parallelize
    from uniap.contract import Plan

    build, batch, loss_fn, _ = _setup(case)
    plan = Plan.from_dict(case["plan"])
    big_b, steps = plan.global_batch_size, 3
    pm = parallelize(
        build(),
        plan=plan,
        loss_fn=loss_fn,
        global_batch_size=big_b,
        example_inputs=batch(big_b, 0)[0],
    )
    opt = make_optimizer(pm, "sgd")
    losses, grads = [], {}
    for step in range(steps):
        x, y = batch(big_b, step)
        opt.zero_grad()
        losses.append(pm.train_step(x, y))
        if step == 0:
            grads = _full_grads(pm)
        opt.step()
    offloaded: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(offloaded, _offloaded(pm))
    full = pm.full_state_dict()
    if dist.get_rank() != 0:
        return None
    ref = build()
    x, y = batch(big_b, 0)
    loss_fn(ref(x), y).backward()
    bad_grads = [
        n
        for n, p in ref.named_parameters()
        if grads.get(n) is None or not torch.allclose(grads[n], p.grad, rtol=RTOL, atol=ATOL)
    ]
    ref_losses, ref_state, _, _ = _reference(case, build, batch, loss_fn, big_b, steps)
    return {
        "plan": plan.summary(),
        "offloaded": sorted({f for per_rank in offloaded for f in per_rank}),
        "losses": losses,
        "ref_losses": ref_losses,
        "losses_close": all(
            abs(a - b) <= RTOL * abs(b) + ATOL for a, b in zip(losses, ref_losses, strict=True)
        ),
        "bad_grads": bad_grads,
        "num_grads": len(grads),
        "num_ref_grads": len(list(ref.parameters())),
        **_compare(full, ref_state),
    }


def offload_case(case: dict) -> dict[str, Any] | None:
    """Run on every rank by the harness: parity, meta start or comm-count."""
    from cases import comm_count_case, meta_case

    kind = case.get("kind")
    if kind == "meta":
        return meta_case(case)
    return comm_count_case(case) if kind == "comm_count" else _parity(case)


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
    assert res["num_grads"] == res["num_ref_grads"] and res["bad_grads"] == [], res["bad_grads"]
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
