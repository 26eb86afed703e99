"""Pipeline parallelism with ``torch.distributed.pipelining``, one pipeline per lane.

The rank at local index ``l`` of stage ``i`` builds a ``PipelineStage`` for stage ``i`` whose
process group is its *lane* ``{l + j g : j < pp}`` (group rank ``j`` = stage ``j``), and runs
the torch schedule class that the plan's schedule names in :mod:`uniap.schedules`
(``ScheduleGPipe``, ``Schedule1F1B``, ``ScheduleInterleaved1F1B``) with the plan's ``c``
micro-batches. With an interleaved schedule the rank builds one ``PipelineStage`` per stage
it holds (stages ``i, i + pp, ...``), each with its own module, DP wrapping and gradient
switches, all in one schedule. Each lane sends its
local activation shard in the layout of stage ``i``'s last layer (``b / dp_last`` samples per
micro-batch); stage ``i + 1`` reshards it to its first layer's layout inside its
:class:`~uniap.executor.stage_module.StageModule`.

Communication per iteration and lane, for the edge leaving stage ``i``: ``c`` sends of the
activation shard forward and ``c`` sends of its gradient backward (point-to-point).

Data-parallel synchronisation is driven per micro-batch by :class:`GradSync`: the stage's
``backward_maybe_with_nosync`` is where the last micro-batch's backward turns gradient
reduction on. When the stage has classic DDP layers the stage's module is the DDP
wrapper, and torch's stage runs every forward and all but the last backward under
``no_sync`` itself. A stage whose module is an FSDP2 root
(:func:`~uniap.executor.data_parallel.apply_fsdp_root`) is handed to torch's stage inside a plain
wrapper (:class:`_PlainStage`): torch's own FSDP path would turn gradient reduction off for every
micro-batch and reduce-scatter after the last backward has finished, while :class:`GradSync` reduces
during the last backward, hidden behind it (what the cost model charges). Gradients are never scaled
by the schedule (``scale_grads=False``): the loss is already scaled to the global-batch mean.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.pipelining.schedules import PipelineScheduleSingle

from uniap.executor.data_parallel import GradSync
from uniap.schedules import get_schedule

__all__ = ["build_schedule"]

logger = logging.getLogger(__name__)


class _PresplitInputs:
    """Schedule mixin: micro-batches split by the caller (``presplit``: one tuple of stage-0
    positional inputs per micro-batch), for inputs that are not all batch-first (a traced
    model's root inputs: masks broadcast over the batch, position tables); ``raw_outputs``
    returns the last stage's per-micro-batch outputs unmerged."""

    presplit: list[tuple[Any, ...]] | None = None
    raw_outputs: bool = False

    def _split_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Any:
        if self.presplit is None:
            return super()._split_inputs(args, kwargs)  # type: ignore[misc]
        return list(self.presplit), [{} for _ in self.presplit]

    def _merge_outputs(self, output_chunks: list[Any]) -> Any:
        if self.raw_outputs:
            return list(output_chunks)
        return super()._merge_outputs(output_chunks)  # type: ignore[misc]


class _GPipe(_PresplitInputs, ScheduleGPipe):
    """torch's GPipe, with caller-split inputs."""


class _Schedule1F1BAnyCount(_PresplitInputs, Schedule1F1B):
    """torch's 1F1B without its ``n_microbatches >= num_stages`` requirement.

    With ``c < pp`` the same loop runs ``min(c, pp - i)`` warm-up forwards on stage ``i`` (so
    stage ``i`` keeps at most ``min(c, pp - i)`` micro-batches of activations, what the cost
    model charges), then alternates backward/forward and drains; on stage 0 it degenerates to
    GPipe's all-forward-then-all-backward. Checked for deadlock-freedom and parity by the
    distributed tests (pp 2 and 4 with c = 1, 2).
    """

    def __init__(self, stage: Any, n_microbatches: int, **kwargs: Any) -> None:
        PipelineScheduleSingle.__init__(self, stage, n_microbatches, **kwargs)


class _PlainStage(nn.Module):
    """Runs an FSDP2-root stage module as an ordinary module (see the module docstring)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


class _Interleaved1F1B(_PresplitInputs, ScheduleInterleaved1F1B):
    """torch's interleaved 1F1B (several stages per rank), with caller-split inputs."""


class _InterleavedZeroBubble(_PresplitInputs, ScheduleInterleavedZeroBubble):
    """torch's interleaved zero bubble (input and weight gradients apart), with caller-split
    inputs."""


_TORCH_CLASSES = {
    "ScheduleGPipe": _GPipe,
    "Schedule1F1B": _Schedule1F1BAnyCount,
    "ScheduleInterleaved1F1B": _Interleaved1F1B,
    "ScheduleInterleavedZeroBubble": _InterleavedZeroBubble,
}
"""The class run for each ``ScheduleSpec.torch_class`` (torch's, or adapted above)."""


class _StageWithGradSync(PipelineStage):
    """A ``PipelineStage`` that switches the layers' DP gradient sync per micro-batch."""

    def __init__(self, *args: Any, grad_sync: GradSync, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._grad_sync = grad_sync

    # torch's metadata inference runs a real forward with grad enabled on the first step; under
    # a DDP wrapper that forward would arm the reducer for a backward that never comes (and
    # the next micro-batch's hooks would then be recorded twice), so it runs under no_sync.
    def _forward_metadata_inference(self, *args: Any, **kwargs: Any) -> Any:
        with self._grad_sync.microbatch(last=False):
            return super()._forward_metadata_inference(*args, **kwargs)

    # torch materialises metadata as uninitialised tensors for that forward; a traced stage's
    # integer inputs (token ids, labels) index tables, so they are zeros instead
    def _to_tensor(self, arg: Any) -> torch.Tensor:
        t = super()._to_tensor(arg)
        if not isinstance(arg, torch.Tensor) and type(t) is torch.Tensor:
            with torch.no_grad():
                t.zero_()
        return t

    def _backward_metadata_inference(self, *args: Any, **kwargs: Any) -> Any:
        with self._grad_sync.microbatch(last=False):
            return super()._backward_metadata_inference(*args, **kwargs)

    def backward_maybe_with_nosync(
        self, backward_type: Any, bwd_kwargs: dict, last_backward: bool = False
    ) -> Any:
        self._grad_sync.before_backward(last=last_backward)
        return super().backward_maybe_with_nosync(
            backward_type, bwd_kwargs, last_backward=last_backward
        )


def build_schedule(
    module: nn.Module | list[nn.Module],
    *,
    stage_index: int | list[int],
    num_stages: int,
    device: torch.device,
    lane_group: dist.ProcessGroup,
    grad_sync: GradSync | list[GradSync],
    schedule: str,
    num_microbatches: int,
    loss_fn: Callable[[Any, Any], torch.Tensor],
) -> Any:
    """The pipeline schedule that runs ``module`` as stage ``stage_index`` of this lane; with
    an interleaved schedule, lists of the rank's stage modules, stage indices (stage ``j`` on
    lane rank ``j % pp``) and their gradient switches, one ``PipelineStage`` each."""
    spec = get_schedule(schedule)
    modules = module if isinstance(module, list) else [module]
    indices = stage_index if isinstance(stage_index, list) else [stage_index]
    syncs = grad_sync if isinstance(grad_sync, list) else [grad_sync]
    # a split backward leaves an FSDP2 root to torch, which turns gradient sync and resharding
    # off in every backward and reduce-scatters after the stage's last weight gradient
    # (REDUCE_GRAD); per micro-batch switches would reduce before the weight gradients exist
    stages = [
        _StageWithGradSync(
            _PlainStage(m) if isinstance(m, FSDPModule) and not spec.split_backward else m,
            j,
            num_stages,
            device,
            group=lane_group,
            grad_sync=gs,
        )
        for m, j, gs in zip(modules, indices, syncs, strict=True)
    ]
    sched = _TORCH_CLASSES[spec.torch_class](
        stages if spec.interleaved else stages[0],
        n_microbatches=num_microbatches,
        loss_fn=loss_fn,
        scale_grads=False,
    )
    logger.info(
        "pipeline stage(s) %s/%d: %s with %d micro-batches",
        indices,
        num_stages,
        schedule,
        num_microbatches,
    )
    return sched
