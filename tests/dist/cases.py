"""Per-case functions run on every rank by :mod:`harness` (rank 0's return value is reported).

A parity case trains ``steps`` AdamW steps with a plan and compares, on rank 0, the per-step
losses and the final full parameters with single-process training of the same model (same
seed, same global batches), and, on every rank, the gradients of the parameters it holds
after the first backward with the reference's first gradients (AdamW divides the gradient's
scale out of its update, so a gradient summed instead of averaged over ranks or micro-batches
would pass the loss and parameter checks; the gradient check sees it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from uniap.api import parallelize
from uniap.contract import Plan
from uniap.errors import PlanMismatchError
from uniap.executor import apply_plan, default_device
from uniap.executor.data_parallel import fsdp_roots

LR = 1e-3
# Adam divides by sqrt(v) + eps: a gradient entry near zero (|g| ~ 1e-8, e.g. an embedding row
# seen once) whose last bits differ between summation orders (TP all-reduce vs one matmul) would
# move by a sizeable fraction of lr with the default eps=1e-8. With eps=1e-6 such entries move
# by at most lr * |dg| / eps (~1e-6); every other entry is unaffected.
EPS = 1e-6
RTOL, ATOL = 1e-4, 1e-5
# Gradients (fp32): elementwise rtol GRAD_RTOL, plus an absolute floor of GRAD_ATOL_REL times
# the largest reference gradient entry of the whole model. The parallel run sums the same
# terms in another order (micro-batches, DP all-reduce / reduce-scatter, TP partial sums), so
# an entry's error is a few fp32 ulps (1.2e-7) of the magnitudes summed, not of the result: an
# entry that cancels to near zero has a large relative error but an absolute one of order
# 1e-7 x the model's gradient scale. Measured over the CPU grid (2026-12-06): worst
# |g - g_ref| / max|g_ref| 6.8e-7 (fp32). A gradient off by a factor 2 or 1/c misses the
# bound on every entry above 1e-5 x the scale, by orders of magnitude.
GRAD_RTOL, GRAD_ATOL_REL = 1e-4, 1e-5
# bf16-mixed parity (see test_precision_parity.py for the justification of these bounds)
LOSS_RTOL_BF16 = 2e-3
UPDATE_RTOL_BF16 = 5e-2
SGD_OPTIONS = {"lr": 0.5, "momentum": 0.5, "foreach": True}
_FUNCOLS = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single")
_REFERENCE: dict[
    tuple, tuple[list[float], dict[str, torch.Tensor], list[float], dict[str, torch.Tensor | None]]
] = {}


def make_optimizer(pm: Any, kernel: str = "foreach") -> torch.optim.Optimizer:
    """AdamW with CUDA's multi-tensor kernel (``foreach``) or the ``fused`` one, on
    ``pm.param_groups()``: what a training loop on GPUs runs; ``sgd``: SGD with momentum
    (``foreach``), whose updates are linear in the gradients (the bf16 parity cases)."""
    if kernel == "sgd":
        return torch.optim.SGD(pm.param_groups(), **SGD_OPTIONS)
    return torch.optim.AdamW(pm.param_groups(), lr=LR, eps=EPS, **{kernel: True})


def _tensor_kinds(pm: Any) -> list[str]:
    """Kinds of this rank's parameters: ``plain`` and/or ``dtensor``."""
    from torch.distributed.tensor import DTensor

    return sorted({"dtensor" if isinstance(p, DTensor) else "plain" for p in pm.parameters()})


def _autocast(precision: str | None, device: torch.device) -> Any:
    """The single-process reference of a mixed-precision plan: ``torch.autocast``."""
    import contextlib

    from uniap.precision import resolve_precision

    if precision is None:
        return contextlib.nullcontext()
    return resolve_precision(precision).autocast(device.type)


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
) -> tuple[list[float], dict[str, torch.Tensor], list[float], dict[str, torch.Tensor | None]]:
    """Single-process training: losses, final state, (with ``case["clip"]``) the gradient
    norms ``torch.nn.utils.clip_grad_norm_`` returned, and the first backward's gradients by
    parameter name (None for a parameter the loss does not reach)."""
    device = default_device()  # the same kind of device as the parallel run
    clip = case.get("clip")
    precision = case.get("precision")
    key = (
        case["model"],
        case.get("n_blocks"),
        big_b,
        steps,
        device.type,
        clip,
        precision,
        case.get("optimizer"),
    )
    if key not in _REFERENCE:
        model = build().to(device)
        if case.get("optimizer") == "sgd":
            opt = torch.optim.SGD(model.parameters(), **SGD_OPTIONS)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, foreach=True)
        losses, norms = [], []
        first_grads: dict[str, torch.Tensor | None] = {}
        for step in range(steps):
            x, y = batch(big_b, step)
            opt.zero_grad()
            with _autocast(precision, device):  # fp32 master weights, bf16 compute
                loss = loss_fn(model(x.to(device)), y.to(device))
            loss.backward()
            if step == 0:
                first_grads = {
                    k: None if p.grad is None else p.grad.detach().cpu().clone()
                    for k, p in model.named_parameters()
                }
            if clip is not None:
                norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
            opt.step()
            losses.append(float(loss.detach()))
        _REFERENCE[key] = (
            losses,
            {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            norms,
            first_grads,
        )
    return _REFERENCE[key]


def _compare(
    full: dict[str, torch.Tensor],
    ref_state: dict[str, torch.Tensor],
    *,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> dict[str, Any]:
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
        if not torch.allclose(got.float(), ref.float(), rtol=rtol, atol=atol):
            bad.append(f"{k}: max abs diff {diff:.3g}")
    extra = sorted(set(full) - set(ref_state))
    return {
        "params_close": not bad and not extra,
        "bad_params": bad[:5],
        "extra_params": extra[:5],
        "worst_param_diff": worst,
        "worst_param": worst_key,
    }


def _compare_updates(
    full: dict[str, torch.Tensor], ref_state: dict[str, torch.Tensor], init: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Mixed-precision parity: each tensor's total update ``final - init`` against the
    reference's, relative error ``|d - d_ref| / max(|d_ref|, floor)`` (2-norms) at most
    UPDATE_RTOL_BF16. ``floor`` is 1% of the largest tensor update: a tensor whose true
    gradient is zero (the bias of attention keys: softmax ignores it) moves by rounding
    noise only, which is judged against the model's scale, not its own."""
    worst, worst_key, bad = 0.0, None, []
    updates = [
        float((ref.float() - init[k].float()).norm())
        for k, ref in ref_state.items()
        if ref.is_floating_point()
    ]
    floor = 1e-2 * max(updates, default=0.0)
    for k, ref in ref_state.items():
        got = full.get(k)
        if got is None or got.shape != ref.shape:
            bad.append(f"{k}: missing or misshapen")
            continue
        d_ref = (ref.float() - init[k].float()).norm()
        if not ref.is_floating_point() or d_ref == 0:
            continue
        err = float((got.float() - ref.float()).norm() / max(float(d_ref), floor))
        if err > worst:
            worst, worst_key = err, k
        if err > UPDATE_RTOL_BF16:
            bad.append(f"{k}: relative update error {err:.3g}")
    extra = sorted(set(full) - set(ref_state))
    return {
        "params_close": not bad and not extra,
        "bad_params": bad[:5],
        "extra_params": extra[:5],
        "worst_param_diff": worst,
        "worst_param": worst_key,
    }


def _held_grads(pm: Any) -> dict[str, torch.Tensor | None]:
    """This rank's gradients, full (``full_tensor()`` of a DTensor gradient: a collective over
    its mesh, called in the same parameter order on every rank of the stage), on CPU, by the
    model's parameter FQN; None where ``.grad`` is None."""
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor | None] = {}
    for name, p in pm.named_parameters():
        g = p.grad
        if isinstance(g, DTensor):
            g = g.full_tensor()
        out[name] = None if g is None else g.detach().float().cpu().clone()
    return out


def _compare_grads(
    held: dict[str, torch.Tensor | None],
    ref: dict[str, torch.Tensor | None],
    *,
    mixed_precision: bool,
) -> dict[str, Any]:
    """This rank's gradients against the reference's. fp32: elementwise within GRAD_RTOL
    relative plus GRAD_ATOL_REL x the model's largest reference entry; the reported
    ``worst`` is the largest ``|g - g_ref| / max|g_ref|``. bf16-mixed: each tensor's relative
    2-norm error, against a floor of 1% of the largest tensor norm (as
    :func:`_compare_updates`), at most UPDATE_RTOL_BF16."""
    scale = max(
        (float(r.abs().max()) for r in ref.values() if r is not None and r.numel()), default=0.0
    )
    floor = 1e-2 * max((float(r.norm()) for r in ref.values() if r is not None), default=0.0)
    worst, worst_key, bad = 0.0, None, []
    for name, got in sorted(held.items()):
        if name not in ref:
            bad.append(f"{name}: not a parameter of the reference model")
            continue
        want = ref[name]
        if got is None or want is None:
            if got is not want:
                bad.append(
                    f"{name}: grad {'None' if got is None else 'set'} vs reference "
                    f"{'None' if want is None else 'set'}"
                )
            continue
        if got.shape != want.shape:
            bad.append(f"{name}: grad shape {tuple(got.shape)} vs {tuple(want.shape)}")
            continue
        if not want.numel():
            continue
        if mixed_precision:
            err = float((got - want).norm()) / max(float(want.norm()), floor)
            ok = err <= UPDATE_RTOL_BF16
        else:
            diff = (got - want).abs()
            err = float(diff.max()) / scale if scale else float(diff.max())
            ok = bool((diff <= GRAD_RTOL * want.abs() + GRAD_ATOL_REL * scale).all())
        if err > worst:
            worst, worst_key = err, name
        if not ok:
            ratio = float(got.norm()) / max(float(want.norm()), 1e-30)
            bad.append(f"{name}: error {err:.3g}, |g| / |g_ref| = {ratio:.4g}")
    return {"names": sorted(held), "bad": bad, "worst": worst, "worst_param": worst_key}


def _grad_parity(
    held: dict[str, torch.Tensor | None], ref: dict[str, torch.Tensor | None] | None, case: dict
) -> dict[str, Any] | None:
    """Every rank compares the gradients it holds with the reference's (computed on rank 0,
    broadcast); rank 0 gets the verdict over all ranks, including that every parameter of
    the model was compared on some rank."""
    payload = [ref]
    dist.broadcast_object_list(payload, src=0)
    ref = payload[0]
    assert ref is not None
    mine = _compare_grads(held, ref, mixed_precision=bool(case.get("precision")))
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() != 0:
        return None
    covered = set().union(*(set(s["names"]) for s in everyone))
    missing = sorted(set(ref) - covered)
    bad = [f"rank {r}: {b}" for r, s in enumerate(everyone) for b in s["bad"]]
    bad += [f"{name}: held by no rank" for name in missing]
    worst_rank = max(range(len(everyone)), key=lambda r: everyone[r]["worst"])
    return {
        "grads_close": not bad,
        "bad_grads": bad[:6],
        "worst_grad_error": everyone[worst_rank]["worst"],
        "worst_grad": f"rank {worst_rank}: {everyone[worst_rank]['worst_param']}",
        "num_grads_compared": sum(len(s["names"]) for s in everyone),
    }


def _offloaded(pm: Any) -> list[str]:
    """Every rank's layers whose FSDP2 parameters live in host memory (``CPUOffloadPolicy``),
    sorted (collective)."""
    mine = []
    for name, m in pm.module.named_modules():
        if name and isinstance(m, FSDPModule):
            group = m._get_fsdp_state()._fsdp_param_group
            if group is not None and all(p.offload_to_cpu for p in group.fsdp_params):
                mine.append(name)
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return sorted({f for per_rank in every for f in per_rank})


def _full_state_without_gather_object(pm: Any) -> dict[str, torch.Tensor]:
    """``pm.full_state_dict()``, failing if it uses ``gather_object`` (it must stream tensor
    by tensor: gather_object puts every rank's payload on rank 0's device at once)."""
    saved = dist.gather_object

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("full_state_dict used gather_object")

    dist.gather_object = refuse
    try:
        return pm.full_state_dict()
    finally:
        dist.gather_object = saved


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
            precision=case.get("precision"),
        )
    opt = make_optimizer(pm, case.get("optimizer", "foreach"))
    linear_out_dtypes: set[str] = set()  # what the Linears compute in, during training
    for m in pm.module.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda _m, _i, o: linear_out_dtypes.add(str(o.dtype)))
    losses, times, norms, post_norms = [], [], [], []
    held_grads: dict[str, torch.Tensor | None] = {}
    for step in range(steps):
        x, y = batch(big_b, step)
        opt.zero_grad()
        losses.append(pm.train_step(x, y))
        times.append(pm.last_step_time_s)
        if case.get("scale_grads") is not None:  # the negative control: a mis-scaled reduction
            for p in pm.parameters():
                if p.grad is not None:
                    p.grad.mul_(case["scale_grads"])
        if step == 0:  # before clipping and stepping, as the reference's
            held_grads = _held_grads(pm)
        if case.get("clip") is not None:
            norms.append(float(pm.clip_grad_norm_(case["clip"])))
            # re-measured after clipping (an infinite max_norm clips nothing): every plain
            # tensor and every shard must have been scaled
            post_norms.append(float(pm.clip_grad_norm_(float("inf"))))
        opt.step()
    out: dict[str, Any] = {}
    if case.get("forward"):
        with torch.no_grad():
            out["forward"] = pm.forward(batch(big_b, steps)[0]).detach().cpu()
        out["forward_dtype"] = str(out["forward"].dtype)
        out["forward"] = out["forward"].float()
        out["forward_full_batch"] = out["forward"].shape[0] == big_b
    master_dtypes = sorted({str(p.dtype) for p in pm.parameters()})
    state_dtypes = sorted(
        {
            str(v.dtype)
            for st in opt.state.values()
            for k, v in st.items()
            if k != "step" and torch.is_tensor(v)
        }
    )
    # over every rank: with one layer per stage some ranks hold no Linear, or no parameter
    master_dtypes, state_dtypes, linear_dtypes = (
        _union_over_ranks(v) for v in (master_dtypes, state_dtypes, linear_out_dtypes)
    )
    roots = fsdp_roots(pm.module)
    layers_fsdp2 = sum(isinstance(m, FSDPModule) for m in pm.layer_modules)
    offloaded = _offloaded(pm)
    full = _full_state_without_gather_object(pm)
    reference = None
    if dist.get_rank() == 0:
        reference = _reference(case, build, batch, loss_fn, big_b, steps)
    grad_checks = _grad_parity(held_grads, reference[3] if reference else None, case)
    if reference is None or grad_checks is None:
        return None
    ref_losses, ref_state, ref_norms, _ = reference
    precision_checks: dict[str, Any] = {}
    if case.get("precision"):
        fp32_losses, fp32_state, _, _ = _reference(
            {**case, "precision": None, "clip": None}, build, batch, loss_fn, big_b, steps
        )
        fp32_gap = _compare_updates(fp32_state, ref_state, build().state_dict())
        precision_checks = {
            "master_dtypes": master_dtypes,
            "optimizer_state_dtypes": state_dtypes,
            "forward_dtype": out.get("forward_dtype"),
            "linear_output_dtypes": linear_dtypes,
            "fp32_ref_losses": fp32_losses,
            "loss_gap_to_ref": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "loss_gap_to_fp32_ref": max(abs(a - b) for a, b in zip(losses, fp32_losses)),
            "fp32_vs_bf16_ref_update_error": fp32_gap["worst_param_diff"],
        }
    result = {
        "plan": pm.plan.summary(),
        "losses": losses,
        "ref_losses": ref_losses,
        "losses_close": all(
            abs(a - b) <= (LOSS_RTOL_BF16 if case.get("precision") else RTOL) * abs(b) + ATOL
            for a, b in zip(losses, ref_losses)
        ),
        "step_time_s": times,
        "tensor_kinds": _tensor_kinds(pm),
        "fsdp2_layers": layers_fsdp2,
        "offloaded": offloaded,
        "fsdp_roots": len(roots),
        "fsdp_root_is_stage": roots == [pm.module],
        "grad_norms": norms,
        "post_clip_norms": post_norms,
        "ref_grad_norms": ref_norms,
        "grad_norms_close": len(norms) == len(ref_norms)
        and all(abs(a - b) <= ATOL + RTOL * abs(b) for a, b in zip(norms, ref_norms)),
        "num_param_groups": len(opt.param_groups),
        **(
            _compare_updates(full, ref_state, build().state_dict())
            if case.get("precision")
            else _compare(full, ref_state)
        ),
        **precision_checks,
        **grad_checks,
    }
    if "forward" in out:
        ref_model = build()
        ref_model.load_state_dict(ref_state)
        with torch.no_grad(), _autocast(case.get("precision"), torch.device("cpu")):
            expect = ref_model(batch(big_b, steps)[0]).float()
        tol = (LOSS_RTOL_BF16, 1e-2) if case.get("precision") else (RTOL, ATOL)
        result["forward_close"] = out["forward_full_batch"] and bool(
            torch.allclose(out["forward"], expect, rtol=tol[0], atol=tol[1])
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


def _union_over_ranks(values: Any) -> list[str]:
    """The sorted union of every rank's ``values`` (a collective: every rank calls it)."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(values))
    return sorted(set().union(*everyone))


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
    opt = make_optimizer(pm)
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
    # a parity case whose gradients are scaled by ``scale_grads`` after every backward: what a
    # sum instead of a mean over ranks or micro-batches gives; the gradient check must fail it
    "grad_scale_control": parity_case,
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
                    dataclasses.replace(
                        ls,
                        strategy=dataclasses.replace(
                            ls.strategy, recompute=recompute and ls.fqn.startswith("blocks")
                        ),
                    )
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
        opt = make_optimizer(pm)
        for _ in range(2):
            opt.zero_grad()
            pm.train_step(x, y)
            opt.step()
        out[label] = {"peak": pm.peak_memory_bytes, **pm.memory_breakdown}
        out["model_param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    return out if dist.get_rank() == 0 else None


_KINDS["memory"] = memory_case


def allocator_memory_case(case: dict) -> dict[str, Any] | None:
    """Two AdamW iterations of ``case["plan"]`` (gradients zeroed in place), the second under
    :class:`~uniap.executor.memory.AllocatorPeak` with :class:`StepMemory` around its
    ``train_step``; then ``train_step`` alone under ``AllocatorPeak``, gradients zeroed in
    place, and once more accumulating onto them: rank 0's allocator peaks, the baseline, the
    tensor count and the model's parameter bytes."""
    from uniap.executor.memory import AllocatorPeak, StepMemory

    build, batch, loss_fn, _ = _setup(case)
    plan = Plan.from_dict(case["plan"])
    x, y = batch(plan.global_batch_size, 0)
    model = build()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    pm = parallelize(
        model,
        plan=plan,
        loss_fn=loss_fn,
        global_batch_size=plan.global_batch_size,
        example_inputs=x,
    )
    opt = make_optimizer(pm)
    pm.train_step(x, y)
    opt.step()
    opt.zero_grad(set_to_none=False)
    counted = StepMemory(pm.module, pm.device)
    with AllocatorPeak(pm.device, [pm.module], [opt]) as alloc:
        with counted:
            pm.train_step(x, y)
        opt.step()
    # train_step alone (the optimizer step's temporaries aside): gradients zeroed in place,
    # then holding that step's values (accumulating, no zero_grad)
    opt.zero_grad(set_to_none=False)
    with AllocatorPeak(pm.device, [pm.module], [opt]) as zeroed:
        pm.train_step(x, y)
    with AllocatorPeak(pm.device, [pm.module], [opt]) as accumulating:
        pm.train_step(x, y)
    return (
        {
            "allocator_peak": alloc.peak_bytes,
            "step_allocator_peak": zeroed.peak_bytes,
            "step_allocator_peak_accumulating": accumulating.peak_bytes,
            "allocator_baseline": alloc.baseline_bytes,
            "count": counted.peak_memory_bytes,
            "count_terms": counted.breakdown,
            "model_param_bytes": model_bytes,
        }
        if dist.get_rank() == 0
        else None
    )


_KINDS["allocator_memory"] = allocator_memory_case


def output_freed_case(case: dict) -> dict[str, Any] | None:
    """One ``train_step`` of ``case["plan"]`` with a loss that records, when backward reaches
    it, whether each micro-batch's model output (the logits) is still alive: the loss saved
    what its backward needs, so the executor must not hold the output through backward."""
    import weakref

    build, batch, loss_fn, _ = _setup(case)
    plan = Plan.from_dict(case["plan"])
    x, y = batch(plan.global_batch_size, 0)
    alive_in_backward: list[bool] = []

    def watched_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ref = weakref.ref(output)
        loss = loss_fn(output, target)
        loss.register_hook(lambda g: alive_in_backward.append(ref() is not None))
        return loss

    pm = parallelize(
        build(),
        plan=plan,
        loss_fn=watched_loss,
        global_batch_size=plan.global_batch_size,
        example_inputs=x,
    )
    pm.train_step(x, y)
    return {"alive_in_backward": alive_in_backward} if dist.get_rank() == 0 else None


_KINDS["output_freed"] = output_freed_case


def meta_case(case: dict) -> dict[str, Any] | None:
    """A toy built on the meta device: every rank materialises only its shards; the full
    parameters equal a single-process init with the same seed, and two AdamW steps give the
    reference's losses. Reports this rank's parameter bytes against the model's."""
    from toy import Toy, toy_batch, toy_fqns, toy_init_weights, toy_loss

    from uniap.executor.materialize import init_model

    plan = Plan.from_dict(case["plan"])
    with torch.device("meta"):
        model = Toy()
    x, y = toy_batch(plan.global_batch_size, seed=0)
    pm = parallelize(
        model,
        plan=plan,
        loss_fn=toy_loss,
        global_batch_size=plan.global_batch_size,
        example_inputs=x,
        init_weights=toy_init_weights,
        seed=7,
    )
    local_bytes = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
        for p in pm.parameters()
    )
    on_meta = any(p.is_meta for p in pm.parameters())
    init_full = pm.full_state_dict()
    opt = make_optimizer(pm)
    losses = []
    for step in range(2):
        xb, yb = toy_batch(plan.global_batch_size, seed=step)
        opt.zero_grad()
        losses.append(pm.train_step(xb, yb))
        opt.step()
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local_bytes)
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        ref = Toy()
    init_model(ref, toy_fqns(), seed=7, init_weights=toy_init_weights)
    ref_init = {k: v.clone() for k, v in ref.state_dict().items()}
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, eps=EPS, foreach=True)
    ref_losses = []
    for step in range(2):
        xb, yb = toy_batch(plan.global_batch_size, seed=step)
        ref_opt.zero_grad()
        loss = toy_loss(ref(xb), yb)
        loss.backward()
        ref_opt.step()
        ref_losses.append(float(loss))
    layer_bytes = [
        sum(p.numel() * p.element_size() for p in ref.get_submodule(f).parameters())
        for f in toy_fqns()
    ]
    return {
        "init_equal": set(init_full) == set(ref_init)
        and all(torch.equal(init_full[k], ref_init[k]) for k in ref_init),
        "on_meta_after": on_meta,
        "losses": losses,
        "ref_losses": ref_losses,
        "losses_close": all(abs(a - b) <= ATOL + RTOL * abs(b) for a, b in zip(losses, ref_losses)),
        "local_param_bytes": everyone,
        "model_param_bytes": sum(layer_bytes),
        "largest_layer_bytes": max(layer_bytes),
    }


_KINDS["meta"] = meta_case
