"""Profiles: the per-layer and per-collective numbers the cost model turns into costs.

:class:`Profile` is the interface; :class:`AnalyticProfile` derives every number from FLOP
counts and the cluster's datasheet constants (no hardware needed); :class:`MeasuredProfile`
holds numbers measured on the real ranks (``uniap profile``, :func:`collect_profile`), saved
as YAML and refused when stale; :func:`calibrate` fits correction coefficients from measured
steps so that a re-plan uses them.
"""

from uniap.profiler.analytic import AnalyticProfile, Profile
from uniap.profiler.calibrate import Measurement, calibrate, prediction_errors
from uniap.profiler.measured import MeasuredProfile


def __getattr__(name: str):
    # collect_profile needs torch.distributed at run time; keep the planner's import light
    if name == "collect_profile":
        from uniap.profiler.collect import collect_profile

        return collect_profile
    raise AttributeError(f"module 'uniap.profiler' has no attribute {name!r}")


__all__ = [
    "AnalyticProfile",
    "Measurement",
    "MeasuredProfile",
    "Profile",
    "calibrate",
    "collect_profile",
    "prediction_errors",
]
