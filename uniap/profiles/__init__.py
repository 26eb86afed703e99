"""Profiles: the per-layer and per-collective numbers the cost model turns into costs.

This package is the data the planner reads, apart from the code that measures it
(:mod:`uniap.profiler`, which runs on real ranks): nothing here imports ``torch.distributed``.

:class:`Profile` is the interface; :class:`AnalyticProfile` derives every number from FLOP
counts and the cluster's datasheet constants (no hardware needed); :class:`MeasuredProfile`
holds numbers measured on the real ranks (``uniap profile``,
:func:`uniap.profiler.collect_profile`), saved as YAML and refused when stale; :mod:`.fits`
holds the lines, interpolation and alpha-beta collective fits it is read through.
Correction coefficients fitted from measured steps live beside the planner
(:func:`uniap.calibration.calibrate`).
"""

from uniap.profiles.analytic import COLLECTIVES, AnalyticProfile, Profile
from uniap.profiles.fits import CollectiveFit, fit_line, group_shape_key, interpolate
from uniap.profiles.measured import LayerProfile, MeasuredProfile, hardware_info, library_versions

__all__ = [
    "COLLECTIVES",
    "AnalyticProfile",
    "CollectiveFit",
    "LayerProfile",
    "MeasuredProfile",
    "Profile",
    "fit_line",
    "group_shape_key",
    "hardware_info",
    "interpolate",
    "library_versions",
]
