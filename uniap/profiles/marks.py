"""What ``uniap profile`` marks in its output: a measured fit that is noise, a negative fitted
rate that was clamped, an overlap coefficient outside [0, 1], and one line per mark saying
what the planner does with such a number."""

from __future__ import annotations

from uniap.units import fmt_seconds

__all__ = ["NOISE_FIT_ERROR", "measured_rate", "overlap_line", "profile_legend"]

NOISE_FIT_ERROR = 0.2
"""A measured fit whose worst relative residual exceeds this is marked as noise."""

_PROFILE_LEGEND = {
    "noise": (
        f"[noise]: the straight-line fit misses a measurement by more than {NOISE_FIT_ERROR:.0%}. "
        "The planner uses the measured medians at the measured sizes (batch or message; linear "
        "between them) and the fit only beyond the largest, so the fit's error matters only there; "
        "more --repeats or a quieter machine shrink it"
    ),
    "negative": (
        "[negative, clamped]: a fitted rate below zero is noise (the layer is too small to time "
        "at these batches); it is never used below zero: the planner takes the measured times "
        "and, beyond them, the fit floored at 0"
    ),
    "residual": (
        "[negative]: the executor's wrapping measured faster than the modelled collectives; the "
        "planner subtracts it from them, and a term never goes below 0"
    ),
    "optimizer": (
        "[slope <= 0, clamped]: the optimizer fit had no positive per-parameter cost (noise); "
        "the planner uses the largest measured time per parameter instead"
    ),
}


def measured_rate(what: str, slope_s: float, fit_error: float, marks: set[str]) -> str:
    """``fwd 0.123 ms/sample (fit err 5%)`` with ``[noise]`` / ``[negative, clamped]`` marks
    (added to ``marks``; :func:`profile_legend` says what each means)."""
    text = f"{what} {fmt_seconds(slope_s)}/sample"
    if slope_s < 0:
        text = f"{what} {fmt_seconds(slope_s)}/sample [negative, clamped]"
        marks.add("negative")
    text += f" (fit err {fit_error:.0%})"
    if fit_error > NOISE_FIT_ERROR:
        text += " [noise]"
        marks.add("noise")
    return text


def overlap_line(rho: float, raw: float) -> str:
    """The overlap coefficient, saying when the measurement fell outside [0, 1] and was clamped,
    and what the planner assumes then."""
    text = f"overlap coefficient {rho:.2f}"
    if abs(raw - rho) > 1e-12:
        assumes = (
            "no overlap: the whole gradient sync is exposed"
            if rho == 0
            else "the sync fully hidden"
        )
        text += (
            f" (measured {raw:.2f}, outside [0, 1]: noise, clamped to {rho:.2f}; the planner "
            f"assumes {assumes})"
        )
    return text


def profile_legend(marks: set[str]) -> list[str]:
    """One line per mark used, in a fixed order."""
    return [
        _PROFILE_LEGEND[m] for m in ("noise", "negative", "residual", "optimizer") if m in marks
    ]
