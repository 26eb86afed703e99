"""Models that are not declared chains, split into pipeline stages by tracing their own forward
(pp = 2 and 4): the per-rank case functions.

Each case builds the model (a Hugging Face family from :mod:`hf_own_forward`, or a hand-written
non-chain model from :mod:`own_forward`), splits it at the plan's stage boundaries, trains
three SGD steps with the model's own loss (or the case's loss) and compares, with the same
model on one process, the per-step losses, every parameter's gradient after the first
backward (gathered from every stage; each copy of a tied weight against the tied gradient) and
the global gradient norm, then ``pm.eval(); pm(batch)`` against the trained reference.
"""

from __future__ import annotations

import contextlib
from typing import Any

import hf_own_forward as hf
import own_forward as own
import torch
import torch.distributed as dist
from own_forward import ATOL, RTOL, _compare, full_grads, sgd
from toy import make_plan, toy_loss

from uniap.api import parallelize
from uniap.graph import build_graph


class _Model:
    """One case's model, batches and loss, Hugging Face or hand-written."""

    def __init__(self, case: dict) -> None:
        self.name = case["model"]
        self.is_hf = self.name in hf.FAMILIES
        self.meta = case.get("meta", False)

    def build(self) -> torch.nn.Module:
        """The model; with ``meta`` built on the meta device (parallelize initialises it)."""
        with torch.device("meta") if self.meta else contextlib.nullcontext():
            model = hf.build(self.name) if self.is_hf else own.build(self.name)
        return model

    def reference(self, fqns: list[str]) -> torch.nn.Module:
        """The single-process reference: for a meta start, initialised as every plan does."""
        from uniap.executor.materialize import init_model

        model = self.build()
        return init_model(model, fqns, seed=0) if self.meta else model

    def batch(self, size: int, seed: int) -> tuple[Any, Any]:
        """``(inputs, targets)``; targets None when the model computes its own loss."""
        if self.is_hf:
            fn = hf._loss_fn(self.name)
            return hf.batch(self.name, size, seed), torch.zeros(size) if fn else None
        return own.batch(self.name, size, seed)

    @property
    def loss_fn(self) -> Any:
        if self.is_hf:
            return hf._loss_fn(self.name)
        return None if self.name == "kwargs" else toy_loss

    def loss(self, out: Any, tgt: Any) -> torch.Tensor:
        if self.is_hf:
            return hf._loss(self.name, out)
        return own._loss(self.name, out, tgt)

    def call(self, model: torch.nn.Module, x: Any) -> Any:
        return model(**x) if isinstance(x, dict) else model(x)

    def compared(self, out: Any) -> torch.Tensor:
        if not self.is_hf:
            return out["logits"] if isinstance(out, dict) else out
        return out["pooler_output" if hf._families()[self.name][3] == "vision" else "logits"]


def all_stage_grads(pm: Any) -> dict[str, torch.Tensor]:
    """Every parameter's full gradient from every stage (collective)."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, full_grads(pm))
    out: dict[str, torch.Tensor] = {}
    for grads in everyone:
        out.update(grads)
    return out


_META_GRAPHS: dict[tuple[str, int], Any] = {}


def _graph(m: _Model, x0: Any, big_b: int) -> Any:
    """The model's graph for ``x0`` (a batch of ``big_b``), traced once per process (shared with
    the pp = 1 cases of the same model and batch); only its layer FQNs, signature and TP plans
    are read (``parallelize`` traces and splits the model it is given itself)."""
    if not m.meta:
        return (hf if m.is_hf else own).graph(m.name, big_b)
    key = (m.name, big_b)
    if key not in _META_GRAPHS:
        _META_GRAPHS[key] = build_graph(m.build(), x0, pipeline_check=False)
    return _META_GRAPHS[key]


def _plan(m: _Model, case: dict, x0: Any, big_b: int) -> Any:
    graph = _graph(m, x0, big_b)
    world, pp = dist.get_world_size(), case["pp"]
    stages = [
        [(world // pp, case.get("tp", 1), kind, case.get("recompute", False))]
        for kind in case["kinds"]
    ]
    return make_plan(
        list(graph.fqns),
        world,
        stages,
        global_batch_size=big_b,
        num_microbatches=case.get("c", 2),
        schedule=case.get("schedule", "1F1B"),
        split=case.get("split"),
        model_name=graph.name,
        signature=graph.signature,
    )


def pipeline_case(case: dict) -> dict[str, Any] | None:
    """Train ``case["model"]`` at ``case["pp"]`` stages, stage i all ``case["kinds"][i]``
    (DDP / FSDP at dp = world / pp, tp = 1, optional recompute); compare with one process.
    ``accumulate``: two ``train_step`` calls without ``zero_grad``, gradients compared."""
    m, big_b, steps = _Model(case), case.get("B", 16), 3
    accumulate = case.get("accumulate", False)
    x0, _ = m.batch(big_b, 0)
    plan = _plan(m, case, x0, big_b)
    pm = parallelize(
        m.build(),
        plan=plan,
        loss_fn=m.loss_fn,
        global_batch_size=big_b,
        example_inputs=x0,
        compile=case.get("compile", False),
    )
    opt = sgd(pm.parameters())
    grad_step = 1 if accumulate else 0
    losses, grads, norm = [], {}, None
    for step in range(steps):
        if not (accumulate and step == 1):
            opt.zero_grad()
        losses.append(pm.train_step(*m.batch(big_b, step)))
        if step == grad_step:
            grads = all_stage_grads(pm)
            norm = float(pm.clip_grad_norm_(1e9))
        opt.step()
    pm.eval()
    with torch.no_grad():
        out = pm(m.batch(big_b, steps)[0])
    if dist.get_rank() != 0:
        return None
    ref = m.reference([ls.fqn for ls in plan.layer_strategies])
    ref_opt = torch.optim.SGD(ref.parameters(), lr=own.LR, foreach=True)
    ref_losses, ref_grads, ref_norm, missing = [], {}, None, []
    for step in range(steps):
        if not (accumulate and step == 1):
            ref_opt.zero_grad()
        x, y = m.batch(big_b, step)
        loss = m.loss(m.call(ref, x), y)
        loss.backward()
        ref_losses.append(float(loss.detach()))
        if step == grad_step:
            # each copy of a tied weight (the names the stages hold it under) against the
            # tied gradient; every parameter must be held under one of its names
            ref_grads, missing = {}, []
            by_tensor: dict[int, list[str]] = {}
            for n, p in ref.named_parameters(remove_duplicate=False):
                by_tensor.setdefault(id(p), []).append(n)
                if p.grad is not None and n in grads:
                    ref_grads[n] = p.grad.clone()
            for names in by_tensor.values():
                if not any(n in grads for n in names):
                    missing.append(names[0])
            ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9))
        ref_opt.step()
    with torch.no_grad():
        expect = m.call(ref, m.batch(big_b, steps)[0])
    got, want = m.compared(out), m.compared(expect)
    return {
        "plan": pm.plan.summary(),
        "forward_close": got.shape == want.shape
        and float((got - want).abs().max()) <= ATOL + RTOL * float(want.abs().max()),
        "losses": losses,
        "ref_losses": ref_losses,
        "losses_close": all(
            abs(a - b) <= ATOL + RTOL * abs(b) for a, b in zip(losses, ref_losses, strict=True)
        ),
        "bad_grads": _compare(grads, ref_grads) + [f"{n}: missing" for n in missing],
        "num_grads": len(grads),
        "norm": norm,
        "ref_norm": ref_norm,
    }


class Revisits(torch.nn.Module):
    """Runs its first block again after its second: no split keeps each layer on one stage."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](torch.relu(self.blocks[1](self.blocks[0](x))))


def refusal_case(case: dict) -> dict[str, Any] | None:
    """``parallelize`` under a pp > 1 plan the executor must refuse before training: every
    rank's error message (None where it did not raise)."""
    from uniap.errors import UniapError

    big_b, world, pp, tp = 8, dist.get_world_size(), case["pp"], case.get("tp", 1)
    if case["model"] == "revisits":
        torch.manual_seed(0)
        model: torch.nn.Module = Revisits()
        x0: Any = torch.randn(big_b, 8)
    else:
        m = _Model(case)
        model, x0 = m.build(), m.batch(big_b, 0)[0]
    graph = build_graph(model, x0, pipeline_check=False)
    fqns, graph_name, signature = list(graph.fqns), graph.name, graph.signature
    per_layer = [
        # the blocks (Megatron pairs) at tp; the vocabulary-parallel embedding and head too
        # would only lengthen the refusal's list
        (world // pp // tp, tp, "DDP")
        if layer.tp_pairs and layer.supports_tp(tp)
        else (world // pp, 1, "DDP")
        for layer in graph.layers
    ]
    half = len(fqns) // 2
    plan = make_plan(
        fqns,
        world,
        [per_layer[:half], per_layer[half:]],
        global_batch_size=big_b,
        num_microbatches=1,
        split=[half, len(fqns) - half],
        model_name=graph_name,
        signature=signature,
    )
    try:
        parallelize(model, plan=plan, loss_fn=toy_loss, global_batch_size=big_b, example_inputs=x0)
        mine = None
    except UniapError as e:
        mine = str(e)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {"errors": everyone} if dist.get_rank() == 0 else None


def uneven_mask_case(case: dict) -> dict[str, Any] | None:
    """pp = 1, layers in two layouts (dp4 and dp2 x tp2), one sample per rank in the first
    layout: a rank whose sample has no padding gets no attention mask from the model, the
    others do; every rank must raise the same clear error in train_step (not hang)."""
    from uniap.errors import UniapError

    m, big_b = _Model({"model": "llama_untied"}), 8
    x0, _ = m.batch(big_b, 0)
    graph = build_graph(m.build(), x0, pipeline_check=False)
    world = dist.get_world_size()
    per_layer = [
        # the blocks at tp 2, the embedding (first layout: one sample per rank) at dp 4
        (world // 2, 2, "FSDP") if layer.tp_pairs and layer.supports_tp(2) else (world, 1, "DDP")
        for layer in graph.layers
    ]
    plan = make_plan(
        list(graph.fqns), world, [per_layer], global_batch_size=big_b, num_microbatches=2,
        model_name=graph.name, signature=graph.signature,
    )  # fmt: skip
    pm = parallelize(m.build(), plan=plan, global_batch_size=big_b, example_inputs=x0)
    try:
        pm.train_step(x0)
        mine = None
    except UniapError as e:
        mine = str(e).split(" (this rank:")[0]
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    return {"errors": everyone} if dist.get_rank() == 0 else None


def dispatch(case: dict) -> Any:
    """Run a parity case or a refusal case."""
    if case["name"] == "uneven_mask":
        return uneven_mask_case(case)
    return refusal_case(case) if case["name"].startswith("refuse_") else pipeline_case(case)
