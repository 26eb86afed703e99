"""Profiles: the per-layer and per-collective numbers the cost model turns into costs.

:class:`Profile` is the interface; :class:`AnalyticProfile` derives every number from FLOP
counts and the cluster's datasheet constants (no hardware needed). A measured profile plugs
into the same interface.
"""

from uniap.profiler.analytic import AnalyticProfile, Profile

__all__ = ["Profile", "AnalyticProfile"]
