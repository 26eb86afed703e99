"""Measured pipeline overhead: what a stage spends per micro-batch on the schedule itself.

Every lane of two stages (rank ``r`` of the first half with rank ``r + N/2``) runs the
executor's own schedule (:func:`uniap.executor.pipeline_parallel.build_schedule`, GPipe) over a
stage whose compute is negligible (an elementwise scale of an activation of the model's size
per sample, sent between the stages), once with one micro-batch and once with ``c``. Per extra
micro-batch the schedule spends its bookkeeping, the point-to-point sends and receives of the
activation and its gradient and their waits, so

``pipeline_overhead_s = (T(c) - T(1)) / (c - 1)``

which the cost model adds to every stage's time per micro-batch (``p_i``) when ``pp > 1``.
"""

from __future__ import annotations

import logging
import statistics

import torch
import torch.distributed as dist
from torch import nn

from uniap.profiler.compute import time_samples_s

__all__ = ["measure_pipeline_overhead"]

logger = logging.getLogger(__name__)


class _Scale(nn.Module):
    """``x * w``: a stage with one parameter and next to no compute."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def measure_pipeline_overhead(
    device: torch.device,
    *,
    activation_numel: int = 16,
    num_microbatches: int = 8,
    warmup: int = 2,
    repeats: int = 5,
) -> float:
    """Seconds per micro-batch per stage of the executor's pipeline schedule (see the module
    docstring); 0 on one rank. Collective over the default process group."""
    from uniap.executor.data_parallel import GradSync
    from uniap.executor.pipeline_parallel import build_schedule

    world, rank = dist.get_world_size(), dist.get_rank()
    if world < 2:
        return 0.0
    half = world // 2
    lanes = [[r, r + half] for r in range(half)]
    groups = [dist.new_group(lane) for lane in lanes]
    mine = rank % half if rank < 2 * half else None
    times = []
    for c in (1, num_microbatches):
        elapsed = 0.0
        if mine is not None:
            stage_index = 0 if rank < half else 1
            module = _Scale().to(device)
            sched = build_schedule(
                module,
                stage_index=stage_index,
                num_stages=2,
                device=device,
                lane_group=groups[mine],
                grad_sync=GradSync([]),
                schedule="GPipe",
                num_microbatches=c,
                loss_fn=lambda out, target: out.square().mean(),
            )
            x = torch.randn(c, max(int(activation_numel), 1), device=device)

            def step(sched=sched, x=x, stage_index=stage_index) -> None:
                if stage_index == 0:
                    sched.step(x)
                else:
                    losses: list[torch.Tensor] = []
                    sched.step(target=x, losses=losses, return_outputs=False)

            samples = time_samples_s(
                step, device, warmup=warmup, repeats=repeats, synchronized=True
            )
            elapsed = statistics.median(samples)
        else:  # an odd rank out keeps the barriers company
            for _ in range(warmup + repeats):
                dist.barrier()
        local = torch.tensor([elapsed], dtype=torch.float64)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        times.append(float(local.item()))
    per_microbatch_s = max((times[1] - times[0]) / (num_microbatches - 1), 0.0)
    logger.info(
        "pipeline: T(1) %.4f s, T(%d) %.4f s -> %.1f us per micro-batch",
        times[0],
        num_microbatches,
        times[1],
        per_microbatch_s * 1e6,
    )
    return per_microbatch_s
