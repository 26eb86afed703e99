"""Per-case functions run on every rank by :mod:`harness` (rank 0's return value is reported).

A parity case trains ``steps`` AdamW steps with a plan and compares, on rank 0, the per-step
losses and the final full parameters with single-process training of the same model (same
seed, same global batches).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from uniap.api import parallelize
from uniap.errors import PlanMismatchError
from uniap.executor import apply_plan, default_device
from uniap.plan import Plan

LR = 1e-3
# Adam divides by sqrt(v) + eps: a gradient entry near zero (|g| ~ 1e-8, e.g. an embedding row
# seen once) whose last bits differ between summation orders (TP all-reduce vs one matmul) would
# move by a sizeable fraction of lr with the default eps=1e-8. With eps=1e-6 such entries move
# by at most lr * |dg| / eps (~1e-6); every other entry is unaffected.
EPS = 1e-6
RTOL, ATOL = 1e-4, 1e-5
_FUNCOLS = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single")
_REFERENCE: dict[tuple, tuple[list[float], dict[str, torch.Tensor]]] = {}


def _toy(case: dict) -> tuple[Any, Any, Any, Any]:
    from toy import build_toy, toy_batch, toy_layers, toy_loss

    n = case.get("n_blocks", 2)
    return (lambda: build_toy(n)), (lambda b, s: toy_batch(b, seed=s)), toy_loss, toy_layers(n)


def _preset(case: dict) -> tuple[Any, Any, Any, Any]:
    from uniap.models import build_model, example_batch, loss_fn_for

    name = case["model"]

    def batch(b: int, s: int) -> Any:
        return example_batch(name, b, seed=1000 + s)

    return (lambda: build_model(name, device="cpu", seed=0)), batch, loss_fn_for(name), None


def _hf(case: dict) -> tuple[Any, Any, Any, Any]:
    from uniap.models import cross_entropy_loss
    from uniap.models.hf import from_hf, hf_example_batch, tiny_hf_model

    family = case["model"].removeprefix("hf-")
    config_model = tiny_hf_model(family, seed=0)

    def batch(b: int, s: int) -> Any:
        return hf_example_batch(config_model, b, seed=1000 + s)

    return (lambda: from_hf(tiny_hf_model(family, seed=0))), batch, cross_entropy_loss, None


def _sequential(case: dict) -> tuple[Any, Any, Any, Any]:
    from toy import build_sequential, sequential_batch

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(out, y)

    return build_sequential, (lambda b, s: sequential_batch(b, seed=s)), loss, None


def _setup(case: dict) -> tuple[Any, Any, Any, Any]:
    if case["model"] == "toy":
        return _toy(case)
    if case["model"] == "sequential":
        return _sequential(case)
    if case["model"].startswith("hf-"):
        return _hf(case)
    return _preset(case)


def _reference(
    case: dict, build: Any, batch: Any, loss_fn: Any, big_b: int, steps: int
) -> tuple[list[float], dict[str, torch.Tensor]]:
    device = default_device()  # the same kind of device as the parallel run
    key = (case["model"], case.get("n_blocks"), big_b, steps, device.type)
    if key not in _REFERENCE:
        model = build().to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
        losses = []
        for step in range(steps):
            x, y = batch(big_b, step)
            opt.zero_grad()
            loss = loss_fn(model(x.to(device)), y.to(device))
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        _REFERENCE[key] = (
            losses,
            {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        )
    return _REFERENCE[key]


def _compare(full: dict[str, torch.Tensor], ref_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    worst, worst_key, bad = 0.0, None, []
    for k, ref in ref_state.items():
        got = full.get(k)
        if got is None or got.shape != ref.shape:
            bad.append(
                f"{k}: {'missing' if got is None else tuple(got.shape)} vs {tuple(ref.shape)}"
            )
            continue
        diff = float((got.float() - ref.float()).abs().max()) if ref.numel() else 0.0
        if diff > worst:
            worst, worst_key = diff, k
        if not torch.allclose(got.float(), ref.float(), rtol=RTOL, atol=ATOL):
            bad.append(f"{k}: max abs diff {diff:.3g}")
    extra = sorted(set(full) - set(ref_state))
    return {
        "params_close": not bad and not extra,
        "bad_params": bad[:5],
        "extra_params": extra[:5],
        "worst_param_diff": worst,
        "worst_param": worst_key,
    }


def parity_case(case: dict) -> dict[str, Any] | None:
    """Train with ``case["plan"]`` (or the planner's plan for ``case["cluster"]``) and compare
    with the single-process reference."""
    build, batch, loss_fn, layers = _setup(case)
    steps = case.get("steps", 3)
    big_b = case["plan"]["global_batch_size"] if case.get("plan") else case["global_batch_size"]
    model = build()
    x0, _ = batch(big_b, 0)
    if case.get("via") == "apply_plan":
        plan = Plan.from_dict(case["plan"])
        pm = apply_plan(model, plan, loss_fn=loss_fn, layers=layers, device=default_device())
    else:
        pm = parallelize(
            model,
            case.get("cluster"),
            plan=Plan.from_dict(case["plan"]) if case.get("plan") else None,
            loss_fn=loss_fn,
            global_batch_size=big_b,
            example_inputs=x0,
            schedule=case.get("schedule"),
        )
    opt = torch.optim.AdamW(pm.parameters(), lr=LR, eps=EPS)
    losses, times = [], []
    for step in range(steps):
        x, y = batch(big_b, step)
        opt.zero_grad()
        losses.append(pm.train_step(x, y))
        times.append(pm.last_step_time_s)
        opt.step()
    out: dict[str, Any] = {}
    if case.get("forward"):
        with torch.no_grad():
            out["forward"] = pm.forward(batch(big_b, steps)[0]).detach().cpu()
        out["forward_full_batch"] = out["forward"].shape[0] == big_b
    full = pm.full_state_dict()
    if dist.get_rank() != 0:
        return None
    ref_losses, ref_state = _reference(case, build, batch, loss_fn, big_b, steps)
    result = {
        "plan": pm.plan.summary(),
        "losses": losses,
        "ref_losses": ref_losses,
        "losses_close": all(abs(a - b) <= ATOL + RTOL * abs(b) for a, b in zip(losses, ref_losses)),
        "step_time_s": times,
        **_compare(full, ref_state),
    }
    if "forward" in out:
        ref_model = build()
        ref_model.load_state_dict(ref_state)
        with torch.no_grad():
            expect = ref_model(batch(big_b, steps)[0])
        result["forward_close"] = out["forward_full_batch"] and bool(
            torch.allclose(out["forward"], expect, rtol=RTOL, atol=ATOL)
        )
    return result


def _gather_errors(fn: Any) -> list[str | None]:
    """Run ``fn`` on every rank; every rank's error message (or None), gathered to all."""
    try:
        fn()
        mine = None
    except PlanMismatchError as e:
        mine = str(e)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def plan_consistency_case(case: dict) -> dict[str, Any] | None:
    """Rank ``case["odd_rank"]`` passes a plan with another micro-batch count: every rank must
    refuse it, naming that rank."""
    build, batch, loss_fn, _ = _setup(case)
    plan = Plan.from_dict(case["plan"])
    if dist.get_rank() == case["odd_rank"]:
        plan = dataclasses.replace(plan, num_microbatches=plan.num_microbatches * 2)
    x0, _ = batch(plan.global_batch_size, 0)
    errors = _gather_errors(
        lambda: parallelize(
            build(),
            plan=plan,
            loss_fn=loss_fn,
            global_batch_size=plan.global_batch_size,
            example_inputs=x0,
        )
    )
    return {"errors": errors} if dist.get_rank() == 0 else None


def checkpoint_case(case: dict) -> dict[str, Any] | None:
    """DCP round trip: save ``state_dict()``, train a step, load it back: the full state dict
    equals the saved one."""
    import torch.distributed.checkpoint as dcp

    build, batch, loss_fn, _ = _setup(case)
    plan = Plan.from_dict(case["plan"])
    x, y = batch(plan.global_batch_size, 0)
    pm = parallelize(
        build(),
        plan=plan,
        loss_fn=loss_fn,
        global_batch_size=plan.global_batch_size,
        example_inputs=x,
    )
    opt = torch.optim.AdamW(pm.parameters(), lr=LR, eps=EPS)
    opt.zero_grad()
    pm.train_step(x, y)
    opt.step()
    saved = pm.full_state_dict()
    dcp.save(pm.state_dict(), checkpoint_id=case["dir"])
    opt.zero_grad()
    pm.train_step(x, y)
    opt.step()
    moved = pm.full_state_dict()
    sd = pm.state_dict()
    dcp.load(sd, checkpoint_id=case["dir"])
    pm.load_state_dict(sd)
    restored = pm.full_state_dict()
    if dist.get_rank() != 0:
        return None
    changed = any(not torch.equal(moved[k], saved[k]) for k in saved)
    same = set(restored) == set(saved) and all(torch.equal(restored[k], saved[k]) for k in saved)
    return {"changed_by_training": changed, "restored_equal": same, "num_keys": len(saved)}


_KINDS = {
    "parity": parity_case,
    "hf_parity": parity_case,
    "plan_consistency": plan_consistency_case,
    "checkpoint": checkpoint_case,
}


def run_case(case: dict) -> dict[str, Any] | None:
    """Dispatch on ``case["kind"]`` (default ``parity``)."""
    return _KINDS[case.get("kind", "parity")](case)


def comm_count_case(case: dict) -> dict[str, Any] | None:
    """Count the collectives of one (second) ``train_step``, by kind and group size, on rank 0:
    what the cost model charges per iteration. c10d calls (FSDP2, replicate, reshards) are
    counted at ``torch.distributed``; DTensor's functional collectives (TP) by a dispatch mode."""
    from collections import Counter

    from torch.distributed.distributed_c10d import _resolve_process_group
    from torch.utils._python_dispatch import TorchDispatchMode

    build, batch, loss_fn, _ = _setup(case)
    plan = Plan.from_dict(case["plan"])
    x, y = batch(plan.global_batch_size, 0)
    pm = parallelize(
        build(),
        plan=plan,
        loss_fn=loss_fn,
        global_batch_size=plan.global_batch_size,
        example_inputs=x,
    )
    pm.train_step(x, y)  # lazy initialisation out of the way
    counts: Counter[str] = Counter()
    names = ("all_gather_single", "reduce_scatter_single", "all_reduce")
    originals = {n: getattr(dist, n) for n in names}

    def counting(name: str) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            group = kwargs.get("group")
            size = dist.get_world_size(group) if group is not None else dist.get_world_size()
            counts[f"{name}@{size}"] += 1
            return originals[name](*args, **kwargs)

        return wrapper

    class FuncolCounter(TorchDispatchMode):
        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            if func.namespace == "_c10d_functional" and func.__name__.split(".")[0] in _FUNCOLS:
                group = (kwargs or {}).get("group_name", args[-1])
                size = (_resolve_process_group(group) if isinstance(group, str) else group).size()
                counts[f"tp_{func.__name__.split('.')[0]}@{size}"] += 1
            return func(*args, **(kwargs or {}))

    for n in names:
        setattr(dist, n, counting(n))
    try:
        with FuncolCounter():
            pm.train_step(x, y)
    finally:
        for n, f in originals.items():
            setattr(dist, n, f)
    # the loss all-reduce over the world (one float per iteration) is not a model collective
    counts[f"all_reduce@{dist.get_world_size()}"] -= 1
    return (
        {"counts": {k: v for k, v in sorted(counts.items()) if v}} if dist.get_rank() == 0 else None
    )


_KINDS["comm_count"] = comm_count_case


def memory_case(case: dict) -> dict[str, Any] | None:
    """Train ``case["plan"]`` and the same plan with ``recompute`` on every block, two AdamW
    steps each; report rank 0's measured memory breakdown of the second step of each."""
    build, batch, loss_fn, _ = _setup(case)
    base = Plan.from_dict(case["plan"])
    out: dict[str, Any] = {}
    for label, recompute in (("plain", False), ("recompute", True)):
        stages = tuple(
            dataclasses.replace(
                st,
                layers=tuple(
                    dataclasses.replace(ls, recompute=recompute and ls.fqn.startswith("blocks"))
                    for ls in st.layers
                ),
            )
            for st in base.stages
        )
        plan = dataclasses.replace(base, stages=stages)
        x, y = batch(plan.global_batch_size, 0)
        model = build()
        pm = parallelize(
            model,
            plan=plan,
            loss_fn=loss_fn,
            global_batch_size=plan.global_batch_size,
            example_inputs=x,
        )
        pm.measure_memory = True
        opt = torch.optim.AdamW(pm.parameters(), lr=LR, eps=EPS)
        for _ in range(2):
            opt.zero_grad()
            pm.train_step(x, y)
            opt.step()
        out[label] = {"peak": pm.peak_memory_bytes, **pm.memory_breakdown}
        out["model_param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    return out if dist.get_rank() == 0 else None


_KINDS["memory"] = memory_case
