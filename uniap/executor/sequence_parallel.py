"""Sequence parallelism of one tensor-parallel layer (Megatron-SP, Korthikanti et al. 2022).

A layer whose plan says ``sp`` runs its tensor-parallel pairs as
:mod:`uniap.executor.tensor_parallel` does, but the residual stream between them is sharded
along the sequence dimension over the TP group instead of replicated, so the norms, residual
adds and other position-wise ops compute (and keep for backward) ``1 / tp`` of it. The layer is
self-contained: its input and output at the boundary stay replicated over the TP group, so the
user's forward around it, pipeline stage boundaries and neighbours without SP are untouched.

What runs, for a layer with sequence dimension ``d`` (:attr:`uniap.graph.Layer.sp_seq_dim`):

- boundary in (:class:`SequenceParallelForward`, installed as the layer's ``forward``): the
  layer's first tensor input ``x``, whole on every rank, becomes this rank's contiguous chunk
  along ``d``, a ``Shard(d)`` DTensor (``redistribute`` Replicate -> Shard: a local copy
  forward, an all-gather of the gradient backward); the whole ``x`` can be freed. The layer's
  own forward then runs on DTensors, which keep global shapes (``x.shape`` is what the user's
  code expects) and global semantics: an op between the regions that mixes positions would
  still be computed right, DTensor gathering what it needs, but that gather is not in the cost
  model, so :mod:`uniap.sp_plan` offers SP only to layers whose pairs sit in their own
  submodules and whose calls between them act on each position apart (found in the trace);
- parameters outside the pairs' regions (norm weights and biases) become ``Replicate``
  DTensors on the TP mesh, so their gradients (each rank has the part of its own chunk,
  ``Partial``) are summed over the group (torch's ``SequenceParallel`` style): once accumulated
  (a hook, after every micro-batch's backward), or by FSDP2 / ``replicate`` before their
  reduction (the cost model charges both);
- region in (a pre-hook of each pair's region: the smallest submodule holding the pair's
  Linears, :attr:`uniap.graph.Layer.sp_regions`, e.g. ``attn`` or ``mlp``): every DTensor
  argument is all-gathered along ``d`` and passed on as a plain tensor, so the region's own code
  (head reshapes from ``x.shape``, attention masks, rotary tables) sees the whole sequence; its
  column-wise Linears read that gathered tensor (backward: one reduce-scatter of its gradient);
- region out: the row-wise Linear's output is reduce-scattered along ``d`` (``RowwiseParallel``
  with ``output_layouts=Shard(d)``; backward: an all-gather of the gradient);
- boundary out: every DTensor the layer returns is all-gathered back to a whole, plain tensor
  (backward: the local chunk of the gradient).

Communication per micro-batch on the TP group, per pair: forward ``all_gather(in) +
reduce_scatter(out)``, backward ``reduce_scatter(in) + all_gather(out)`` (in place of two
all-reduces of the same tensors); per layer: forward ``all_gather(output)``, backward
``all_gather(input gradient)``. With recompute the checkpoint (non-reentrant
``torch.utils.checkpoint``, RNG state preserved) sits inside the boundary, so it keeps the
``1 / tp`` chunk of the input, and the recomputation repeats the pairs' collectives, not the
boundary's. FSDP's hooks stay outside it, as with
:func:`~uniap.executor.activation_checkpoint.apply_ac`.

Random ops outside the regions (dropout on the residual stream) draw from each rank's own
generator on its chunk, which differs from dropout on the whole tensor (Megatron uses a
separate RNG tracker); training with such dropout is correct in distribution, not bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.utils.checkpoint import checkpoint

from uniap.errors import PlanMismatchError
from uniap.executor.reshard import map_tensors
from uniap.graph import Layer

__all__ = ["SequenceParallelForward", "apply_sp", "check_sp_supported", "prepare_sp_regions"]

logger = logging.getLogger(__name__)


def check_sp_supported(layer: Layer | None, fqn: str, tp: int) -> None:
    """Refuse sequence parallelism for a layer that cannot run it at ``tp`` (one source of
    truth with the planner: :meth:`uniap.graph.Layer.sp_why_not`)."""
    if layer is None:
        raise PlanMismatchError(
            f"layer {fqn!r}: the plan asks for sequence parallelism but no layer description "
            "was given; pass example_inputs so the model graph can be built"
        )
    why = layer.sp_why_not(tp)
    if why is not None:
        raise PlanMismatchError(
            f"layer {fqn!r} cannot run sequence parallel at tp={tp}: {why}; set sp: false for it"
        )


def _gather(t: torch.Tensor) -> torch.Tensor:
    """A DTensor all-gathered to a whole plain tensor (autograd-correct); others unchanged."""
    if not isinstance(t, DTensor):
        return t
    return t.redistribute(t.device_mesh, [Replicate()]).to_local()


def prepare_sp_regions(
    module: nn.Module, layer: Layer, tp_mesh: DeviceMesh, register: Callable
) -> None:
    """Inside the layer ``module``: gather DTensor inputs at each region's entry (``register``
    ``(local, dtensor)`` tells the column-wise Linears which gathered DTensor a plain tensor
    is, so they reduce-scatter its gradient once), and replicate the parameters outside every
    region as DTensors. Called by :func:`uniap.executor.tensor_parallel.apply_tp` before the
    pairs are sharded."""
    regions = [module.get_submodule(r) for r in layer.sp_regions]

    def gather_inputs(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        def one(t: torch.Tensor) -> torch.Tensor:
            if not isinstance(t, DTensor):
                return t
            whole = t.redistribute(t.device_mesh, [Replicate()])
            local = whole.to_local()
            register(local, whole)
            return local

        return map_tensors(one, args), map_tensors(one, kwargs)

    for region in regions:
        region.register_forward_pre_hook(gather_inputs, with_kwargs=True)
    inside = {id(m) for r in regions for m in r.modules()}
    for sub in module.modules():
        if id(sub) in inside:
            continue
        for name, p in list(sub.named_parameters(recurse=False)):
            if isinstance(p, DTensor):
                continue
            dt = DTensor.from_local(p.data, tp_mesh, [Replicate()], run_check=False)
            param = nn.Parameter(dt, requires_grad=p.requires_grad)
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(_sum_partial_grad)
            sub.register_parameter(name, param)


def _sum_partial_grad(param: torch.Tensor) -> None:
    """A replicated parameter used on sequence shards gets a ``Partial`` gradient (each rank
    its chunk's part): summed over the TP group once accumulated, so the optimizer, clipping
    and checkpoints see the parameter's placement. (Under FSDP2 / ``replicate`` the parameter
    in the forward is theirs and they redistribute it the same way before reducing.)"""
    grad = param.grad
    if isinstance(grad, DTensor) and any(pl.is_partial() for pl in grad.placements):
        param.grad = grad.redistribute(grad.device_mesh, [Replicate()] * grad.device_mesh.ndim)


class SequenceParallelForward:
    """The forward of an SP layer: replicated input -> sequence shard, the layer's own forward
    (checkpointed with ``recompute``, so only the shard is kept), its DTensor outputs gathered
    back. Installed as the module's ``forward`` attribute: inside FSDP's hooks and inside a
    layout adapter (:mod:`uniap.executor.model_forward`), which then reshards whole tensors."""

    def __init__(
        self,
        forward: Callable[..., Any],
        layer: Layer,
        tp_mesh: DeviceMesh,
        *,
        recompute: bool,
        on_exit: Callable[[], None],
    ) -> None:
        self._forward, self._on_exit = forward, on_exit
        self.fqn, self.seq_dim, self.mesh = layer.fqn, layer.sp_seq_dim, tp_mesh
        self.recompute = recompute

    def _body(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._forward(*args, **kwargs)
        finally:  # also after the recomputation in backward
            self._on_exit()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # the first tensor argument is the residual stream (the one the trace measured)
        first = next((a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)), None)
        if first is None or isinstance(first, DTensor):
            raise PlanMismatchError(
                f"layer {self.fqn!r}: sequence parallelism needs a plain tensor as the layer's "
                f"first argument, got {type(first).__name__}"
            )
        tp, d = self.mesh.size(), self.seq_dim
        if first.dim() <= d or first.shape[d] % tp:
            raise PlanMismatchError(
                f"layer {self.fqn!r}: sequence parallelism splits dimension {d} of its input, "
                f"shape {list(first.shape)}, over tp={tp}; it must be divisible (pad the "
                "sequence, or re-plan without sp)"
            )
        # Replicate -> Shard: a contiguous local copy forward (the whole input can be freed),
        # the gradient all-gathered backward
        whole = DTensor.from_local(first, self.mesh, [Replicate()], run_check=False)
        shard = whole.redistribute(self.mesh, [Shard(d)])
        args = tuple(shard if a is first else a for a in args)
        kwargs = {k: shard if v is first else v for k, v in kwargs.items()}
        if self.recompute:
            out = checkpoint(
                self._body, *args, use_reentrant=False, preserve_rng_state=True, **kwargs
            )
        else:
            out = self._body(*args, **kwargs)
        return map_tensors(_gather, out)


def apply_sp(
    module: nn.Module,
    layer: Layer,
    tp_mesh: DeviceMesh,
    *,
    recompute: bool = False,
    on_exit: Callable[[], None] = lambda: None,
) -> nn.Module:
    """Make the layer ``module`` take and return whole (replicated) tensors while its body runs
    sequence-sharded, in place; with ``recompute`` the body is checkpointed inside the
    boundary, so only the sequence chunk of the input is kept (the executor then leaves out
    the layer's :func:`~uniap.executor.activation_checkpoint.apply_ac`). ``on_exit`` runs after
    every forward of the body (its recomputation included)."""
    module.forward = SequenceParallelForward(
        module.forward, layer, tp_mesh, recompute=recompute, on_exit=on_exit
    )
    logger.debug(
        "sequence parallel x%d on %s (dim %d)", tp_mesh.size(), layer.fqn, layer.sp_seq_dim
    )
    return module
