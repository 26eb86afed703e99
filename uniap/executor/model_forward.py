"""Running the model's own forward (``pp == 1``): the plan applied in place, by FQN.

At ``pp == 1`` the executor deep-copies the whole model to the device and applies each
layer's strategy to the submodule at the layer's FQN (TP, recompute, DDP/FSDP, see
:mod:`uniap.executor.parallel_model`); the model's own ``forward(*args, **kwargs)`` then runs
unchanged. Whatever the forward does between and around the layers (scaling an embedding,
skip connections, attention masks, position ids, a loss computed from ``labels``) is what is
trained, so the function trained is the model's by construction, whatever its structure.

**Batch layouts.** Code outside the layers runs in the *base layout*, the first layer's
``(dp, tp)``: the inputs are sliced to it, and the loss is computed in it. A layer whose layout
differs has its forward wrapped (:class:`LayoutAdapter`): every batch-first tensor of its
arguments is resharded base -> layer, every batch-first tensor it returns layer -> base
(:class:`~uniap.executor.reshard.BatchReshard`, autograd-aware). A tensor is batch-first when
its dim 0 equals the local micro-batch size of the layout it is in; other tensors (masks
broadcast over the batch, rotary tables, scalars) pass unchanged. The wrapper is part of the
layer's forward, so a recomputed layer reshards again in its recomputation. (A declared chain
whose layers change layout runs as a chain instead, with one reshard per change; the cost
model charges that, so for other models a plan that mixes layouts moves up to twice the
activation bytes it was charged for.)

**Free parameters.** Parameters outside every layer (a model-level parameter, a position
table owned by the model) and parameters shared by several layers (tied input/output
embeddings) are one extra data-parallel unit: replicated, left out of the layers' DDP/FSDP
wrapping, and their gradients summed over the base layout's DP group once per iteration,
after the last micro-batch's backward. Every layer holding one must run in the base layout
(checked before training, naming the layers); at ``pp == 1`` that is the same ``dp``.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from uniap.contract import Plan
from uniap.errors import PlanMismatchError
from uniap.executor.mesh import ProcessGroups
from uniap.executor.reshard import BatchReshard, map_tensors

__all__ = [
    "BatchContext",
    "FreeParamSync",
    "LayoutAdapter",
    "check_free_layouts",
    "free_parameters",
    "install_layout_adapters",
]

logger = logging.getLogger(__name__)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _owner(name: str, fqns: Sequence[str]) -> str | None:
    return next((f for f in fqns if _under(name, f)), None)


def free_parameters(model: nn.Module, fqns: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The free parameters of ``model`` for the layers ``fqns``: ``{name: owning layers}``
    (name: the parameter's first FQN; owning layers: the layers holding it, empty for a
    parameter outside every layer). A parameter is free when no layer holds it or when two
    layers do (tied weights)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    free: dict[str, tuple[str, ...]] = {}
    for all_names in names.values():
        owners = {_owner(n, fqns) for n in all_names}
        layers = tuple(sorted(o for o in owners if o is not None))
        if None in owners or len(layers) != 1:
            free[all_names[0]] = layers
    return free


def check_free_layouts(free: Mapping[str, tuple[str, ...]], plan: Plan) -> tuple[int, int]:
    """The base layout ``(dp, tp)``; refuses a plan in which a layer holding a free parameter
    runs in another layout (its gradient contributions would be summed over the wrong
    ranks), naming the parameter, the layers and the fix."""
    first = plan.stages[0].layers[0]
    base = (first.dp, first.tp)
    strategies = {ls.fqn: ls for ls in plan.layer_strategies}
    for name, layers in sorted(free.items()):
        for fqn in layers:
            ls = strategies[fqn]
            if (ls.dp, ls.tp) != base:
                what = "shared by layers " + ", ".join(layers) if len(layers) > 1 else "in " + fqn
                raise PlanMismatchError(
                    f"parameter {name!r} ({what}) is trained as one data-parallel unit in the "
                    f"first layer's layout (dp={base[0]}, tp={base[1]}), but layer {fqn!r} runs "
                    f"at dp={ls.dp}, tp={ls.tp}; give {fqn!r} dp={base[0]}, tp={base[1]} or untie "
                    "the parameter"
                )
    return base


def _is_batch(t: torch.Tensor, batch_size: int) -> bool:
    return t.dim() > 0 and t.shape[0] == batch_size


def map_batch(fn: Any, value: Any, batch_size: int) -> Any:
    """Apply ``fn`` to every batch-first tensor (dim 0 == ``batch_size``) of a nested value;
    everything else passes. Mappings keep their type where it can be rebuilt (Hugging Face
    ``ModelOutput``)."""
    return map_tensors(lambda t: fn(t) if _is_batch(t, batch_size) else t, value)


class BatchContext:
    """The size of the micro-batch being run (set by the caller before each forward): what
    makes a tensor batch-first for the layout adapters."""

    def __init__(self) -> None:
        self.microbatch_size = 0


class LayoutAdapter:
    """The forward of a layer in another layout than the base: reshards its batch-first
    inputs base -> layer and its batch-first outputs layer -> base around the original
    forward. Installed as the module's ``forward`` attribute (inside FSDP's and the
    checkpoint's hooks)."""

    def __init__(
        self,
        forward: Any,
        groups: ProcessGroups,
        base: tuple[int, int],
        layer: tuple[int, int],
        context: BatchContext,
    ) -> None:
        self._forward = forward
        self._in = BatchReshard(groups, base, layer)
        self._out = BatchReshard(groups, layer, base)
        self._base_dp, self._layer_dp = base[0], layer[0]
        self._context = context
        self._host_group = groups.host_group
        self._name = ""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        b = self._context.microbatch_size
        self._check_same_structure((args, kwargs), b // self._base_dp)
        args, kwargs = map_batch(self._in, (args, kwargs), b // self._base_dp)
        out = self._forward(*args, **kwargs)
        return map_batch(self._out, out, b // self._layer_dp)

    def _check_same_structure(self, value: Any, batch_size: int) -> None:
        """Every rank must pass the same batch-first tensors (the reshards are collectives
        over ranks holding different samples): one small all-gather of a signature of the
        arguments, and a clear error instead of a hang when a rank's arguments differ (e.g.
        a Hugging Face attention mask that is None on a shard without padding). The
        signature is host data and goes over the host (gloo) group of
        :class:`~uniap.executor.mesh.ProcessGroups`, so the check never waits for the
        device's queued work (with NCCL, a device tensor read back would)."""
        parts: list[str] = []

        def walk(v: Any, path: str) -> None:
            if isinstance(v, torch.Tensor):
                parts.append(f"{path}:{tuple(v.shape) if _is_batch(v, batch_size) else '-'}")
            elif v is None:
                parts.append(f"{path}:None")
            elif isinstance(v, tuple | list):
                for i, x in enumerate(v):
                    walk(x, f"{path}[{i}]")
            elif isinstance(v, Mapping):
                for k, x in v.items():
                    walk(x, f"{path}.{k}")

        walk(value, "")
        text = ";".join(parts)
        mine = torch.tensor([zlib.crc32(text.encode())], dtype=torch.int64)
        everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size(self._host_group))]
        dist.all_gather(everyone, mine, group=self._host_group)
        if any(int(e) != int(mine) for e in everyone):
            raise PlanMismatchError(
                f"layer {self._name or '?'} runs in another data-parallel layout than the "
                "model's first layer, so its batch inputs are resharded between ranks, but the "
                f"ranks pass it different inputs (this rank: {text[:200]}); typically an "
                "attention mask that the model leaves out (None) on a shard without padding. "
                "Pad every shard the same way, or plan every layer in one layout"
            )


def install_layout_adapters(
    model: nn.Module,
    plan: Plan,
    groups: ProcessGroups,
    base: tuple[int, int],
    context: BatchContext,
) -> list[str]:
    """Wrap the forward of every layer whose layout differs from ``base``; their FQNs."""
    wrapped = []
    for ls in plan.stages[0].layers:
        if ls.dp == base[0]:
            continue  # equal dp (so equal tp at pp = 1): the data is where the layer needs it
        module = model.get_submodule(ls.fqn)
        adapter = LayoutAdapter(module.forward, groups, base, (ls.dp, ls.tp), context)
        adapter._name = ls.fqn
        module.forward = adapter
        wrapped.append(ls.fqn)
    if wrapped:
        logger.info("layers resharded from the base layout %s: %s", base, wrapped)
    return wrapped


class FreeParamSync:
    """Gradient sum of the free parameters, once per iteration (after the last backward).

    ``units``: ``(copies, group)`` pairs; each unit is one parameter of the model, held here
    as one or more local copies (a tied weight traced into two places of a pipeline stage),
    whose gradient is the sum over ``group`` (the ranks holding a copy) of every copy's
    gradient, given to every copy. A unit whose group spans several pipeline stages
    contributes zeros where no copy was used, so every rank of the group joins the sum.
    Gradients accumulated by earlier iterations (no ``zero_grad`` in between) are set aside
    and added back after the sum, so they are not summed again."""

    def __init__(
        self,
        units: Sequence[tuple[Sequence[nn.Parameter], dist.ProcessGroup | None]],
        *,
        spans_stages: Sequence[bool] | None = None,
    ) -> None:
        self.units: list[tuple[list[nn.Parameter], dist.ProcessGroup | None, bool]] = []
        spans = list(spans_stages) if spans_stages is not None else [False] * len(units)
        for (copies, group), span in zip(units, spans):
            copies = [p for p in copies if p.requires_grad]
            if copies and group is not None and dist.get_world_size(group) > 1:
                self.units.append((copies, group, span))
        self._kept: list[torch.Tensor | None] = []

    @property
    def params(self) -> list[nn.Parameter]:
        """Every synchronised copy."""
        return [p for copies, _, _ in self.units for p in copies]

    def begin(self) -> None:
        """Set the accumulated gradients aside (call before the iteration's first backward)."""
        self._kept = []
        for p in self.params:
            self._kept.append(p.grad)
            p.grad = None

    def finish(self) -> None:
        """Sum this iteration's gradients over each unit's group, then add back the
        accumulated ones."""
        by_group: dict[dist.ProcessGroup, list[tuple[list[nn.Parameter], torch.Tensor]]] = {}
        for copies, group, span in self.units:
            grads = [p.grad for p in copies if p.grad is not None]
            if not grads and not span:
                continue  # unused here, and (one stage) on every rank of the group
            total = torch.zeros_like(copies[0]) if not grads else grads[0].clone()
            for g in grads[1:]:
                total.add_(g)
            by_group.setdefault(group, []).append((copies, total))
        for group, entries in by_group.items():
            totals = [t for _, t in entries]
            flat = torch._utils._flatten_dense_tensors(totals)
            dist.all_reduce(flat, group=group)
            for (copies, _), synced in zip(
                entries, torch._utils._unflatten_dense_tensors(flat, totals)
            ):
                for p in copies:
                    p.grad = synced.clone() if len(copies) > 1 else synced
        for p, kept in zip(self.params, self._kept):
            if kept is not None:
                p.grad = kept if p.grad is None else p.grad.add_(kept)
        self._kept = []
