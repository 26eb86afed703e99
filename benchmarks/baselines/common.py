"""What every search of the comparison shares: the candidate ``(pp, c)`` tables, the result
record, the scoring and the conversion of an assignment to a :class:`uniap.contract.Plan`.

Every method searches the same cost tables (:class:`uniap.cost_model.CostTables`, 1F1B, the
same strategy space) and every assignment is scored by :func:`uniap.cost_model.evaluate_assignment`,
so only the search differs between methods.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from uniap.contract import Plan
from uniap.cost_model import CostModel, CostTables, evaluate_assignment
from uniap.planner import candidate_tables as planner_candidates
from uniap.planner import plan_of_assignment
from uniap.strategies import divisors

__all__ = [
    "BaselineResult",
    "candidate_tables",
    "even_split",
    "param_split",
    "score",
    "to_plan",
]


@dataclass
class BaselineResult:
    """One method's answer on one workload."""

    method: str
    """Name of the method (``uniap``, ``galvatron``, ``alpa``, ``ddp``, ...)."""
    time_per_iteration_s: float = math.inf
    """uniap's TPI of the plan (``inf`` when the method found none)."""
    fits: bool = False
    """The plan fits device memory (False: OOM, or no plan at all)."""
    wall_s: float = 0.0
    """Search wall time, cost tables included."""
    pp: int = 0
    num_microbatches: int = 0
    stage_of: list[int] = field(default_factory=list)
    strategy_of: list[int] = field(default_factory=list)
    capped: bool = False
    """The search hit its wall-time cap; the plan is the best found until then."""
    candidates_done: int = 0
    """``(pp, c)`` candidates searched to the end (searches that visit candidates)."""
    candidates_total: int = 0
    """``(pp, c)`` candidates there are (0: not reported)."""
    detail: str = ""
    """Free text: the variant that won (e.g. ``recompute``), candidates visited, ILPs solved."""

    @property
    def progress(self) -> str:
        """``done/total (pp, c)`` when the search reports it, else empty."""
        return (
            f"{self.candidates_done}/{self.candidates_total} (pp, c)"
            if self.candidates_total
            else ""
        )

    @property
    def found(self) -> bool:
        """True when the method produced some plan (fitting or not)."""
        return bool(self.stage_of)

    def samples_per_s(self, global_batch_size: int) -> float:
        """Predicted throughput; 0 when there is no plan that fits."""
        if not self.fits or not math.isfinite(self.time_per_iteration_s):
            return 0.0
        return global_batch_size / self.time_per_iteration_s


def candidate_tables(
    cm: CostModel,
    global_batch_size: int,
    *,
    pp_degrees: Sequence[int] | None = None,
    num_microbatches: Sequence[int] | None = None,
) -> Iterator[CostTables]:
    """Tables of every ``(pp, c)`` uniap's planner visits with 1F1B (its own
    :func:`uniap.planner.candidate_tables`): ``pp`` a divisor of the device count and at most
    the number of layers, ``c`` a divisor of the global batch; pairs where some layer has no
    strategy for the micro-batch size are skipped."""
    n, num_layers = cm.cluster.world_size, cm.graph.num_layers
    pps = [p for p in divisors(n) if p <= num_layers] if pp_degrees is None else list(pp_degrees)
    for _, _, _, t in planner_candidates(cm, pps, global_batch_size, num_microbatches):
        yield t


def score(t: CostTables, stage_of: Sequence[int], strategy_of: Sequence[int]) -> tuple[float, bool]:
    """``(TPI, fits)`` of an assignment by uniap's own evaluation."""
    ev = evaluate_assignment(t, list(stage_of), list(strategy_of))
    return ev.time_per_iteration_s, ev.fits


def even_split(num_layers: int, pp: int) -> list[int]:
    """``stage_of`` with the layers split as evenly as possible by count (earlier stages get the
    extra layer), the split Megatron and Galvatron use by default."""
    base, extra = divmod(num_layers, pp)
    out: list[int] = []
    for i in range(pp):
        out += [i] * (base + (1 if i < extra else 0))
    return out


def param_split(weights: Sequence[float], pp: int) -> list[int]:
    """``stage_of`` that cuts the chain where the cumulative weight (e.g. parameter count)
    crosses ``i / pp`` of the total, keeping every stage non-empty."""
    num_layers = len(weights)
    w = np.asarray(weights, dtype=float)
    total = float(w.sum()) or 1.0
    cum = np.cumsum(w) / total
    cuts: list[int] = []
    for i in range(1, pp):
        # first layer of stage i: where the cumulative share before it reaches i / pp
        u = int(np.searchsorted(cum, i / pp - 1e-12) + 1)
        lo = (cuts[-1] + 1) if cuts else 1
        hi = num_layers - (pp - i)
        cuts.append(min(max(u, lo), hi))
    stage_of, i = [], 0
    for u in range(num_layers):
        while i < len(cuts) and u >= cuts[i]:
            i += 1
        stage_of.append(i)
    return stage_of


def to_plan(
    cm: CostModel,
    t: CostTables,
    stage_of: Sequence[int],
    strategy_of: Sequence[int],
    global_batch_size: int,
) -> Plan:
    """The :class:`Plan` of an assignment, as the planner makes its own
    (:func:`uniap.planner.plan_of_assignment`: precision, predictions, provenance), for the
    executor and for ``CostModel.evaluate``."""
    return plan_of_assignment(cm, t, stage_of, strategy_of, global_batch_size)
