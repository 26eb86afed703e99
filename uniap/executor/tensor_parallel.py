"""Tensor parallelism of one layer: Megatron pairs with DTensor's ``parallelize_module``.

For every :class:`uniap.graph.TPPair` of the layer, the ``colwise`` Linears get
``ColwiseParallel`` (weight split by output features, input replicated) and the ``rowwise``
Linear ``RowwiseParallel`` (weight split by input features, output all-reduced). The layer's
forward reshapes heads with ``-1``, so the local head count follows.

Communication per micro-batch and pair, on the layer's TP group (``tp`` consecutive ranks):
forward one all-reduce of the row-wise output (``allreduce_bytes_per_sample * b / dp``
bytes); backward one all-reduce of the gradient of the pair's input (same size). The
column-wise Linears of a layer that read the *same* tensor (``q/k/v`` of self-attention,
``gate/up`` of SwiGLU) share one replicated DTensor of it, so their partial input gradients
are summed locally and all-reduced once (stock ``ColwiseParallel`` would wrap the input once
per Linear and all-reduce three times); a pair whose column-wise Linears read different
tensors (cross-attention: ``q`` from the decoder stream, ``k/v`` from the encoder output)
all-reduces once per distinct input in backward. Parameters outside the pairs (norms) stay
replicated on the TP group and compute identical gradients, which are therefore never summed
over TP.

Vocabulary-parallel embedding and head (``Layer.tp_vocab``, as torchtitan shards its token
embedding and output): the embedding's vocabulary ``nn.Embedding`` gets ``RowwiseParallel``
(input ids replicated, the table split by rows, each rank looks up its rows and the partial
outputs are all-reduced in forward; no communication backward: the ids have no gradient), the
head's ``nn.Linear`` ``ColwiseParallel`` with its output left a DTensor sharded on the
vocabulary (``Shard(-1)``): each rank holds ``V / tp`` of the logits, the loss runs on them
under ``loss_parallel()`` (:mod:`uniap.executor.vocab_loss`) and the gradient of the head's
input is all-reduced in backward. The rest of such a layer (a position table, a norm) stays
replicated and computes identical gradients on the TP ranks, as the norms of a block do.

Only layers with ``Layer.supports_tp(tp)`` may run at ``tp > 1`` (one source of truth with
the planner).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from uniap.errors import PlanMismatchError
from uniap.executor.sequence_parallel import apply_sp, check_sp_supported, prepare_sp_regions
from uniap.graph import Layer

__all__ = ["apply_tp", "check_tp_supported"]

logger = logging.getLogger(__name__)


def check_tp_supported(layer: Layer | None, fqn: str, tp: int) -> None:
    """Refuse ``tp > 1`` for a layer without a TP plan or whose sizes ``tp`` does not divide."""
    if tp == 1:
        return
    if layer is None:
        raise PlanMismatchError(
            f"layer {fqn!r}: the plan asks for tp={tp} but no layer description (TP plan) was "
            "given; pass example_inputs so the model graph can be built"
        )
    why = layer.why_not_tp(tp)
    if why is None:
        return
    if not layer.tp_enabled:
        raise PlanMismatchError(f"layer {fqn!r} cannot run at tp={tp}: {why}; use tp=1 for it")
    raise PlanMismatchError(f"layer {fqn!r} cannot run at tp={tp}: {why}")


class _SharedInputCache:
    """Replicated DTensors of the column-wise inputs seen during one forward of a layer, keyed
    by the local tensor (held, so its id cannot be reused before :meth:`clear`)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[torch.Tensor, DTensor]] = {}

    def replicated(self, x: torch.Tensor, mesh: DeviceMesh) -> DTensor:
        hit = self._entries.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        dt = DTensor.from_local(x, mesh, (Replicate(),), run_check=False)
        self._entries[id(x)] = (x, dt)
        return dt

    def put(self, x: torch.Tensor, dt: DTensor) -> None:
        """Record that the plain tensor ``x`` is the local value of ``dt`` (sequence
        parallelism: the whole input gathered at a region's entry)."""
        self._entries[id(x)] = (x, dt)

    def clear(self, *_: Any) -> None:
        self._entries.clear()


class _SharedInputColwise(ColwiseParallel):
    """``ColwiseParallel`` whose Linears share one replicated DTensor per input tensor."""

    def __init__(self, cache: _SharedInputCache) -> None:
        super().__init__()
        self._cache = cache

    def _prepare_shared_input(
        self, mod: nn.Module, inputs: Any, device_mesh: DeviceMesh
    ) -> DTensor:
        x = inputs[0]
        return x if isinstance(x, DTensor) else self._cache.replicated(x, device_mesh)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise NotImplementedError(
                f"column-wise TP needs an nn.Linear, got {type(module).__name__}"
            )
        return distribute_module(
            module,
            device_mesh,
            self._partition_linear_fn,
            self._prepare_shared_input,
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


def apply_tp(
    module: nn.Module,
    layer: Layer,
    tp_mesh: DeviceMesh,
    *,
    sp: bool = False,
    recompute: bool = False,
) -> nn.Module:
    """Shard ``module`` (the layer ``layer``) over the 1-D ``tp_mesh``, in place. ``sp``:
    sequence parallelism inside the layer (:mod:`uniap.executor.sequence_parallel`), whose
    boundary checkpoints the layer itself when ``recompute``."""
    tp = tp_mesh.size()
    check_tp_supported(layer, layer.fqn, tp)
    if sp:
        check_sp_supported(layer, layer.fqn, tp)
    if layer.tp_vocab is not None:
        return _apply_vocab_tp(module, layer, tp_mesh)
    cache = _SharedInputCache()
    # the cache lives for one forward of the layer: cleared before and after it
    module.register_forward_pre_hook(cache.clear)
    module.register_forward_hook(cache.clear)
    if sp:
        prepare_sp_regions(module, layer, tp_mesh, cache.put)
    plan: dict[str, ColwiseParallel | RowwiseParallel] = {}
    for pair in layer.tp_pairs:
        for name in pair.colwise:
            plan[name] = _SharedInputColwise(cache)
        plan[pair.rowwise] = (
            RowwiseParallel(output_layouts=Shard(layer.sp_seq_dim), use_local_output=False)
            if sp
            else RowwiseParallel()
        )
    for name in plan:
        sub = module.get_submodule(name)
        if not isinstance(sub, nn.Linear):
            raise PlanMismatchError(
                f"layer {layer.fqn!r}: TP target {name!r} is a {type(sub).__name__}, not an "
                "nn.Linear"
            )
    parallelize_module(module, tp_mesh, plan)
    if sp:
        apply_sp(module, layer, tp_mesh, recompute=recompute, on_exit=cache.clear)
    logger.debug("TP x%d%s on %s: %s", tp, " +SP" if sp else "", layer.fqn, sorted(plan))
    return module


def _apply_vocab_tp(module: nn.Module, layer: Layer, tp_mesh: DeviceMesh) -> nn.Module:
    """Vocabulary-parallel TP of an embedding or head layer (see the module docstring)."""
    vocab = layer.tp_vocab
    assert vocab is not None
    target = module.get_submodule(vocab.module) if vocab.module else module
    want = nn.Embedding if vocab.kind == "embedding" else nn.Linear
    if not isinstance(target, want):
        raise PlanMismatchError(
            f"layer {layer.fqn!r}: vocabulary-parallel target {vocab.module or '(the layer)'!r} "
            f"is a {type(target).__name__}, not an nn.{want.__name__}"
        )
    if vocab.kind == "embedding":
        style: Any = RowwiseParallel(input_layouts=Replicate())
    else:  # logits stay sharded on the vocabulary: the loss runs under loss_parallel()
        style = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(target, tp_mesh, style)
    logger.debug("vocabulary TP x%d on %s (%s)", tp_mesh.size(), layer.fqn, vocab.kind)
    return module
