"""Closing the loop: fit a measured profile's correction coefficients to measured steps.

Given a few measured iterations (a plan, its measured time per iteration), :func:`calibrate`
returns a copy of the profile whose ``calibration`` minimises the squared log error of the
cost model's prediction over those plans,

``min sum_j log(TPI_pred(plan_j; theta) / TPI_meas_j) ** 2``

over ``theta = (compute_scale, comm_scale, layer_overhead_s)``: every layer's measured compute
is multiplied by ``compute_scale`` and pays ``layer_overhead_s`` per micro-batch (forward +
backward: the executor's per-layer hooks, which a layer timed alone does not see); every
collective is multiplied by ``comm_scale``. ``TPI_pred`` is :meth:`CostModel.evaluate`, so a
re-plan with the calibrated profile uses exactly what was fitted. The search is a pattern
search (coordinate steps, halved when nothing improves): three coefficients, deterministic,
no dependency beyond numpy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from uniap.cluster import Cluster
from uniap.contract import Plan
from uniap.errors import ConfigError
from uniap.graph import ModelGraph
from uniap.profiles.measured import MeasuredProfile

__all__ = ["Measurement", "calibrate", "prediction_errors"]

logger = logging.getLogger(__name__)

_COEFFICIENTS = ("compute_scale", "comm_scale", "layer_overhead_s")


@dataclass(frozen=True)
class Measurement:
    """One measured plan: what ran, how long an iteration took, how much memory it used."""

    plan: Plan
    """The plan that ran."""
    time_per_iteration_s: float
    """Median measured seconds per iteration (forward, backward, optimizer step)."""
    peak_memory_bytes: tuple[float, ...] = ()
    """Measured peak bytes per stage (max over the stage's ranks), when measured."""


def prediction_errors(
    profile: MeasuredProfile | None,
    measurements: Sequence[Measurement],
    *,
    graph: ModelGraph,
    cluster: Cluster,
) -> list[float]:
    """Relative TPI errors ``(predicted - measured) / measured``, one per measurement."""
    from uniap.cost_model import CostModel

    cm = CostModel(graph, cluster, profile)
    return [
        cm.evaluate(m.plan).time_per_iteration_s / m.time_per_iteration_s - 1.0
        for m in measurements
    ]


def _loss(
    profile: MeasuredProfile, ms: Sequence[Measurement], graph: ModelGraph, cluster: Cluster
) -> float:
    errs = prediction_errors(profile, ms, graph=graph, cluster=cluster)
    return sum(math.log(max(1.0 + e, 1e-9)) ** 2 for e in errs)


def calibrate(
    profile: MeasuredProfile,
    measurements: Sequence[Measurement],
    *,
    graph: ModelGraph,
    cluster: Cluster,
    coefficients: Sequence[str] = _COEFFICIENTS,
    max_iterations: int = 200,
) -> MeasuredProfile:
    """A copy of ``profile`` with ``coefficients`` fitted to ``measurements`` (see the module
    docstring). Needs at least one measurement; more plans than coefficients is advisable."""
    if not measurements:
        raise ConfigError("calibrate needs at least one measured plan")
    bad = sorted(set(coefficients) - set(_COEFFICIENTS))
    if bad:
        raise ConfigError(f"unknown calibration coefficient(s) {bad}; use {list(_COEFFICIENTS)}")
    names = list(coefficients)
    x = {n: float(profile.calibration.get(n, 1.0 if n.endswith("scale") else 0.0)) for n in names}
    fastest = min(m.time_per_iteration_s for m in measurements)
    num_layers = graph.num_layers
    # steps: 20 % for scales; for the overhead, 5 % of the fastest step spread over its layers
    step = {n: (0.2 if n.endswith("scale") else 0.05 * fastest / num_layers) for n in names}

    def loss_at(v: dict[str, float]) -> float:
        return _loss(profile.with_calibration(**v), measurements, graph, cluster)

    best = loss_at(x)
    start = best
    for _ in range(max_iterations):
        improved = False
        for n in names:
            for sign in (1, -1):
                trial = dict(x)
                if n.endswith("scale"):
                    trial[n] = x[n] * (1 + sign * step[n])
                else:
                    trial[n] = max(x[n] + sign * step[n], 0.0)
                if trial[n] == x[n]:
                    continue
                val = loss_at(trial)
                if val < best - 1e-12:
                    x, best, improved = trial, val, True
                    break
        if not improved:
            step = {n: s / 2 for n, s in step.items()}
            if all(s < 1e-3 for n, s in step.items() if n.endswith("scale")):
                break
    logger.info(
        "calibrated %s on %d plans: loss %.4g -> %.4g",
        ", ".join(f"{n}={v:.4g}" for n, v in x.items()),
        len(measurements),
        start,
        best,
    )
    return profile.with_calibration(**x)
