"""Pipeline schedules: one spec per schedule, the one place that says what a schedule is.

Read by the Plan contract (valid names), the CLI (``--schedule`` choices), the cost model
(activations in flight per stage) and the executor (the ``torch.distributed.pipelining``
class). Adding a schedule means adding a spec here and, when torch's class needs adapting,
its class in :mod:`uniap.executor.pipeline_parallel`.

Both schedules run ``c`` micro-batches through ``pp`` stages with one stage per rank, and the
cost model charges them the same time per iteration (see :mod:`uniap.cost_model`):
``sum_i p_i + sum_i o_i + (c - 1) * max_i max(p_i, o_i) + max_i s_i``; with equal stages a
fraction ``(pp - 1) / (c + pp - 1)`` of it is pipeline bubble. They differ in memory: GPipe
runs every forward before any backward, so stage ``i`` holds the activations of all ``c``
micro-batches; 1F1B starts backward as soon as it can, so stage ``i`` holds at most
``min(c, pp - i)``. Without pipelining (``pp == 1``) micro-batches run one after the other
(gradient accumulation): one in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from uniap.errors import ConfigError

__all__ = ["SCHEDULES", "ScheduleSpec", "get_schedule", "inflight_microbatches"]


@dataclass(frozen=True)
class ScheduleSpec:
    """What one pipeline schedule means to the planner and the executor."""

    name: str
    """The name in plans and on the command line."""
    torch_class: str
    """The ``torch.distributed.pipelining`` schedule class the executor runs."""
    stages_per_rank: int
    """Pipeline stages each rank holds (1: one stage per rank)."""
    inflight_on_stage: Callable[[int, int, int], int]
    """``(stage, num_stages, num_microbatches) -> micro-batches`` whose activations stage
    ``stage`` holds at once when ``num_stages > 1``."""
    description: str
    """One line for help texts."""

    def inflight(self, stage: int, num_stages: int, num_microbatches: int) -> int:
        """Micro-batches whose activations ``stage`` holds at once (1 without pipelining)."""
        if num_stages == 1:
            return 1
        return self.inflight_on_stage(stage, num_stages, num_microbatches)

    @staticmethod
    def bubble_fraction(num_stages: int, num_microbatches: int) -> float:
        """Idle fraction of an iteration with equal stages: ``(pp - 1) / (c + pp - 1)``."""
        return (num_stages - 1) / (num_microbatches + num_stages - 1)


def _all_microbatches(stage: int, num_stages: int, num_microbatches: int) -> int:
    return num_microbatches


def _until_first_backward(stage: int, num_stages: int, num_microbatches: int) -> int:
    return min(num_microbatches, num_stages - stage)


SCHEDULES: dict[str, ScheduleSpec] = {
    s.name: s
    for s in (
        ScheduleSpec(
            name="GPipe",
            torch_class="ScheduleGPipe",
            stages_per_rank=1,
            inflight_on_stage=_all_microbatches,
            description="all forwards, then all backwards: every micro-batch in flight",
        ),
        ScheduleSpec(
            name="1F1B",
            torch_class="Schedule1F1B",
            stages_per_rank=1,
            inflight_on_stage=_until_first_backward,
            description="one forward, one backward: stage i holds min(c, pp - i) micro-batches",
        ),
    )
}
"""Every schedule by name, in the order plans list them."""


def get_schedule(name: str) -> ScheduleSpec:
    """The spec of schedule ``name``; an unknown name raises a ConfigError listing them."""
    try:
        return SCHEDULES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"schedule {name!r} is not one of {list(SCHEDULES)}") from None


def inflight_microbatches(schedule: str, stage: int, num_stages: int, num_microbatches: int) -> int:
    """Micro-batches whose activations ``stage`` of ``num_stages`` holds at once under
    ``schedule`` (see the module docstring)."""
    return get_schedule(schedule).inflight(stage, num_stages, num_microbatches)
