"""Measured overlap coefficient: how much gradient synchronisation hides behind backward.

Three timings on every rank at once (median of repeats): a backward pass of a representative
layer alone (``compute_s``), an asynchronous all-reduce of its gradients over the world alone
(``comm_s``), and both together: the all-reduce started, the backward run, then waited on
(``both_s``). The exposed share of the communication is ``(both_s - compute_s) / comm_s``,
so the coefficient the cost model uses (``(1 - rho) * sync`` is exposed) is

``rho = 1 - (both_s - compute_s) / comm_s``, clipped to ``[0, 1]``.

It captures both effects of running concurrently: communication hidden behind compute
(``rho`` up) and the two slowing each other down, e.g. on CPU where the communication thread
competes with compute for cores (``rho`` down).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable

import torch
import torch.distributed as dist

from uniap.profiler.compute import time_samples_s

__all__ = ["measure_overlap"]

logger = logging.getLogger(__name__)


def _median_max(
    fn: Callable[[], None], device: torch.device, *, warmup: int, repeats: int
) -> float:
    """Median over repeats of ``fn()``'s time (all ranks start together), slowest rank."""
    samples = time_samples_s(fn, device, warmup=warmup, repeats=repeats, synchronized=True)
    local = torch.tensor([statistics.median(samples)], dtype=torch.float64)
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    return float(local.item())


def measure_overlap(
    compute: Callable[[], None],
    comm_numel: int,
    device: torch.device,
    *,
    warmup: int = 2,
    repeats: int = 5,
) -> dict[str, float]:
    """``{"rho", "raw", "compute_s", "comm_s", "both_s", "comm_numel"}``: the overlap of
    ``compute()`` with an all-reduce of about ``comm_numel`` fp32 elements over the world.

    The estimate divides by ``comm_s``: when the all-reduce is much shorter than the compute
    (a small model's gradients), a few per cent of timing noise in ``both_s`` becomes the
    whole coefficient. So the all-reduce is first resized (by at most 64x either way) to take
    about as long as ``compute()``, then the three timings are taken. Collective."""
    compute_s = _median_max(compute, device, warmup=warmup, repeats=repeats)
    comm_numel = max(int(comm_numel), 1)
    probe = torch.randn(comm_numel, device=device)
    probe_s = _median_max(
        lambda probe=probe: dist.all_reduce(probe), device, warmup=warmup, repeats=repeats
    )
    scale = min(max(compute_s / max(probe_s, 1e-9), 1 / 64), 64.0)
    numel = max(int(comm_numel * scale), 1)
    del probe
    buf = torch.randn(numel, device=device)

    def comm() -> None:
        dist.all_reduce(buf)

    def both() -> None:
        work = dist.all_reduce(buf, async_op=True)
        compute()
        work.wait()

    out: dict[str, float] = {"comm_numel": float(numel)}
    for name, fn in (("compute_s", compute), ("comm_s", comm), ("both_s", both)):
        out[name] = _median_max(fn, device, warmup=warmup, repeats=repeats)
    raw = 1.0 - (out["both_s"] - out["compute_s"]) / max(out["comm_s"], 1e-12)
    out["raw"] = raw
    out["rho"] = min(max(raw, 0.0), 1.0)
    logger.info(
        "overlap: compute %.4f s, comm %.4f s, both %.4f s -> rho %.2f (raw %.2f)",
        out["compute_s"],
        out["comm_s"],
        out["both_s"],
        out["rho"],
        raw,
    )
    return out
