"""Models that are not declared chains, split into pipeline stages by tracing their own forward
(pp = 2 and 4): the per-rank case function.

Each case builds the model (a Hugging Face family from :mod:`hf_own_forward`, or a hand-written
non-chain model from :mod:`own_forward`), splits it at the plan's stage boundaries, trains
three SGD steps with the model's own loss (or the case's loss) and compares, with the same
model on one process, the per-step losses and every parameter's gradient after the first
backward (gathered from every stage; a tied weight's copies each against the tied gradient),
then ``pm.eval(); pm(batch)`` against the trained reference's output.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from hf_own_forward import _families, _loss, _loss_fn, batch, build
from own_forward import ATOL, RTOL, _compare, full_grads, sgd
from toy import make_plan

from uniap.api import parallelize
from uniap.graph import build_graph


def all_stage_grads(pm: Any) -> dict[str, torch.Tensor]:
    """Every parameter's full gradient from every stage (collective)."""
    mine = full_grads(pm)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    out: dict[str, torch.Tensor] = {}
    for grads in everyone:
        out.update(grads)
    return out


def grads_by_every_name(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The reference gradients under every name of each parameter (tied weights twice)."""
    return {
        n: p.grad.clone()
        for n, p in model.named_parameters(remove_duplicate=False)
        if p.grad is not None
    }


def pipeline_case(case: dict) -> dict[str, Any] | None:
    """Train ``case["family"]`` at ``case["pp"]`` stages, each ``case["kinds"][i]`` (DDP / FSDP,
    tp = 1, optional recompute) at dp = world / pp; compare with one process."""
    family, big_b, c, steps, pp = case["family"], case.get("B", 16), case.get("c", 2), 3, case["pp"]
    world = dist.get_world_size()
    x0 = batch(family, big_b, 0)
    graph = build_graph(build(family), x0)
    dp = world // pp
    stages = [[(dp, 1, kind, case.get("recompute", False))] for kind in case["kinds"]]
    plan = make_plan(
        list(graph.fqns),
        world,
        stages,
        global_batch_size=big_b,
        num_microbatches=c,
        schedule=case.get("schedule", "1F1B"),
        split=case.get("split"),
        model_name=graph.name,
        signature=graph.signature,
    )
    pm = parallelize(
        build(family), plan=plan, loss_fn=_loss_fn(family), global_batch_size=big_b,
        example_inputs=x0,
    )  # fmt: skip
    opt = sgd(pm.parameters())
    losses, grads, norm = [], {}, None
    for step in range(steps):
        opt.zero_grad()
        targets = torch.zeros(big_b) if _loss_fn(family) is not None else None
        losses.append(pm.train_step(batch(family, big_b, step), targets))
        if step == 0:
            grads = all_stage_grads(pm)
            norm = float(pm.clip_grad_norm_(1e9))
        opt.step()
    pm.eval()
    with torch.no_grad():
        out = pm(batch(family, big_b, steps))
    if dist.get_rank() != 0:
        return None
    ref = build(family)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, foreach=True)
    ref_losses, ref_grads, ref_norm = [], {}, None
    for step in range(steps):
        ref_opt.zero_grad()
        loss = _loss(family, ref(**batch(family, big_b, step)))
        loss.backward()
        ref_losses.append(float(loss.detach()))
        if step == 0:
            ref_grads = grads_by_every_name(ref)
            ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9))
        ref_opt.step()
    with torch.no_grad():
        expect = ref(**batch(family, big_b, steps))
    key = "pooler_output" if _families()[family][3] == "vision" else "logits"
    got, want = out[key], expect[key]
    ref_grads = {k: v for k, v in ref_grads.items() if k in grads or k in dict(ref.named_parameters())}
    return {
        "plan": pm.plan.summary(),
        "forward_close": got.shape == want.shape
        and float((got - want).abs().max()) <= ATOL + RTOL * float(want.abs().max()),
        "forward_diff": (tuple(got.shape), tuple(want.shape), float((got - want).abs().max())
                         if got.shape == want.shape else None),
        "losses": losses,
        "ref_losses": ref_losses,
        "losses_close": all(
            abs(a - b) <= ATOL + RTOL * abs(b) for a, b in zip(losses, ref_losses, strict=True)
        ),
        "bad_grads": _compare(grads, ref_grads),
        "num_grads": len(grads),
        "norm": norm,
        "ref_norm": ref_norm,
    }
