"""Models that are not chains, and the per-rank case function that trains them under a plan
and compares with the unmodified model's own forward on one process.

Each case: three SGD steps (per-step losses, and every full gradient after the first
backward, against one process; rtol 1e-4). A case with ``accumulate`` calls ``train_step``
twice without ``zero_grad`` and compares the accumulated gradients with ``g1 + g2``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from toy import DIM, SEQ, VOCAB, Block, make_plan, toy_loss

from uniap.api import parallelize
from uniap.contract import Plan
from uniap.graph import build_graph

RTOL, ATOL = 1e-4, 1e-5
LR = 0.1


class _Base(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(DIM, VOCAB)


class SkipNet(_Base):
    """A skip connection from the embedding around both blocks."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h0 = self.tok(ids)
        h = self.blocks[1](self.blocks[0](h0))
        return self.head(h + h0)


class ScaledEmbedding(_Base):
    """The embedding scaled by sqrt(d) in the model's forward (Gemma, T5)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) * math.sqrt(DIM)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


class ModelParameter(_Base):
    """A learned position table owned by the model itself, outside every layer."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(SEQ, DIM) * 0.1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos
        for b in self.blocks:
            h = b(h)
        return self.head(h)


class KeywordOnly(_Base):
    """Keyword-only inputs, a padding mask, a non-batch argument and its own loss."""

    def forward(
        self,
        *,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        scale: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        h = self.tok(input_ids) * attention_mask.unsqueeze(-1) * scale
        for b in self.blocks:
            h = b(h)
        logits = self.head(h)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
        return out


class Tied(_Base):
    """Output projection tied to the input embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.head.weight = self.tok.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


MODELS = {
    "skip": SkipNet,
    "scaled": ScaledEmbedding,
    "model_param": ModelParameter,
    "kwargs": KeywordOnly,
    "tied": Tied,
}


def build(name: str) -> nn.Module:
    """Same weights on every process."""
    torch.manual_seed(0)
    return MODELS[name]()


def batch(name: str, size: int, seed: int) -> tuple[Any, Any]:
    """``(inputs, targets)``; for the keyword model a dict with labels and targets None."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(VOCAB, (size, SEQ + 1), generator=g)
    ids, tgt = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    if name != "kwargs":
        return ids, tgt
    mask = torch.ones(size, SEQ)
    mask[::2, -3:] = 0.0  # padding on every other sample
    return {"input_ids": ids, "attention_mask": mask, "labels": tgt, "scale": 0.5}, None


def sgd(params: Any) -> torch.optim.SGD:
    """SGD with foreach=True; plain tensors and DTensors in separate groups (a foreach kernel
    takes one kind)."""
    params = list(params)
    groups = [
        {"params": [p for p in params if isinstance(p, DTensor) == is_dt]}
        for is_dt in (False, True)
    ]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=LR, foreach=True)


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _loss(name: str, out: Any, tgt: Any) -> torch.Tensor:
    return out["loss"] if name == "kwargs" else toy_loss(out, tgt)


def full_grads(pm: Any) -> dict[str, torch.Tensor]:
    """Every parameter's full gradient (collective: every rank calls it)."""
    out = {}
    for name, p in pm.named_parameters():
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            g = g.full_tensor()
        out[name] = g.detach().cpu().clone()
    return out


def _compare(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> list[str]:
    """Gradients that differ: relative to each tensor's scale (max |ref|), so entries near
    zero in a tensor of large gradients may differ by float32 summation order only."""
    bad = [f"{k}: missing" for k in ref if k not in got]
    bad += [f"{k}: extra" for k in got if k not in ref]
    for k, r in ref.items():
        if k not in got:
            continue
        if got[k].shape != r.shape:
            bad.append(f"{k}: shape {tuple(got[k].shape)} vs {tuple(r.shape)}")
            continue
        diff = float((got[k] - r).abs().max()) if r.numel() else 0.0
        if diff > ATOL + RTOL * float(r.abs().max()):
            bad.append(f"{k}: max abs diff {diff:.3g} (max |ref| {float(r.abs().max()):.3g})")
    return bad


def rank_verdicts(
    grads: dict[str, torch.Tensor],
    ref_grads: dict[str, torch.Tensor],
    extra: Any = None,
    *,
    staged: bool,
) -> list[tuple[list[str], list[str], Any]] | None:
    """Every rank's gradients against the reference's (every parameter; with pipeline stages,
    ``staged``, those the rank holds), gathered: on rank 0 ``(bad, names, extra)`` per rank,
    None on the others (collective)."""
    mine = {k: v for k, v in ref_grads.items() if k in grads} if staged else ref_grads
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, (_compare(grads, mine), sorted(grads), extra))
    return every if dist.get_rank() == 0 else None


def parity_summary(
    every: list[tuple[list[str], list[str], Any]],
    ref_grads: dict[str, torch.Tensor],
    losses: list[float],
    ref_losses: list[float],
) -> dict[str, Any]:
    """Rank 0's verdict over :func:`rank_verdicts`: losses within tolerance, gradients that
    differ, parameters no rank compared, and how many were compared."""
    names = {n for _, ns, _ in every for n in ns}
    return {
        "losses": losses,
        "ref_losses": ref_losses,
        "losses_close": all(
            abs(a - b) <= ATOL + RTOL * abs(b) for a, b in zip(losses, ref_losses, strict=True)
        ),
        "bad_grads": sorted({b for bad, _, _ in every for b in bad}),
        "missing_grads": sorted(set(ref_grads) - names),
        "num_grads": len(names),
    }


def _reference(name: str, big_b: int, steps: int, accumulate: bool) -> tuple[list, dict]:
    model = build(name)
    opt = torch.optim.SGD(model.parameters(), lr=LR, foreach=True)
    losses, grads = [], {}
    for step in range(steps):
        x, y = batch(name, big_b, step)
        if not (accumulate and step == 1):
            opt.zero_grad()
        loss = _loss(name, _call(model, x), y)
        loss.backward()
        losses.append(float(loss.detach()))
        if step == (1 if accumulate else 0):
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            if accumulate:
                break
        opt.step()
    return losses, grads


@functools.cache
def graph(name: str, size: int) -> Any:
    """The model's graph for a batch of ``size``, traced once per process and without the
    pipeline-split check: the cases read its layer FQNs, signature and TP plans only
    (``parallelize`` traces the model it is given itself)."""
    return build_graph(build(name), batch(name, size, 0)[0], pipeline_check=False)


def own_forward_case(case: dict) -> dict[str, Any] | None:
    """Train ``case["model"]`` at pp = 1: layers with a TP plan get ``case["tp_layers"]``
    ((dp, tp, kind[, recompute])), the others ``case["others"]``; compare losses and
    gradients with one process."""
    name, big_b, c = case["model"], case.get("B", 8), case.get("c", 1)
    steps, accumulate = case.get("steps", 3), case.get("accumulate", False)
    x0, _ = batch(name, big_b, 0)
    g = graph(name, big_b)
    per_layer = [
        tuple(case["tp_layers"] if layer.supports_tp(case["tp_layers"][1]) else case["others"])
        for layer in g.layers
    ]
    for fqn, strategy in case.get("overrides", {}).items():  # one layer's own strategy
        per_layer[g.fqns.index(fqn)] = tuple(strategy)
    plan: Plan = make_plan(
        list(g.fqns),
        dist.get_world_size(),
        [per_layer],
        global_batch_size=big_b,
        num_microbatches=c,
        model_name=g.name,
        signature=g.signature,
    )
    loss_fn = None if name == "kwargs" else toy_loss
    pm = parallelize(
        build(name),
        plan=plan,
        loss_fn=loss_fn,
        global_batch_size=big_b,
        example_inputs=x0,
        compile=case.get("compile", False),
    )
    opt = sgd(pm.parameters())
    losses, grads = [], {}
    for step in range(steps):
        x, y = batch(name, big_b, step)
        if not (accumulate and step == 1):
            # as nn.Module.zero_grad; ``zero_in_place``: gradients kept, zeroed
            pm.zero_grad(set_to_none=not case.get("zero_in_place", False))
        losses.append(pm.train_step(x, y))
        if step == (1 if accumulate else 0):
            grads = full_grads(pm)
            if accumulate:
                break
        opt.step()
    if dist.get_rank() != 0:
        return None
    ref_losses, ref_grads = _reference(name, big_b, steps, accumulate)
    return {
        "plan": pm.plan.summary(),
        "losses": losses,
        "ref_losses": ref_losses,
        "losses_close": all(
            abs(a - b) <= ATOL + RTOL * abs(b) for a, b in zip(losses, ref_losses, strict=True)
        ),
        "bad_grads": _compare(grads, ref_grads),
        "num_grads": len(grads),
    }
