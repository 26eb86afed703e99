"""Measured communication: alpha-beta fits per collective and group shape.

For every group shape the planner uses on a world of ``N`` ranks, and every collective
(``all_reduce``, ``all_gather``, ``reduce_scatter``, ``p2p``), the time of one call is
measured at several message sizes and fitted as

``t(S) = alpha_s + S / bandwidth_bytes_per_s``  (``S`` = bytes of the full tensor: the
all-reduced tensor, the gathered output, the reduce-scatter input, the message sent)

by least squares weighted by ``1 / t`` (relative error); the worst relative residual is kept
as ``fit_error``. Each point is the interquartile mean of at least :data:`MIN_REPEATS` calls
(slowest rank per call), and the points are made non-decreasing in the size. Predictions interpolate
the measured points themselves (:meth:`CollectiveFit.time_s`); the fit reports the link and
extrapolates. Shapes are keyed ``n{size}-{intra|inter}-{consecutive|strided}``: TP groups are
consecutive ranks, DP groups strided, and a group is intra-node when all its ranks share a node. All
groups of one shape run concurrently (as in a real step, where every TP or DP group of the world
communicates at once); ``p2p`` is a ping-pong between rank pairs at one distance (half the round
trip), all pairs at once.

Sizes (:func:`collective_sizes`): 4 KiB to 4 MiB, then x8 steps up to the largest message a
candidate plan moves (a layer's parameters, an activation at the global batch), capped by the
memory free on the rank, so FSDP's and DDP's hundreds-of-MB messages are measured.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from uniap.profiler.compute import time_samples_s
from uniap.profiles.fits import CollectiveFit, fit_line, group_shape_key

__all__ = ["measure_collectives", "planner_group_shapes"]

logger = logging.getLogger(__name__)

DEFAULT_SIZES_BYTES = (2**12, 2**15, 2**18, 2**20, 2**22)


def planner_group_shapes(world_size: int) -> dict[str, list[list[list[int]]]]:
    """Per kind (``collective`` / ``p2p``), the partitions of the world into groups that the
    planner's group shapes need: consecutive blocks and strided groups of every size, and
    rank pairs at every stage distance."""
    from uniap.strategies import divisors

    n = world_size
    out: dict[str, list[list[list[int]]]] = {"collective": [], "p2p": []}
    for size in divisors(n):
        if size == 1:
            continue
        out["collective"].append([list(range(s, s + size)) for s in range(0, n, size)])
        if size < n:
            stride = n // size
            out["collective"].append([[q + m * stride for m in range(size)] for q in range(stride)])
    for dist_ in sorted({n // pp for pp in divisors(n) if pp > 1}):
        pairs = [[r, r + dist_] for r in range(n) if (r // dist_) % 2 == 0 and r + dist_ < n]
        out["p2p"].append(pairs)
    return out


MIN_REPEATS = 21
"""Calls timed per collective and size at least: one call's time is heavy-tailed (a rank
descheduled for a time slice makes every rank of the group wait), so few samples give
estimates that differ several-fold between runs."""


def _typical_s(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Time of one call of ``fn`` as a training step sees it: every rank times the same calls
    (after a barrier), the slowest rank of each call counts, and the estimate is the mean of
    the middle half of those (robust to the rare stall, unlike the mean; unlike the median,
    it keeps the frequent small delays that a step of many collectives accumulates)."""
    samples = time_samples_s(
        fn, device, warmup=warmup, repeats=max(repeats, MIN_REPEATS), synchronized=True
    )
    slowest = torch.tensor(samples, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return interquartile_mean(slowest.tolist())


def interquartile_mean(values: Sequence[float]) -> float:
    """Mean of the middle half of ``values`` (all of them when fewer than 4)."""
    v = sorted(values)
    if len(v) < 4:
        return statistics.fmean(v)
    q = len(v) // 4
    return statistics.fmean(v[q : len(v) - q])


def _monotone(times: Sequence[float]) -> list[float]:
    """Times over increasing sizes made non-decreasing (a larger message never takes less
    time): each point is capped by every larger size's time."""
    out = list(times)
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1])
    return out


def collective_sizes(largest_bytes: float, free_bytes: float) -> tuple[int, ...]:
    """Message sizes to time: :data:`DEFAULT_SIZES_BYTES`, then x8 steps up to the largest
    message a candidate plan moves (``largest_bytes``: a layer's parameters all-gathered or
    all-reduced, an activation sent between stages), so the fit is measured, not
    extrapolated, where the plans live. Capped at an eighth of ``free_bytes`` (each timed
    call holds a full buffer and a shard of it)."""
    cap = max(DEFAULT_SIZES_BYTES[-1], int(free_bytes // 8))
    sizes = list(DEFAULT_SIZES_BYTES)
    while sizes[-1] * 8 < largest_bytes and sizes[-1] * 8 <= cap:
        sizes.append(sizes[-1] * 8)
    if sizes[-1] < min(largest_bytes, cap):
        sizes.append(int(min(largest_bytes, cap)))
    return tuple(sizes)


def free_memory_bytes(device: torch.device) -> float:
    """Memory this rank may use for collective buffers: the free device memory on CUDA, the
    host's available memory shared by its local ranks on CPU."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 2**30
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    return float(available) / max(local, 1)


def measure_collectives(
    devices_per_node: int,
    device: torch.device,
    *,
    sizes_bytes: Sequence[int] = DEFAULT_SIZES_BYTES,
    warmup: int = 2,
    repeats: int = 5,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, CollectiveFit]]:
    """``{op: {shape_key: CollectiveFit}}`` for every planner group shape. Collective over
    the default process group (every rank calls it)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    shapes = planner_group_shapes(world)
    fits: dict[str, dict[str, CollectiveFit]] = {}
    for partition in shapes["collective"]:
        groups = [dist.new_group(g) for g in partition]
        mine = next(i for i, g in enumerate(partition) if rank in g)
        group, size = groups[mine], len(partition[mine])
        key = group_shape_key(partition[0], devices_per_node)
        for op in ("all_reduce", "all_gather", "reduce_scatter"):
            times = []
            for nbytes in sizes_bytes:
                numel = max(nbytes // 4 // size * size, size)
                full = torch.randn(numel, device=device)
                shard = torch.randn(numel // size, device=device)
                if op == "all_reduce":

                    def fn(full: torch.Tensor = full, group=group) -> None:
                        dist.all_reduce(full, group=group)
                elif op == "all_gather":

                    def fn(full: torch.Tensor = full, shard=shard, group=group) -> None:
                        dist.all_gather_single(full, shard, group=group)
                else:

                    def fn(full: torch.Tensor = full, shard=shard, group=group) -> None:
                        dist.reduce_scatter_single(shard, full, group=group)

                times.append(_typical_s(fn, device, warmup, repeats))
            fits.setdefault(op, {})[key] = _fit(sizes_bytes, _monotone(times))
        if progress is not None:
            progress(f"collectives on {key}: " + _describe(fits, key))
    for pairs in shapes["p2p"]:
        key = group_shape_key(pairs[0], devices_per_node)
        times = []
        for nbytes in sizes_bytes:
            buf = torch.randn(max(nbytes // 4, 1), device=device)
            peer, first = _peer(pairs, rank)

            def ping(buf: torch.Tensor = buf, peer=peer, first=first) -> None:
                if peer is None:
                    return
                if first:
                    dist.send(buf, peer)
                    dist.recv(buf, peer)
                else:
                    dist.recv(buf, peer)
                    dist.send(buf, peer)

            times.append(_typical_s(ping, device, warmup, repeats) / 2)
        fits.setdefault("p2p", {})[key] = _fit(sizes_bytes, _monotone(times))
        if progress is not None:
            progress(f"p2p on {key}: {_describe(fits, key, ('p2p',))}")
    return fits


def _peer(pairs: list[list[int]], rank: int) -> tuple[int | None, bool]:
    for a, b in pairs:
        if rank == a:
            return b, True
        if rank == b:
            return a, False
    return None, False


def _fit(sizes: Sequence[int], times: Sequence[float]) -> CollectiveFit:
    alpha, slope, err = fit_line([float(s) for s in sizes], times)
    if slope <= 0:  # latency-bound everywhere: take the largest message's rate
        slope = times[-1] / sizes[-1]
        alpha = 0.0
    return CollectiveFit(
        max(alpha, 0.0), 1.0 / slope, err, [int(s) for s in sizes], [float(t) for t in times]
    )


def _describe(
    fits: dict[str, dict[str, CollectiveFit]], key: str, ops: Sequence[str] | None = None
) -> str:
    parts = []
    for op in ops or ("all_reduce", "all_gather", "reduce_scatter"):
        f = fits[op][key]
        parts.append(f"{op} {f.alpha_s * 1e6:.0f} us + {f.bandwidth_bytes_per_s / 1e9:.2f} GB/s")
    return ", ".join(parts)
