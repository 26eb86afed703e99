"""Python's cyclic garbage collector paused around work that allocates many objects it will not
free."""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from typing import Any


def collector_paused(fn: Callable) -> Callable:
    """``fn`` with Python's cyclic garbage collector paused (and resumed as it was); cycles
    made meanwhile are collected by its next pass.

    - The trace (:func:`uniap.graph.build_graph`) allocates tens of thousands of small objects
      that live to its end (the meta copy of the model, its hooks and the autograd graph), so
      the collector's passes over them find nothing to free: they took a third of the trace of
      a 128-layer Llama (0.56 -> 0.37 s).
    - The search (:func:`uniap.planner.plan_graph`) runs beside whatever the caller holds (a
      model's modules and parameters, other graphs): a full pass over that heap can land in
      any of its steps (0.19 s over 311,000 objects in one cell of the search grid, whose
      process holds three models). Over the grid's 36 cells up to 32 devices, two runs each
      way: 20.1 -> 17.7 s and 15.8 -> 14.3 s of search. It makes almost no cycles: after a
      5 s search (the 128-layer model on 64 H100s, fp32) the collector found 10 objects."""

    @functools.wraps(fn)
    def paused(*args: Any, **kwargs: Any) -> Any:
        if not gc.isenabled():
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()

    return paused
