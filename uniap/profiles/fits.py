"""The fits a measured profile is read through: lines, piecewise-linear interpolation, and the
alpha-beta model of one collective on one group shape.

Measuring (:mod:`uniap.profiler`) produces the points; these functions turn points into the
numbers the cost model asks for. They are pure arithmetic: no torch, no process group.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["CollectiveFit", "fit_line", "group_shape_key", "interpolate"]


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares ``y = a + slope * x`` weighted by ``1 / y`` (relative error), returning
    ``(a, slope, worst relative residual)``; one point gives ``(0, y / x, 0)``."""
    if len(xs) == 1:
        return 0.0, ys[0] / xs[0] if xs[0] else 0.0, 0.0
    w = [1.0 / max(y, 1e-12) for y in ys]
    sw = sum(w)
    sx = sum(wi * x for wi, x in zip(w, xs))
    sy = sum(wi * y for wi, y in zip(w, ys))
    sxx = sum(wi * x * x for wi, x in zip(w, xs))
    sxy = sum(wi * x * y for wi, x, y in zip(w, xs, ys))
    den = sw * sxx - sx * sx
    slope = (sw * sxy - sx * sy) / den if den else 0.0
    a = (sy - slope * sx) / sw
    err = max(abs(a + slope * x - y) / max(y, 1e-12) for x, y in zip(xs, ys))
    return a, slope, err


def interpolate(x: float, xs: Sequence[float], ys: Sequence[float], fit: Sequence[float]) -> float:
    """Piecewise-linear through the measured ``(xs, ys)`` (sorted by ``xs``); outside them
    the fitted line ``fit = (a, slope)``; never below zero."""
    if xs and xs[0] <= x <= xs[-1]:
        for i in range(len(xs) - 1):
            if xs[i] <= x <= xs[i + 1]:
                w = (x - xs[i]) / (xs[i + 1] - xs[i])
                return ys[i] + w * (ys[i + 1] - ys[i])
        return ys[0]
    return max(fit[0] + fit[1] * x, 0.0)


@dataclass
class CollectiveFit:
    """``t(S) = alpha_s + S / bandwidth_bytes_per_s`` for one collective on one group shape."""

    alpha_s: float
    """Latency: seconds of a zero-byte call."""
    bandwidth_bytes_per_s: float
    """Effective bandwidth for the full tensor size ``S``."""
    fit_error: float = 0.0
    """Worst relative residual of the fit over the measured sizes."""
    sizes_bytes: list[int] = field(default_factory=list)
    """Message sizes measured."""
    times_s: list[float] = field(default_factory=list)
    """Median seconds at each size (slowest rank)."""

    def time_s(self, nbytes: float) -> float:
        """Seconds for a tensor of ``nbytes``: piecewise-linear through the measured sizes
        (the alpha-beta line misses real collectives, whose algorithm changes with the size,
        by up to the ``fit_error``); below them the smallest size's time (latency-bound);
        above them the largest size's time plus the extra bytes at the fitted bandwidth.
        Without measured points: the alpha-beta line."""
        xs, ys = self.sizes_bytes, self.times_s
        if not xs or len(xs) != len(ys):
            return self.alpha_s + nbytes / self.bandwidth_bytes_per_s
        if nbytes <= xs[0]:
            return ys[0]
        if nbytes >= xs[-1]:
            return ys[-1] + (nbytes - xs[-1]) / self.bandwidth_bytes_per_s
        i = bisect.bisect_right(xs, nbytes) - 1
        w = (nbytes - xs[i]) / (xs[i + 1] - xs[i])
        return ys[i] + w * (ys[i + 1] - ys[i])


def group_shape_key(ranks: Sequence[int], devices_per_node: int) -> str:
    """``n{size}-{intra|inter}-{consecutive|strided}`` of a rank group."""
    rs = sorted(ranks)
    nodes = {r // devices_per_node for r in rs}
    place = "intra" if len(nodes) <= 1 else "inter"
    contiguous = all(b - a == 1 for a, b in zip(rs, rs[1:]))
    return f"n{len(rs)}-{place}-{'consecutive' if contiguous else 'strided'}"
