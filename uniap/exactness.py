"""Exhaustive check of the planner under tight memory: the memory/time trade-off of every
candidate the planner considers, and the planner asked at every memory limit where the
optimum changes.

The optimum as a function of the device memory limit ``m`` is a step function: the fastest
assignment whose per-stage peak is within ``m``, over every ``(pp, c, schedule)``. Its steps
are the points of :func:`uniap.search.frontier` merged over the candidates. :func:`sweep` asks
the planner at each step (where a leaner plan starts to fit) and just below it (where it does
not), and compares with the enumeration: the planner must return a plan of exactly the
optimal time, or :class:`uniap.errors.InfeasibleError` exactly when nothing fits.

Used by ``tests/unit/test_exactness.py`` and ``benchmarks/exactness_sweep.py``; small
instances only (the enumeration is exponential in the number of layers).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from uniap.cluster import Cluster
from uniap.cost_model import CostModel
from uniap.errors import InfeasibleError
from uniap.graph import ModelGraph
from uniap.planner import candidate_tables, plan_graph
from uniap.search import frontier
from uniap.strategies import divisors

__all__ = ["Check", "MLP", "optimum_curve", "small_cluster", "sweep_limits", "sweep"]


class MLP(nn.Module):
    """A residual MLP block ``x + down(gelu(up(x)))``: layers of different widths for the
    sweep's random chains."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.act(self.up(x)))


def small_cluster(
    nodes: int,
    per_node: int = 1,
    *,
    gflops: float = 50,
    intra_gb_s: float = 2,
    inter_gbit_s: float = 1,
) -> Cluster:
    """A CPU cluster of ``nodes x per_node`` devices with 4 GiB each (the sweep sets the limit)."""
    return Cluster.from_dict(
        {
            "name": f"{nodes}x{per_node}",
            "num_nodes": nodes,
            "devices_per_node": per_node,
            "device": {
                "memory": "4 GiB",
                "peak_flops": {"float32": f"{gflops:g} GFLOP/s"},
                "compute_efficiency": 0.5,
                "type": "cpu",
            },
            "intra_node": {"bandwidth": f"{intra_gb_s:g} GB/s", "latency": "50 us"},
            "inter_node": {"bandwidth": f"{inter_gbit_s:g} Gb/s", "latency": "500 us"},
            "backend": "gloo",
        }
    )


_FRACTION = 0.9
"""Memory fraction the sweep plans with (the limit is this share of the device memory)."""


@dataclass(frozen=True)
class Check:
    """The planner against the enumeration at one memory limit."""

    memory_limit_bytes: float
    expected_s: float
    """The exhaustive optimum (``inf`` when nothing fits)."""
    got_s: float
    """The planner's plan's time (``inf`` when it raised :class:`InfeasibleError`)."""
    status: str
    """The planner's ``solver["status"]``, or ``infeasible``."""

    @property
    def ok(self) -> bool:
        if math.isinf(self.expected_s) or math.isinf(self.got_s):
            return self.expected_s == self.got_s
        return (
            abs(self.got_s - self.expected_s) <= 1e-6 * self.expected_s and self.status == "optimal"
        )


def optimum_curve(
    graph: ModelGraph, cluster: Cluster, *, global_batch_size: int, **kwargs
) -> list[tuple[float, float]]:
    """``(peak_bytes, tpi_s)`` steps of the optimum over every candidate the planner considers
    (``kwargs``: ``max_tp``, ``recompute``, ``kinds``, ``sequence_parallel``, ``schedules``,
    ``pp_degrees``, ``num_microbatches``)."""
    cm = CostModel(
        graph,
        cluster,
        memory_fraction=_FRACTION,
        max_tp=kwargs.get("max_tp"),
        recompute=kwargs.get("recompute", True),
        kinds=kwargs.get("kinds"),
        sequence_parallel=kwargs.get("sequence_parallel", False),
    )
    pps = kwargs.get("pp_degrees") or [
        p for p in divisors(cluster.world_size) if p <= graph.num_layers
    ]
    points: list[tuple[float, float]] = []
    for _, _, _, t in candidate_tables(
        cm, pps, global_batch_size, kwargs.get("num_microbatches"), kwargs.get("schedules")
    ):
        points += frontier(t)
    out: list[tuple[float, float]] = []
    for peak, tpi in sorted(points, key=lambda x: (x[0], x[1])):
        if not out or tpi < out[-1][1]:
            out.append((peak, tpi))
    return out


def sweep_limits(curve: Sequence[tuple[float, float]]) -> Iterator[tuple[float, float]]:
    """``(memory limit, expected optimum)``: at every step of the curve and just below it."""
    for j, (peak, tpi) in enumerate(curve):
        below = peak * (1 - 1e-6)
        yield below, (curve[j - 1][1] if j and curve[j - 1][0] <= below else math.inf)
        yield peak, tpi


def sweep(
    graph: ModelGraph,
    cluster: Cluster,
    *,
    global_batch_size: int,
    max_checks: int | None = None,
    **kwargs,
) -> list[Check]:
    """The planner at every limit of :func:`sweep_limits` (at most ``max_checks`` of them, spread
    evenly), each compared with the enumeration."""
    curve = optimum_curve(graph, cluster, global_batch_size=global_batch_size, **kwargs)
    limits = list(sweep_limits(curve))
    if max_checks is not None and len(limits) > max_checks:
        step = len(limits) / max_checks
        limits = [limits[int(j * step)] for j in range(max_checks)]
    out = []
    for limit, _ in limits:
        c = cluster.with_memory(limit / _FRACTION)
        limit_used = c.device_memory_bytes * _FRACTION
        # the expected optimum at the limit the planner really sees (rounding of limit / 0.9 * 0.9)
        fitting = [tpi for peak, tpi in curve if peak <= limit_used * (1 + 1e-9)]
        expected = fitting[-1] if fitting else math.inf
        try:
            p = plan_graph(
                graph, c, global_batch_size=global_batch_size, memory_fraction=_FRACTION, **kwargs
            )
            got, status = p.predicted["time_per_iteration_s"], p.solver["status"]
        except InfeasibleError:
            got, status = math.inf, "infeasible"
        out.append(Check(limit_used, expected, got, status))
    return out
