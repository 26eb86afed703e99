"""Why a plan won: what binds a plan, the best plan at every pipeline degree, the runner-up.

- :func:`binding` names what limits an assignment, most binding first: memory on a stage at
  95% of the usable limit or more, then each non-compute term of
  :func:`uniap.report.time_breakdown` at 15% of the time per iteration or more (for
  communication, its largest part and the link it crosses, intra- or inter-node), else
  compute; and the layers that recompute their forward to fit memory.
- :func:`explain_candidates` condenses the planner's search into the best plan known at every
  ``(pp, schedule)`` tried (the solver's assignment, else the heuristic's, else only the
  lower bound); the planner keeps it in ``Plan.solver["best_per_pp"]``.
- :func:`render_explain` writes what ``uniap explain`` prints: those rows with the term each
  loses most on against the winner and what binds it, the winner's time per term, and the
  runner-up with the terms it loses on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from uniap.cost_model import CostTables, evaluate_assignment
from uniap.report import (
    _COMM_NAMES,
    TIME_TERMS,
    _pct,
    _stored,
    fmt_seconds,
    memory_breakdown,
    time_breakdown,
)
from uniap.units import count

if TYPE_CHECKING:
    from uniap.cluster import Cluster
    from uniap.contract import Plan

__all__ = ["binding", "explain_candidates", "render_explain"]

_MEMORY_BINDS = 0.95
"""A stage at this fraction of the usable memory or more is said to be bound by memory."""
_TERM_BINDS = 0.15
"""A non-compute time term at this fraction of the TPI or more is named as binding."""


def binding(
    t: CostTables,
    stage_of: Sequence[int],
    strategy_of: Sequence[int],
    cluster: Cluster | None = None,
) -> list[str]:
    """What limits this assignment, most binding first: ``memory on stage i (97% of the
    limit)``, ``bubble 23%``, ``gradient sync 31% (inter-node)``, else ``compute 80%``."""
    tb = time_breakdown(t, stage_of, strategy_of)
    mem = memory_breakdown(t, stage_of, strategy_of)
    tpi = tb["time_per_iteration_s"]
    out = []
    for i, m in enumerate(mem):
        if m["total"] >= _MEMORY_BINDS * t.memory_limit_bytes:
            out.append(
                f"memory on stage {i} ({_pct(m['total'], t.memory_limit_bytes)} of the limit)"
            )
    ranked = sorted(
        ((tb[k], k) for k in ("communication", "bubble", "optimizer", "overhead")), reverse=True
    )
    for v, k in ranked:
        if v < _TERM_BINDS * tpi:
            break
        if k == "communication":
            part = max(tb["communication_parts"], key=lambda q: tb["communication_parts"][q])
            link = _link_of(part, t, stage_of, strategy_of, tb, cluster)
            out.append(
                f"{_COMM_NAMES[part]} {_pct(tb['communication_parts'][part], tpi)}"
                + (f" ({link})" if link else "")
            )
        else:
            out.append(f"{k} {_pct(v, tpi)}")
    if not out or all(x.startswith("memory") for x in out):
        out.append(f"compute {_pct(tb['compute'], tpi)}")
    ckpt = sum(1 for k in strategy_of if t.strategies and t.strategies[k].recompute)
    if ckpt:  # memory forced a forward to be paid twice
        out.append(f"recompute on {ckpt} layer{'s' if ckpt > 1 else ''} to fit memory")
    return out


def _link_of(
    part: str, t: CostTables, stage_of, strategy_of, tb: dict, cluster: Cluster | None
) -> str:
    """``intra-node`` or ``inter-node``: the link the largest communication term crosses."""
    if cluster is None:
        return ""
    g = cluster.world_size // t.pp
    if part == "loss_all_reduce":
        ranks = list(range(cluster.world_size))
    elif part == "p2p":
        ranks = [0, g] if t.pp > 1 else [0]
        for i in range(t.pp - 1):  # any boundary that crosses nodes is the slow one
            if not cluster.same_node([i * g, (i + 1) * g]):
                ranks = [i * g, (i + 1) * g]
    else:
        i = tb["sync_stage"] if part == "dp_sync" else tb["busiest_stage"]
        # (the busiest / sync rank: with an interleaved schedule, all of its stages)
        ks = [strategy_of[u] for u in range(len(stage_of)) if stage_of[u] % t.pp == i]
        s = (
            max((t.strategies[k] for k in ks), key=lambda x: x.dp if part != "tp" else x.tp)
            if t.strategies
            else None
        )
        if s is None:
            return ""
        s0 = i * g
        ranks = list(range(s0, s0 + s.tp)) if part == "tp" else [s0 + m * s.tp for m in range(s.dp)]
    return "intra-node" if cluster.same_node(ranks) else "inter-node"


# ---------------------------------------------------------------------- the search
def explain_candidates(
    entries: Sequence[tuple[dict, CostTables, tuple[list[int], list[int]] | None]],
    cluster: Cluster | None = None,
) -> list[dict[str, Any]]:
    """The best plan at every ``(pp, schedule)`` of the search.

    ``entries``: per candidate, its row of ``Plan.solver["candidates"]``, its tables and the
    best assignment known for it (the solver's, else the heuristic's, else None). Per
    ``(pp, schedule)``: the ``c`` and TPI of the best assignment, its ``source`` (``solver``,
    ``heuristic``: the solver proved nothing there beats the winner, ``bound``: only a lower
    bound is known), the lowest lower bound, the time breakdown, peak memory and
    :func:`binding`.
    """
    groups: dict[tuple[int, str], list] = {}
    for row, t, asg in entries:
        groups.setdefault((row["pp"], row["schedule"]), []).append((row, t, asg))
    out = []
    for (pp, sched), items in sorted(groups.items()):
        lb = min(r["lower_bound_s"] for r, _, _ in items)
        best = None
        for row, t, asg in items:
            if asg is None or not asg[0]:
                continue
            tpi = evaluate_assignment(t, *asg).time_per_iteration_s
            if math.isfinite(tpi) and (best is None or tpi < best[0]):
                best = (tpi, row, t, asg)
        entry: dict[str, Any] = {"pp": pp, "schedule": sched, "lower_bound_s": float(lb)}
        if best is None:
            entry.update(
                c=None,
                time_per_iteration_s=None,
                source="bound",
                status=_group_status(items),
                binds=[],
            )
        else:
            tpi, row, t, asg = best
            tb = time_breakdown(t, *asg)
            solved = (
                row.get("time_per_iteration_s") is not None
                and abs(row["time_per_iteration_s"] - tpi) <= 1e-12 * tpi
            )
            entry.update(
                c=row["c"],
                time_per_iteration_s=float(tpi),
                source="solver" if solved else "heuristic",
                status=row["status"],
                time_breakdown_s={k: float(tb[k]) for k in TIME_TERMS},
                peak_memory_bytes=[float(m["total"]) for m in memory_breakdown(t, *asg)],
                memory_limit_bytes=float(t.memory_limit_bytes),
                binds=binding(t, *asg, cluster),
            )
        out.append(entry)
    return out


def _group_status(items) -> str:
    statuses = {r["status"] for r, _, _ in items}
    return "infeasible" if statuses <= {"infeasible"} else "pruned"


def render_explain(plan: Plan, cluster_name: str | None = None) -> str:
    """The text of ``uniap explain``: the best plan at every (pp, schedule) tried with its TPI
    and what binds it, the winner's breakdown per term, the runner-up and why it lost."""
    from uniap.errors import ConfigError

    try:
        return _render_explain(plan, cluster_name)
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise ConfigError(
            f"the plan's solver.best_per_pp section is malformed ({type(e).__name__}: {e}); "
            "re-create the plan with `uniap plan`"
        ) from None


def _render_explain(plan: Plan, cluster_name: str | None) -> str:
    rows = plan.solver.get("best_per_pp") or []
    tpi = _stored(plan).get("time_per_iteration_s")
    lines = [
        f"Why this plan: {plan.model_name} on {count(plan.world_size, 'device')}"
        + (
            f" ({cluster_name or plan.provenance.get('cluster')})"
            if (cluster_name or plan.provenance.get("cluster"))
            else ""
        )
        + f", global batch {plan.global_batch_size}, "
        f"{plan.provenance.get('dtype', 'dtype not recorded')}"
    ]
    if not rows:
        lines.append(
            "this plan file has no search record (solver.best_per_pp): re-run `uniap plan`"
        )
        return "\n".join(lines)
    sw = max([9] + [len(e["schedule"]) + 1 for e in rows])  # InterleavedZeroBubble: 21
    lines += [
        "",
        "best plan at each pipeline degree and schedule tried:",
        f"   {'pp':>3}  {'schedule':<{sw}}{'c':>4}  {'time/iter':>12}  {'vs winner':>9}  "
        f"{'loses most on':<22}what binds it",
    ]
    win = next(
        (e for e in rows if e["pp"] == plan.pp_degree and e["schedule"] == plan.schedule), None
    )
    win_tb = _stored(plan).get("time_breakdown_s") or (win or {}).get("time_breakdown_s")
    for e in rows:
        mark = "*" if e is win else " "
        if e["time_per_iteration_s"] is None:
            fits = math.isfinite(e["lower_bound_s"])
            t, vs = (f">= {fmt_seconds(e['lower_bound_s'])}" if fits else "-"), "-"
            why = (
                "nothing fits in memory"
                if e["status"] == "infeasible"
                else "pruned: its lower bound cannot beat the winner"
                if fits
                else "nothing fits in memory (a lower bound on its memory is over the limit)"
            )
        else:
            t = fmt_seconds(e["time_per_iteration_s"])
            vs = "winner" if e is win else f"+{100 * (e['time_per_iteration_s'] / tpi - 1):.1f}%"
            why = "; ".join(e["binds"]) + (
                " (heuristic plan)" if e["source"] == "heuristic" else ""
            )
        c = "-" if e["c"] is None else str(e["c"])
        lost = ""
        if e is not win and win_tb and e.get("time_breakdown_s"):
            d, k = max((e["time_breakdown_s"][k] - win_tb[k], k) for k in TIME_TERMS)
            lost = f"+{fmt_seconds(d)} {k}" if d > 0 else ""
        lines.append(
            f"{mark}  {e['pp']:>3}  {e['schedule']:<{sw}}{c:>4}  {t:>12}  {vs:>9}  {lost:<22}{why}"
        )
    if any(e["source"] == "heuristic" for e in rows):
        lines.append(
            "(heuristic plan: the best the heuristic found there; the solver or the lower bound "
            "proved that nothing there beats the winner)"
        )
    tb = _stored(plan).get("time_breakdown_s") or (win or {}).get("time_breakdown_s")
    lines += [
        "",
        f"winner: pp={plan.pp_degree} c={plan.num_microbatches} {plan.schedule}, "
        f"{fmt_seconds(tpi)} per iteration",
    ]
    if tb:
        lines.append(
            "  " + ", ".join(f"{k} {fmt_seconds(tb[k])} ({_pct(tb[k], tpi)})" for k in TIME_TERMS)
        )
    if win is not None:
        lines.append("  binds: " + "; ".join(win["binds"]))
    others = [e for e in rows if e is not win and e["time_per_iteration_s"] is not None]
    if others:
        ru = min(others, key=lambda e: e["time_per_iteration_s"])
        d = ru["time_per_iteration_s"] - tpi
        diffs = (
            sorted(
                ((ru["time_breakdown_s"][k] - tb[k], k) for k in TIME_TERMS),
                key=lambda x: -abs(x[0]),
            )
            if tb
            else []
        )
        why = ", ".join(
            f"{'+' if v >= 0 else '-'}{fmt_seconds(abs(v))} {k}"
            for v, k in diffs
            if abs(v) > 1e-3 * tpi
        )
        lines.append(
            f"runner-up: pp={ru['pp']} c={ru['c']} {ru['schedule']}, "
            f"{fmt_seconds(ru['time_per_iteration_s'])} "
            f"(+{fmt_seconds(d)}, +{100 * d / tpi:.1f}%)" + (f": {why}" if why else "")
        )
    else:
        lines.append(
            "runner-up: none (every other pipeline degree was pruned by its lower bound or does "
            "not fit)"
        )
    return "\n".join(lines)
