"""A picture of a plan (``uniap show plan.yaml --plot plan.png``), drawn with matplotlib.

Three panels, all from the plan and the cost model's numbers stored in it (or re-derived by
:func:`uniap.report.plan_report` with a cost model):

(a) the device grid: one box per device, a row per node, coloured by pipeline stage and
    labelled with the stage's strategies (``dp4 tp2 FSDP``);
(b) the pipeline timeline of one iteration under the plan's schedule: forward and backward of
    every micro-batch on every stage, the sends between stages, the gradient sync and optimizer
    step at the end, and the idle time (the bubble) shaded; simulated from each stage's
    predicted forward and backward time per micro-batch (:func:`timeline`);
(c) memory per stage: parameters, gradients, optimizer state and activations stacked against
    the usable limit.

matplotlib is an optional extra (``pip install 'uniap[plot]'``); nothing else in uniap needs it.
The figure is built without pyplot (no global state, no display needed). :func:`plan_html`
puts the picture, the ``uniap show`` report and the ``uniap explain`` text on one
self-contained page (``uniap show plan.yaml --html plan.html``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uniap.errors import UniapError
from uniap.report import MEMORY_TERMS, fmt_bytes, fmt_seconds, plan_report
from uniap.units import count

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from uniap.contract import Plan

__all__ = ["plot_plan", "plan_html", "timeline"]

_STAGE_COLOURS = (
    "#4C72B0",
    "#DD8452",
    "#55A868",
    "#C44E52",
    "#8172B3",
    "#937860",
    "#DA8BC3",
    "#8C8C8C",
    "#CCB974",
    "#64B5CD",
)
_MEMORY_COLOURS = {
    "parameters": "#4C72B0",
    "gradients": "#55A868",
    "optimizer": "#8172B3",
    "activations": "#DD8452",
}


def timeline(
    schedule: str,
    num_microbatches: int,
    stages: list[dict[str, float]],
    virtual_stages: int = 1,
) -> list[list[tuple]]:
    """Per stage, the ops of one iteration as ``(kind, microbatch, start_s, end_s)``.

    ``stages[i]`` has ``forward_s``, ``backward_s`` (per micro-batch; for a zero-bubble
    schedule the input gradient, and ``weight_grad_s`` the weight gradient), ``send_s``
    (forward and backward send to the next stage together) and ``sync_s``, ``optimizer_s``
    (once). Orders: GPipe all forwards then all backwards; 1F1B ``pp - i - 1`` forwards to warm
    up, then one forward one backward, then the remaining backwards; one stage: forward and
    backward of each micro-batch in turn; ``virtual_stages = v > 1`` (interleaved): one row per
    rank, its ops in torch's order (:func:`uniap.schedules.interleaved_order`), ``stages`` the
    ``pp * v`` stages, stage ``j`` on rank ``j % pp``; zero bubble: torch's order with the
    weight gradients apart (:func:`uniap.schedules.zero_bubble_order`), which the cost model
    times the same way. Kinds: ``F``, ``B``, ``W``, ``send``, ``sync``, ``opt``.
    """
    from uniap.schedules import get_schedule, interleaved_order, zero_bubble_order

    n, c, v = len(stages), num_microbatches, virtual_stages
    pp = n // v
    orders = []  # per row (rank): (kind, micro-batch, stage)
    split = get_schedule(schedule).split_backward
    for i in range(pp):
        if split:
            order = zero_bubble_order(pp, v, c, i)
        elif v > 1:
            order = interleaved_order(pp, v, c, i)
        elif pp == 1:
            order = [(k, m, i) for m in range(c) for k in "FB"]
        elif schedule == "GPipe":
            order = [("F", m, i) for m in range(c)] + [("B", m, i) for m in range(c)]
        else:
            w = min(pp - i - 1, c)
            order = [("F", m, i) for m in range(w)]
            for j in range(c - w):
                order += [("F", w + j, i), ("B", j, i)]
            order += [("B", m, i) for m in range(c - w, c)]
        orders.append(order)
    done: dict[tuple[str, int, int], float] = {}
    free = [0.0] * pp
    pos = [0] * pp
    ops: list[list[tuple]] = [[] for _ in range(pp)]
    half = [st.get("send_s", 0.0) / 2 for st in stages]
    while any(pos[i] < len(orders[i]) for i in range(pp)):
        progressed = False
        for i in range(pp):
            while pos[i] < len(orders[i]):
                kind, m, j = orders[i][pos[i]]  # j: the stage (== i without interleaving)
                if kind == "F":
                    dep = ("F", j - 1, m) if j > 0 else None
                    lag = half[j - 1] if j > 0 else 0.0
                elif kind == "W":  # after its own B, earlier in the rank's order
                    dep, lag = None, 0.0
                else:
                    dep = ("B", j + 1, m) if j + 1 < n else ("F", j, m)
                    lag = half[j] if j + 1 < n else 0.0
                if dep is not None and dep not in done:
                    break
                ready = (done[dep] if dep is not None else 0.0) + lag
                if lag > 0:
                    ops[i].append(("send", m, ready - lag, ready))
                start = max(free[i], ready)
                key = {"F": "forward_s", "B": "backward_s", "W": "weight_grad_s"}[kind]
                end = start + stages[j].get(key, 0.0)
                ops[i].append((kind, m, start, end))
                done[(kind, j, m)] = free[i] = end
                pos[i] += 1
                progressed = True
        if not progressed:  # pragma: no cover - the orders above never deadlock
            raise AssertionError("pipeline schedule deadlocked")
    for i in range(pp):
        mine = stages[i::pp]  # the rank's stages
        sync = sum(st.get("sync_s", 0.0) for st in mine)
        opt = sum(st.get("optimizer_s", 0.0) for st in mine)
        t = free[i]
        ops[i].append(("sync", -1, t, t + sync))
        ops[i].append(("opt", -1, t + sync, t + sync + opt))
    return ops


def plot_plan(
    plan: Plan,
    path: str | Path | None = None,
    *,
    report: dict[str, Any] | None = None,
    devices_per_node: int | None = None,
) -> Figure:
    """Draw the plan (see the module docstring); write it to ``path`` (.png, .svg, .pdf) if
    given; return the figure (``fig.axes``: device grid, memory, timeline)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch, Rectangle
    except ImportError:
        raise UniapError(
            "drawing a plan needs matplotlib: pip install 'uniap[plot]' (or pip install matplotlib)"
        ) from None
    r = report if report is not None else plan_report(plan)
    if devices_per_node is None:
        devices_per_node = _devices_per_node(plan)
    fig = Figure(figsize=(12, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.3], width_ratios=[1.5, 1])
    ax_dev, ax_mem, ax_tl = (
        fig.add_subplot(grid[0, 0]),
        fig.add_subplot(grid[0, 1]),
        fig.add_subplot(grid[1, :]),
    )
    title = (
        f"{plan.model_name} on {count(plan.world_size, 'device')}"
        + (f" ({r['cluster']})" if r.get("cluster") else "")
        + f": pp={plan.pp_degree}, "
        f"{count(plan.num_microbatches, 'micro-batch', 'micro-batches')} of "
        f"{plan.microbatch_size}, "
        f"{plan.schedule}"
        + (f", {r['dtype']}" if r.get("dtype") else "")
        + (
            f" | predicted {fmt_seconds(r['time_per_iteration_s'])}/iteration"
            if r.get("time_per_iteration_s") is not None
            else ""
        )
    )
    fig.suptitle(title, fontsize=11)
    _draw_devices(ax_dev, plan, r, devices_per_node, Rectangle, Patch)
    _draw_memory(ax_mem, r)
    _draw_timeline(ax_tl, plan, r, Rectangle, Patch)
    if path is not None:
        fig.savefig(path, dpi=90)
    return fig


def _devices_per_node(plan: Plan) -> int:
    name = plan.provenance.get("cluster")
    if isinstance(name, str):
        try:
            from uniap.cluster import load_cluster

            c = load_cluster(name)
            if c.world_size == plan.world_size:
                return c.devices_per_node
        except Exception:  # noqa: BLE001 - a cluster file elsewhere: fall back to a square-ish grid
            pass
    return min(plan.world_size, 8)


def _draw_devices(ax, plan: Plan, r: dict, per_node: int, Rectangle, Patch) -> None:  # noqa: N803
    nodes = math.ceil(plan.world_size / per_node)
    pp = plan.pp_degree
    for i, st in enumerate(plan.stages[:pp]):  # (interleaved: a device holds stages i, i + pp..)
        colour = _STAGE_COLOURS[i % len(_STAGE_COLOURS)]
        mine = range(i, len(plan.stages), pp)
        strategies = sorted({g["strategy"] for j in mine for g in r["stages"][j]["groups"]})
        for rank in st.ranks:
            x, y = rank % per_node, nodes - 1 - rank // per_node
            fsdp = any(k in s for s in strategies for k in ("FSDP", "ZeRO2", "HSDP"))
            ax.add_patch(
                Rectangle(
                    (x + 0.05, y + 0.05),
                    0.9,
                    0.9,
                    facecolor=colour,
                    edgecolor="black",
                    hatch="//" if fsdp else None,
                    alpha=0.85,
                    label=f"device {rank}",
                )
            )
            ax.text(
                x + 0.5,
                y + 0.5,
                f"{rank}\nS" + ",".join(str(j) for j in mine),
                ha="center",
                va="center",
                fontsize=8,
                color="white",
                fontweight="bold",
            )
    handles = [
        Patch(
            facecolor=_STAGE_COLOURS[i % len(_STAGE_COLOURS)],
            label=f"stage {i}: layers {s['layers'][0]}-{s['layers'][1]}, "
            + ", ".join(sorted({g["strategy"] for g in s["groups"]})),
        )
        for i, s in enumerate(r["stages"])
    ]
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(0, -0.02),
        fontsize=7,
        frameon=False,
        ncol=1 if len(handles) <= 4 else 2,
    )
    ax.set_xlim(0, per_node)
    ax.set_ylim(0, nodes)
    ax.set_yticks(
        [nodes - 0.5 - n for n in range(nodes)], [f"node {n}" for n in range(nodes)], fontsize=8
    )
    ax.set_xticks([])
    ax.set_aspect("equal")
    ax.set_title(
        "(a) devices by stage (hatched: state sharded, or offloaded to the host)",
        fontsize=10,
        loc="left",
    )


def _draw_memory(ax, r: dict) -> None:
    stages = r["stages"]
    xs = list(range(len(stages)))
    bottom = [0.0] * len(stages)
    have = all(s["memory_bytes"] for s in stages)
    terms = MEMORY_TERMS if have else ("total",)
    for term in terms:
        vals = [
            (s["memory_bytes"][term] if have else (s["peak_memory_bytes"] or 0.0)) / 2**30
            for s in stages
        ]
        ax.bar(
            xs,
            vals,
            bottom=bottom,
            color=_MEMORY_COLOURS.get(term, "#4C72B0"),
            label=term,
            width=0.6,
        )
        bottom = [b + v for b, v in zip(bottom, vals)]
    for x, total in zip(xs, bottom):  # readable where the bars are thin against the limit
        ax.text(x, total, fmt_bytes(total * 2**30), ha="center", va="bottom", fontsize=7)
    limit = r.get("memory_limit_bytes")
    if limit:  # named in the legend: a label on the line ran over the totals and the axis
        ax.axhline(
            limit / 2**30,
            color="red",
            linestyle="--",
            linewidth=1,
            label=f"usable limit {fmt_bytes(limit)}",
        )
    top = max([limit or 0.0] + [b * 2**30 for b in bottom]) / 2**30
    ax.set_ylim(0, top * 1.3 if top > 0 else 1)
    ax.set_xticks(xs, [f"stage {i}" for i in xs], fontsize=8)
    ax.set_ylabel("GiB per device", fontsize=8)
    # below the bars: above them a narrow panel's legend ran over the limit's label
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    ax.set_title("(c) memory per device", fontsize=10, loc="left")


def _draw_timeline(ax, plan: Plan, r: dict, Rectangle, Patch) -> None:  # noqa: N803
    detail = [s for s in (r.get("stage_detail") or [])]
    if not detail:
        detail = _detail_from_report(plan, r)
    if not detail:
        ax.text(
            0.5,
            0.5,
            "no per-stage times in this plan file (re-run `uniap plan`, or pass --model "
            "and --cluster)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_axis_off()
        return
    ops = timeline(plan.schedule, plan.num_microbatches, detail, plan.virtual_stages)
    end = max(op[3] for stage in ops for op in stage)
    scale, unit = (1e3, "ms") if end < 10 else (1.0, "s")
    colours = {
        "F": "#4C72B0",
        "B": "#55A868",
        "W": "#8EBA42",
        "send": "#999999",
        "sync": "#DD8452",
        "opt": "#8172B3",
    }
    pp = plan.pp_degree
    for i, stage in enumerate(ops):
        y = pp - 1 - i
        ax.add_patch(
            Rectangle(
                (0, y + 0.1),
                end * scale,
                0.8,
                facecolor="#F4CCCC",
                edgecolor="none",
                zorder=0,
                label="bubble",
            )
        )
        for kind, m, a, b in stage:
            if b <= a:
                continue
            if kind == "send":
                ax.add_patch(
                    Rectangle(
                        (a * scale, y + 0.8),
                        (b - a) * scale,
                        0.1,
                        facecolor=colours[kind],
                        edgecolor="none",
                        zorder=2,
                        label="send",
                    )
                )
                continue
            ax.add_patch(
                Rectangle(
                    (a * scale, y + 0.1),
                    (b - a) * scale,
                    0.8,
                    facecolor=colours[kind],
                    edgecolor="white",
                    linewidth=0.5,
                    zorder=1,
                    label=f"{kind}{m}",
                )
            )
            if kind in "FBW" and (b - a) / end > 0.012:
                ax.text(
                    (a + b) / 2 * scale,
                    y + 0.5,
                    f"{kind}{m}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white",
                    zorder=3,
                )
    ax.set_xlim(0, end * scale * 1.01)
    ax.set_ylim(0, pp)
    n = len(plan.stages)  # interleaved: a row per rank, holding stages i, i + pp, ...
    names = [
        f"stage{'s' if n > pp else ''} " + ",".join(map(str, range(i, n, pp))) for i in range(pp)
    ]
    ax.set_yticks([pp - 0.5 - i for i in range(pp)], names, fontsize=8)
    ax.set_xlabel(f"time in one iteration ({unit})", fontsize=8)
    split = any(op[0] == "W" for stage in ops for op in stage)
    handles = [
        Patch(facecolor=colours["F"], label="forward"),
        Patch(facecolor=colours["B"], label="input gradient" if split else "backward"),
        *([Patch(facecolor=colours["W"], label="weight gradient")] if split else []),
        Patch(facecolor=colours["send"], label="send to next stage"),
        Patch(facecolor=colours["sync"], label="gradient sync"),
        Patch(facecolor=colours["opt"], label="optimizer step"),
        Patch(facecolor="#F4CCCC", label="idle (bubble)"),
    ]
    ax.legend(
        handles=handles,
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12),
        ncol=len(handles),
        frameon=False,
    )
    ax.set_title(
        f"(b) one iteration, {plan.schedule}, "
        f"{count(plan.num_microbatches, 'micro-batch', 'micro-batches')} (simulated "
        "from the predicted stage times)",
        fontsize=10,
        loc="left",
    )


def _detail_from_report(plan: Plan, r: dict) -> list[dict[str, float]]:
    """Stage times when the plan file only has ``stage_time_s`` (forward one third)."""
    times = [s.get("time_per_microbatch_s") for s in r["stages"]]
    if any(t is None for t in times):
        return []
    return [{"forward_s": t / 3, "backward_s": 2 * t / 3, "send_s": 0.0} for t in times]


def plan_html(plan: Plan, *, report: dict[str, Any] | None = None) -> str:
    """One self-contained HTML page: the picture (inline PNG), the report and why it won."""
    import base64
    import html
    import io

    from uniap.explain import render_explain
    from uniap.report import render_plan

    r = report if report is not None else plan_report(plan)
    buf = io.BytesIO()
    plot_plan(plan, report=r).savefig(buf, format="png", dpi=90)
    png = base64.b64encode(buf.getvalue()).decode()
    text = html.escape(render_plan(r, layers=True))
    why = html.escape(render_explain(plan)) if plan.solver.get("best_per_pp") else ""
    title = html.escape(f"uniap plan: {plan.model_name} on {count(plan.world_size, 'device')}")
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title></head>"
        f"<body style='font-family: sans-serif'>\n<h1>{title}</h1>\n"
        f"<img alt='the plan: devices, memory, one iteration' src='data:image/png;base64,{png}'>\n"
        f"<h2>Plan</h2>\n<pre>{text}</pre>\n"
        + (f"<h2>Why this plan</h2>\n<pre>{why}</pre>\n" if why else "")
        + "</body></html>\n"
    )
