"""Measuring a profile on the launched ranks: the code that runs collectives, times layers and
counts bytes, collective over the default process group.

It sits above the executor (it times the executor's own tensor and data parallelism and its
pipeline schedules) and writes the data the planner reads (:mod:`uniap.profiles`); nothing on
the planner side imports it. :func:`collect_profile` runs every measurement in order:

- :mod:`.comm`: alpha-beta fits per collective and planner group shape;
- :mod:`.compute`: forward / backward seconds per layer shape, local batch and TP degree;
- :mod:`.memory`: bytes saved for backward, state bytes, a step's peak memory;
- :mod:`.overlap`: how much of a collective hides behind backward compute;
- :mod:`.pipeline`: the pipeline schedule's fixed cost per micro-batch and stage.
"""

from uniap.profiler.collect import collect_profile, planner_batches

__all__ = ["collect_profile", "planner_batches"]
