"""Moving an activation between the batch layouts of two layers.

A layer with strategy ``(dp, tp)`` sees the micro-batch (``b`` samples) split into ``dp``
shards along dim 0; the rank at local index ``l`` holds shard ``l // tp``, replicated across
its TP group. Between consecutive layers with different ``dp`` the activation is resharded
(the cost model's ``R[u, k, k']``, forward and backward):

* ``dp`` decreases by ``k``: **all-gather** of dim 0 over the gather group (``k`` ranks), the
  backward **slices** the gradient (no communication);
* ``dp`` increases by ``k``: **slice** of dim 0 (no communication), the backward
  **all-gathers** the gradient over the gather group;
* neither divides the other: all-gather to ``gcd`` then slice;
* equal ``dp``: nothing, even if ``tp`` differs (the data is already where it is needed).

Every tensor a layer returns is taken to be batch-first; non-tensors pass through. The
gradient of a TP-replicated activation is itself replicated (TP layers all-reduce their input
gradient), which is why the backward of a gather may simply keep its own slice. A DTensor
(the logits of a vocabulary-parallel head, sharded on their last dim) is resharded as its
local shard: its batch dim is not sharded over the TP mesh.

This module also slices a *global* batch into the rank's part for a layout (input of the first
layer, targets of the last one): micro-batch ``m`` is rows ``[m b, (m + 1) b)``, its shard ``j``
is ``b / dp`` rows of it; the rank's local batch is its shard of every micro-batch, in order,
so ``torch.tensor_split``/the pipeline schedule's chunking yields micro-batch ``m``'s shard.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from uniap._torch_utils import map_tensors
from uniap.executor.mesh import GatherStep, ProcessGroups, RankLayout, SliceStep, reshard_steps

__all__ = [
    "BatchReshard",
    "gather_batch",
    "map_tensors",
    "microbatches",
    "slice_batch",
    "slice_global_batch",
]


class _GatherBatch(torch.autograd.Function):
    """Forward: all-gather dim 0 over ``group``. Backward: keep this rank's slice."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, group: dist.ProcessGroup, size: int, index: int
    ) -> torch.Tensor:
        ctx.size, ctx.index = size, index
        x = x.contiguous()
        out = x.new_empty((size * x.shape[0], *x.shape[1:]))
        dist.all_gather_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        n = grad.shape[0] // ctx.size
        return grad.narrow(0, ctx.index * n, n).contiguous(), None, None, None


class _SliceBatch(torch.autograd.Function):
    """Forward: keep piece ``index`` of ``size`` of dim 0. Backward: all-gather the gradient."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, group: dist.ProcessGroup, size: int, index: int
    ) -> torch.Tensor:
        ctx.group, ctx.size = group, size
        if x.shape[0] % size:
            raise ValueError(f"batch dim {x.shape[0]} does not split into {size} shards")
        n = x.shape[0] // size
        return x.narrow(0, index * n, n).clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        grad = grad.contiguous()
        out = grad.new_empty((ctx.size * grad.shape[0], *grad.shape[1:]))
        dist.all_gather_single(out, grad, group=ctx.group)
        return out, None, None, None


def gather_batch(x: torch.Tensor, group: dist.ProcessGroup, size: int, index: int) -> torch.Tensor:
    """Autograd-aware all-gather of dim 0 (backward: slice ``index``)."""
    if not x.is_floating_point() and not x.is_complex():
        out = x.new_empty((size * x.shape[0], *x.shape[1:]))
        dist.all_gather_single(out, x.contiguous(), group=group)
        return out
    return _GatherBatch.apply(x, group, size, index)


def slice_batch(x: torch.Tensor, group: dist.ProcessGroup, size: int, index: int) -> torch.Tensor:
    """Autograd-aware slice of dim 0 (backward: all-gather over ``group``)."""
    if not x.is_floating_point() and not x.is_complex():
        n = x.shape[0] // size
        return x.narrow(0, index * n, n).clone()
    return _SliceBatch.apply(x, group, size, index)


class BatchReshard(nn.Module):
    """Reshard every batch-first tensor of a value from layout ``src`` to ``dst`` (``(dp, tp)``
    each) on this rank's stage. Has no parameters; an identity when the dp degrees agree."""

    def __init__(self, groups: ProcessGroups, src: tuple[int, int], dst: tuple[int, int]) -> None:
        super().__init__()
        self.src, self.dst = src, dst
        layout: RankLayout = groups.layout
        rank = groups.rank
        self._ops: list[tuple[str, dist.ProcessGroup, int, int]] = []
        for step in reshard_steps(layout.stage_size, src, dst):
            group = groups.gather_group(step.tp_small, step.tp_big)
            size = step.tp_big // step.tp_small
            index = layout.gather_index(rank, step.tp_small, step.tp_big)
            kind = "gather" if isinstance(step, GatherStep) else "slice"
            assert isinstance(step, GatherStep | SliceStep)
            self._ops.append((kind, group, size, index))

    @property
    def is_identity(self) -> bool:
        """True when no data moves."""
        return not self._ops

    def extra_repr(self) -> str:
        return f"src={self.src}, dst={self.dst}, ops={[op[0] for op in self._ops]}"

    def forward(self, value: Any) -> Any:
        for kind, group, size, index in self._ops:
            fn = gather_batch if kind == "gather" else slice_batch

            def apply(
                t: torch.Tensor,
                fn: Any = fn,
                group: Any = group,
                size: int = size,
                index: int = index,
            ) -> torch.Tensor:
                if isinstance(t, DTensor):  # vocabulary-sharded logits: batch dim whole
                    assert not any(p.is_shard(0) for p in t.placements), t.placements
                    local = fn(t.to_local(), group, size, index)
                    return DTensor.from_local(local, t.device_mesh, t.placements, run_check=False)
                return fn(t, group, size, index)

            value = map_tensors(apply, value)
        return value


def slice_global_batch(value: Any, *, num_microbatches: int, dp: int, dp_index: int) -> Any:
    """This rank's part of a global batch (every batch-first tensor in ``value``) for a layout
    with ``dp`` shards: shard ``dp_index`` of each of the ``num_microbatches`` micro-batches,
    concatenated in micro-batch order."""

    def take(t: torch.Tensor) -> torch.Tensor:
        batch = t.shape[0]
        if batch % (num_microbatches * dp):
            raise ValueError(
                f"batch of {batch} samples does not split into {num_microbatches} micro-batches "
                f"x {dp} data-parallel shards; use a multiple of {num_microbatches * dp}"
            )
        b = batch // num_microbatches
        s = b // dp
        t = t.reshape(num_microbatches, b, *t.shape[1:])[:, dp_index * s : (dp_index + 1) * s]
        return t.reshape(num_microbatches * s, *t.shape[2:]).contiguous()

    return map_tensors(take, value)


def microbatches(
    value: Any, *, batch_size: int, num_microbatches: int, dp: int, dp_index: int
) -> list[Any]:
    """This rank's part of every micro-batch of a global batch ``value`` (a nested tuple, list
    or dict of inputs): micro-batch ``m`` holds, of every tensor whose dim 0 is the global
    ``batch_size``, shard ``dp_index`` of ``dp`` of rows ``[m b, (m + 1) b)``; every other
    value (a tensor without that batch dim, a flag, None) is passed to each micro-batch as is."""
    c = num_microbatches
    if batch_size % (c * dp):
        raise ValueError(
            f"batch of {batch_size} samples does not split into {c} micro-batches "
            f"x {dp} data-parallel shards; use a multiple of {c * dp}"
        )
    s = batch_size // c // dp
    out = []
    for m in range(c):
        start = m * (batch_size // c) + dp_index * s

        def take(t: torch.Tensor, start: int = start) -> torch.Tensor:
            if t.dim() == 0 or t.shape[0] != batch_size:
                return t
            return t.narrow(0, start, s)

        out.append(map_tensors(take, value))
    return out
