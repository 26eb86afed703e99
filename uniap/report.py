"""Reading a plan: where its predicted time and memory go (why it won: :mod:`uniap.explain`).

Everything here is re-derived from the cost model's tables (:class:`uniap.cost_model.CostTables`)
for an assignment, so the numbers add up to what the planner optimised:

- :func:`time_breakdown` splits ``TPI = sum_i p_i + sum_i o_i + (c - 1) max(p, o) + max_i s_i
  + step`` into terms that sum to it exactly. Seen from the busiest stage ``i*`` (largest
  ``p_i``), which works ``c * p_i*``: ``compute`` its forward and backward (recompute included),
  ``communication`` its TP and FSDP collectives and reshards, the stage-to-stage sends (and
  how much a send slower than ``p_i*`` stretches the steady state), the gradient sync of the
  stage that syncs longest ``s*`` and the loss's all-reduce; ``bubble`` the other stages' fill
  and drain (``sum_{i != i*} p_i``), ``optimizer`` the optimizer step of ``s*``, ``overhead``
  the pipeline schedule's own time per micro-batch. An interleaved schedule's TPI has no
  formula (the longest path ``L`` through torch's order, :func:`uniap.schedules.
  schedule_makespan`): its ``bubble`` is ``L`` less the busiest rank's ``c`` micro-batches
  of work, and sends that take longer than ``L`` (``c`` times a rank's links) are
  ``communication``.
- :func:`memory_breakdown` splits each stage's peak bytes into parameters, gradients,
  optimizer state and activations (the rest: saved activations of the micro-batches in flight
  and the loss's buffers).

:func:`plan_report` gathers it into one dict (``uniap show --json``) and :func:`render_plan`
writes the text ``uniap show`` prints. The profile helpers at the end mark noisy or clamped
measurements in ``uniap profile``'s output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from uniap.cost_model import CostTables, evaluate_assignment, stage_op_times
from uniap.schedules import schedule_makespan
from uniap.units import count, fmt_bytes, fmt_seconds

if TYPE_CHECKING:
    from uniap.contract import Plan
    from uniap.cost_model import CostModel

__all__ = [
    "TIME_TERMS",
    "MEMORY_TERMS",
    "time_breakdown",
    "memory_breakdown",
    "stage_details",
    "plan_report",
    "render_plan",
    "fmt_seconds",
    "fmt_bytes",
]

TIME_TERMS = ("compute", "communication", "bubble", "optimizer", "overhead")
"""The terms of :func:`time_breakdown`, which sum to the time per iteration."""
MEMORY_TERMS = ("parameters", "gradients", "optimizer", "activations")
"""The terms of :func:`memory_breakdown`, which sum to a stage's peak bytes."""


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole > 0 and math.isfinite(whole) else "-"


# ---------------------------------------------------------------------- breakdowns
def _part(t: CostTables, name: str, u: int, k: int, default: float = 0.0) -> float:
    arr = t.breakdown.get(name)
    return float(arr[u, k]) if arr is not None else default


def stage_details(
    t: CostTables, stage_of: Sequence[int], strategy_of: Sequence[int]
) -> list[dict[str, float]]:
    """Per stage, seconds per micro-batch (``forward_s``, ``backward_s``, the parts ``compute_s``,
    ``tp_comm_s``, ``fsdp_comm_s``, ``reshard_s``, ``overhead_s``), the send to the next
    stage ``send_s``, and once per iteration ``sync_s`` (gradient sync) and ``optimizer_s``.
    Interleaved tables split the stage time as the cost model's longest path does
    (:func:`uniap.cost_model.stage_op_times`); zero bubble's ``backward_s`` is the
    input gradient, ``weight_grad_s`` the weight gradient."""
    pp, L = t.num_stages, t.num_layers  # every (virtual) stage
    out = [
        dict.fromkeys(
            (
                "compute_s",
                "forward_only_s",
                "tp_comm_s",
                "fsdp_comm_s",
                "reshard_s",
                "send_s",
                "sync_s",
                "optimizer_s",
            ),
            0.0,
        )
        for _ in range(pp)
    ]
    for u in range(L):
        i, k = stage_of[u], strategy_of[u]
        d = out[i]
        a = float(t.A[u, k])
        d["compute_s"] += _part(t, "compute", u, k, a)
        d["forward_only_s"] += _part(t, "forward", u, k, a / 3)
        d["tp_comm_s"] += _part(t, "tp_comm", u, k)
        d["fsdp_comm_s"] += _part(t, "fsdp_comm", u, k)
        g = float(t.G[u, k])
        d["optimizer_s"] += _part(t, "optimizer", u, k, 0.0)
        d["sync_s"] += _part(t, "dp_sync", u, k, g)
        if u + 1 < L:
            a_, b_ = t.layout[u, k], t.layout[u + 1, strategy_of[u + 1]]
            if stage_of[u + 1] == i:
                d["reshard_s"] += float(t.R[u, a_, b_])
            else:
                d["send_s"] += float(t.Rp[u, a_, b_])
    for u, (i, k) in enumerate(zip(stage_of, strategy_of)):  # the stage's once-exposed sync
        out[i]["first_sync_s"] = max(out[i].get("first_sync_s", 0.0), float(t.F[u, k]))
    for d in out:
        d["sync_s"] += d.pop("first_sync_s", 0.0)
        d["overhead_s"] = t.stage_overhead_s
        busy = d["compute_s"] + d["tp_comm_s"] + d["fsdp_comm_s"] + d["reshard_s"] + d["overhead_s"]
        comm = busy - d["compute_s"]
        d["forward_s"] = d.pop("forward_only_s") + comm / 2  # drawn half in each direction
        d["backward_s"] = busy - d["forward_s"]
    if t.longest_path:  # the forward and backward (zero bubble: B and W) the schedule times
        p = evaluate_assignment(t, stage_of, strategy_of).stage_time_s
        for d, f, b, w in zip(out, *stage_op_times(t, stage_of, strategy_of, p)):
            d["forward_s"], d["backward_s"] = f, b
            if t.zero_bubble:
                d["weight_grad_s"] = w
    return out


def time_breakdown(
    t: CostTables, stage_of: Sequence[int], strategy_of: Sequence[int]
) -> dict[str, Any]:
    """The TPI split into :data:`TIME_TERMS` (seconds, summing to the TPI; see the module
    docstring), with ``communication_parts`` (``tp``, ``fsdp``, ``reshard``, ``p2p``,
    ``dp_sync``, ``loss_all_reduce``) and the stages the split is seen from
    (``busiest_stage``, ``sync_stage``)."""
    ev = evaluate_assignment(t, stage_of, strategy_of)
    st = stage_details(t, stage_of, strategy_of)
    c, p, o, s = t.num_microbatches, ev.stage_time_s, ev.link_time_s, ev.sync_time_s
    pp, v = t.pp, t.virtual_stages
    # per rank (interleaved schedules: all of its stages; see uniap.cost_model for the formula)
    load = [sum(p[r::pp]) for r in range(pp)]
    i = max(range(pp), key=lambda r: load[r])
    j = max(range(pp), key=lambda q: s[q])
    bottleneck = max(load + [sum(o[r::pp]) for r in range(pp)])

    def on_rank(r: int, key: str) -> float:
        return sum(d[key] for d in st[r::pp])

    comm = {
        "tp": c * on_rank(i, "tp_comm_s"),
        "fsdp": c * on_rank(i, "fsdp_comm_s"),
        "reshard": c * on_rank(i, "reshard_s"),
        "p2p": sum(o) / v + (c - 1 / v) * (bottleneck - load[i]),
        # a rank's once-exposed sync is its largest F over all of its stages (in s[j])
        "dp_sync": on_rank(j, "sync_s") if v == 1 else s[j] - on_rank(j, "optimizer_s"),
        "loss_all_reduce": t.step_overhead_s,
    }
    bubble = (sum(p) - load[i]) / v
    if t.longest_path:  # no formula: the longest path through torch's order of operations
        f, b, w = stage_op_times(t, stage_of, strategy_of, p)
        makespan = schedule_makespan(t.schedule, pp, v, c, f, b, w, o)
        links = max((sum(o[r::pp]) for r in range(pp)), default=0.0)
        comm["p2p"] = max(0.0, c * links - makespan)  # links slower than the schedule
        bubble = makespan - c * load[i]  # the busiest rank's idle time within it
    terms = {
        "compute": c * on_rank(i, "compute_s"),
        "communication": sum(comm.values()),
        "bubble": bubble,
        "optimizer": on_rank(j, "optimizer_s"),
        "overhead": c * v * t.stage_overhead_s,
    }
    return {
        **terms,
        "time_per_iteration_s": ev.time_per_iteration_s,
        "communication_parts": comm,
        "busiest_stage": i,
        "sync_stage": j,
    }


def memory_breakdown(
    t: CostTables, stage_of: Sequence[int], strategy_of: Sequence[int]
) -> list[dict[str, float]]:
    """Per stage, bytes per device split into :data:`MEMORY_TERMS` (summing to the peak the
    cost model predicts), and ``total``."""
    ev = evaluate_assignment(t, stage_of, strategy_of)
    out = [dict.fromkeys(MEMORY_TERMS, 0.0) for _ in range(t.pp)]
    for u, (i, k) in enumerate(zip(stage_of, strategy_of)):
        i %= t.pp  # per rank: all of its stages
        out[i]["parameters"] += _part(t, "param_bytes", u, k)
        out[i]["gradients"] += _part(t, "grad_bytes", u, k)
        out[i]["optimizer"] += _part(t, "optimizer_bytes", u, k)
    for i, d in enumerate(out):
        d["activations"] = (
            ev.peak_memory_bytes[i] - d["parameters"] - d["gradients"] - d["optimizer"]
        )
        d["total"] = ev.peak_memory_bytes[i]
    return out


_COMM_NAMES = {
    "tp": "tensor-parallel all-reduces",
    "fsdp": "per-micro-batch data-parallel work (sharded kinds' all-gathers and "
    "reduce-scatters, offload copies, the wrappers' own time)",
    "reshard": "activation reshards",
    "p2p": "stage-to-stage sends",
    "dp_sync": "gradient sync",
    "loss_all_reduce": "the loss all-reduce",
}


# ---------------------------------------------------------------------- a plan's report
def breakdown_from_cost_model(cm: CostModel, plan: Plan) -> dict[str, Any]:
    """The plan's predictions, time and memory breakdown and per-layer costs, re-derived
    from ``cm`` as :meth:`CostModel.evaluate` prices it (refused for another model, world size
    or precision)."""
    plan.check_compatible(
        model_signature=cm.graph.signature,
        model_name=cm.graph.name,
        layer_fqns=cm.graph.fqns,
        world_size=cm.cluster.world_size,
    )
    t, stage_of, strategy_of = cm.plan_tables(plan)
    ev = evaluate_assignment(t, stage_of, strategy_of)
    return {
        **_breakdown(t, stage_of, strategy_of, per_layer=True),
        "time_per_iteration_s": ev.time_per_iteration_s,
        "samples_per_s": plan.global_batch_size / ev.time_per_iteration_s,
        "peak_memory_bytes": list(ev.peak_memory_bytes),
        "stage_time_s": list(ev.stage_time_s),
        "memory_limit_bytes": t.memory_limit_bytes,
    }


def _breakdown(t: CostTables, stage_of, strategy_of, *, per_layer: bool = False) -> dict[str, Any]:
    tb = time_breakdown(t, stage_of, strategy_of)
    out: dict[str, Any] = {
        "time_breakdown_s": {k: float(tb[k]) for k in TIME_TERMS},
        "communication_s": {k: float(v) for k, v in tb["communication_parts"].items()},
        "stage_detail": [
            {k: float(v) for k, v in d.items()} | {f"{m}_bytes": float(mb[m]) for m in MEMORY_TERMS}
            for d, mb in zip(
                stage_details(t, stage_of, strategy_of),
                # memory is per rank: each of its stages shows it
                memory_breakdown(t, stage_of, strategy_of) * t.virtual_stages,
            )
        ],
    }
    if per_layer:
        out["layers"] = [
            {
                "time_s": float(t.A[u, k]),
                "sync_s": float(t.G[u, k]),
                "memory_bytes": float(t.M[u, k, i]),
            }
            for u, (i, k) in enumerate(zip(stage_of, strategy_of))
        ]
    return out


def predicted_breakdown(
    t: CostTables, stage_of: Sequence[int], strategy_of: Sequence[int]
) -> dict[str, Any]:
    """What the planner stores in ``Plan.predicted`` so a plan file explains itself."""
    return _breakdown(t, stage_of, strategy_of)


def plan_report(plan: Plan, cost_model: CostModel | None = None) -> dict[str, Any]:
    """Everything ``uniap show`` prints, as plain data (``--json``). The breakdowns come from
    ``cost_model`` when given, else from what the planner stored in ``plan.predicted``."""
    from uniap.contract import _runs, _strat

    pred = _stored(plan)
    if cost_model is not None:  # every predicted number from the cost model, none from the file
        pred = bd = breakdown_from_cost_model(cost_model, plan)
    else:
        bd = {
            k: pred[k] for k in ("time_breakdown_s", "communication_s", "stage_detail") if k in pred
        }
    limit = pred.get("memory_limit_bytes")
    mem = pred.get("peak_memory_bytes") or []
    st_time = pred.get("stage_time_s") or []
    detail = bd.get("stage_detail") or []
    stages, u0 = [], 0
    for i, st in enumerate(plan.stages):
        groups, u = [], u0
        for key, n in _runs(st.layers):
            groups.append(
                {
                    "first": u,
                    "last": u + n - 1,
                    "first_fqn": plan.layer_strategies[u].fqn,
                    "last_fqn": plan.layer_strategies[u + n - 1].fqn,
                    "num_layers": n,
                    "strategy": _strat(key),
                }
            )
            u += n
        d = detail[i] if i < len(detail) else {}
        r = i % plan.pp_degree  # memory is per rank (interleaved: all of its stages)
        stages.append(
            {
                "index": i,
                "ranks": [st.ranks[0], st.ranks[-1]],
                "num_devices": st.num_devices,
                "layers": [u0, u - 1],
                "groups": groups,
                "time_per_microbatch_s": st_time[i] if i < len(st_time) else None,
                "peak_memory_bytes": d.get("total_bytes", mem[r] if r < len(mem) else None),
                "memory_bytes": {m: d[f"{m}_bytes"] for m in MEMORY_TERMS if f"{m}_bytes" in d},
            }
        )
        if stages[-1]["peak_memory_bytes"] is None and stages[-1]["memory_bytes"]:
            stages[-1]["peak_memory_bytes"] = sum(stages[-1]["memory_bytes"].values())
        u0 = u
    layers = []
    per_layer = bd.get("layers") or []
    u = 0
    for i, st in enumerate(plan.stages):
        for ls in st.layers:
            row = {"index": u, "fqn": ls.fqn, "stage": i, "strategy": _strat(ls.strategy)}
            if u < len(per_layer):
                row.update(per_layer[u])
            layers.append(row)
            u += 1
    return {
        "model": plan.model_name,
        "num_layers": plan.num_layers,
        "world_size": plan.world_size,
        "dtype": plan.provenance.get("dtype"),
        "precision": plan.precision.describe() if plan.precision is not None else None,
        "cluster": plan.provenance.get("cluster"),
        "profile": plan.provenance.get("profile"),
        "pp": plan.pp_degree,
        **({"virtual_stages": plan.virtual_stages} if plan.virtual_stages > 1 else {}),
        "num_microbatches": plan.num_microbatches,
        "microbatch_size": plan.microbatch_size,
        "global_batch_size": plan.global_batch_size,
        "schedule": plan.schedule,
        "time_per_iteration_s": pred.get("time_per_iteration_s"),
        "samples_per_s": pred.get("samples_per_s"),
        "time_breakdown_s": bd.get("time_breakdown_s"),
        "communication_s": bd.get("communication_s"),
        "memory_limit_bytes": limit,
        "stages": stages,
        "stage_detail": bd.get("stage_detail"),
        "layers": layers,
        "solver": {
            k: v for k, v in plan.solver.items() if k in ("status", "gap", "milps_solved", "wall_s")
        },
        "source": "cost model"
        if cost_model is not None
        else ("plan file" if "stage_detail" in pred else "plan file (no breakdown)"),
    }


def _stored(plan: Plan) -> dict[str, Any]:
    """The plan's ``predicted`` section with anything malformed left out (a hand-edited file
    still shows, with fewer numbers)."""
    pred = plan.predicted
    out: dict[str, Any] = {}
    for k in ("time_per_iteration_s", "samples_per_s", "memory_limit_bytes"):
        if _is_num(pred.get(k)):
            out[k] = float(pred[k])
    for k, n in (("peak_memory_bytes", plan.pp_degree), ("stage_time_s", len(plan.stages))):
        v = pred.get(k)
        if isinstance(v, list) and len(v) == n and all(_is_num(x) for x in v):
            out[k] = [float(x) for x in v]
    for k, keys in (("time_breakdown_s", TIME_TERMS), ("communication_s", tuple(_COMM_NAMES))):
        v = pred.get(k)
        if isinstance(v, dict) and all(_is_num(v.get(q)) for q in keys):
            out[k] = {q: float(v[q]) for q in keys}
    v = pred.get("stage_detail")
    if (
        isinstance(v, list)
        and len(v) == len(plan.stages)
        and all(isinstance(d, dict) for d in v)
        and all(_is_num(x) for d in v for x in d.values())
    ):
        out["stage_detail"] = [{q: float(x) for q, x in d.items()} for d in v]
    if "time_breakdown_s" not in out or "time_per_iteration_s" not in out:
        out.pop("time_breakdown_s", None)
    return out


def _is_num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def render_plan(report: dict[str, Any], *, layers: bool = False) -> str:
    """The text of ``uniap show``: header, stage table (one row per layer group), time and
    memory breakdowns; ``layers`` adds the per-layer listing."""
    r = report
    lines = [
        f"Plan for {r['model']} ({r['num_layers']} layers) on {count(r['world_size'], 'device')}"
        + (f" ({r['cluster']})" if r.get("cluster") else ""),
        f"  precision: {r['precision'] if r.get('precision') else _precision(r.get('dtype'))}",
        f"  pipeline: {count(r['pp'], 'stage')} x {count(r['world_size'] // r['pp'], 'device')}, "
        f"schedule {r['schedule']}"
        + (
            f" with {r['virtual_stages']} stages per rank (stage j on the devices of stage "
            f"j % {r['pp']}; memory is per device: all of its stages)"
            if r.get("virtual_stages", 1) > 1
            else ""
        )
        + f", {count(r['num_microbatches'], 'micro-batch', 'micro-batches')} "
        f"of {r['microbatch_size']} (global batch {r['global_batch_size']})",
    ]
    if r.get("time_per_iteration_s") is not None:
        sps = r.get("samples_per_s")
        lines.append(
            f"  predicted: {fmt_seconds(r['time_per_iteration_s'])} per iteration"
            + (f", {sps:.1f} samples/s" if sps is not None else "")
        )
    lines.append("")
    w = max(
        [len(f"{g['first_fqn']} .. {g['last_fqn']}") for s in r["stages"] for g in s["groups"]]
        + [20]
    )
    w = min(w, 48)
    # "dp2 tp1 FSDP-offload +ckpt" (26) is wider than the usual 22
    sw = max([22] + [len(g["strategy"]) + 1 for s in r["stages"] for g in s["groups"]])
    head = (
        f"{'stage':<6}{'devices':<10}{'layers':<10}{'names':<{w}}  "
        f"{'strategy':<{sw}}{'time/mb':>9}{'memory':>11}"
    )
    lines += [head, "-" * len(head)]
    for s in r["stages"]:
        for n, g in enumerate(s["groups"]):
            names = (
                g["first_fqn"] if g["num_layers"] == 1 else f"{g['first_fqn']} .. {g['last_fqn']}"
            )
            if len(names) > w:
                names = names[: w - 2] + ".."
            span = f"{g['first']}" if g["num_layers"] == 1 else f"{g['first']}-{g['last']}"
            first = n == 0
            dev = (
                f"{s['ranks'][0]}-{s['ranks'][1]}"
                if s["ranks"][1] != s["ranks"][0]
                else str(s["ranks"][0])
            )
            lines.append(
                f"{(str(s['index']) if first else ''):<6}{(dev if first else ''):<10}"
                f"{span:<10}{names:<{w}}  {g['strategy']:<{sw}}"
                f"{(fmt_seconds(s['time_per_microbatch_s']) if first else ''):>9}"
                f"{(fmt_bytes(s['peak_memory_bytes']) if first else ''):>11}".rstrip()
            )
    tb = r.get("time_breakdown_s")
    tpi = r.get("time_per_iteration_s")
    if tb:
        lines += ["", f"time per iteration {fmt_seconds(tpi)}:"]
        names = {
            "compute": "compute",
            "communication": "exposed communication",
            "bubble": "pipeline bubble",
            "optimizer": "optimizer step",
            "overhead": "schedule overhead",
        }
        for k in TIME_TERMS:
            extra = ""
            if k == "communication" and r.get("communication_s"):
                parts = [
                    f"{_COMM_NAMES[q]} {fmt_seconds(v)}"
                    for q, v in r["communication_s"].items()
                    if v > 0
                ]
                extra = f"  ({', '.join(parts)})" if parts else ""
            lines.append(f"  {names[k]:<22}{fmt_seconds(tb[k]):>10}  {_pct(tb[k], tpi):>4}{extra}")
    if any(s["memory_bytes"] for s in r["stages"]):
        limit = r.get("memory_limit_bytes")
        lines += ["", f"memory per device (usable limit {fmt_bytes(limit)}):"]
        lines.append(
            f"  {'stage':<6}"
            + "".join(f"{m:>13}" for m in MEMORY_TERMS)
            + f"{'total':>12}{'of limit':>10}"
        )
        for s in r["stages"]:
            mb = s["memory_bytes"]
            lines.append(
                f"  {s['index']:<6}"
                + "".join(f"{fmt_bytes(mb.get(m)):>13}" for m in MEMORY_TERMS)
                + f"{fmt_bytes(s['peak_memory_bytes']):>12}"
                + f"{_pct(s['peak_memory_bytes'], limit) if limit else '-':>10}"
            )
    elif r["stages"] and r["stages"][0]["peak_memory_bytes"] is not None:
        lines += [
            "",
            "memory per device: "
            + ", ".join(
                f"stage {s['index']} {fmt_bytes(s['peak_memory_bytes'])}" for s in r["stages"]
            )
            + " (no breakdown in this plan file: pass --model and --cluster to re-derive it)",
        ]
    if layers:
        lw = max([22] + [len(row["strategy"]) + 1 for row in r["layers"]])
        lines += [
            "",
            f"{'layer':>5}  {'name':<40}{'stage':>6}  "
            f"{'strategy':<{lw}}{'time/mb':>9}{'sync':>9}{'memory':>11}",
        ]
        for row in r["layers"]:
            lines.append(
                f"{row['index']:>5}  {row['fqn'][:40]:<40}{row['stage']:>6}  "
                f"{row['strategy']:<{lw}}"
                f"{fmt_seconds(row.get('time_s')):>9}{fmt_seconds(row.get('sync_s')):>9}"
                f"{fmt_bytes(row.get('memory_bytes')):>11}"
            )
    s = r.get("solver") or {}
    if s:
        n = s.get("milps_solved", 0)
        wall = f", {fmt_seconds(s['wall_s'])}" if "wall_s" in s else ""
        lines += [
            "",
            f"solver: {s.get('status')}, gap {s.get('gap', 0):.3g}{wall}, "
            f"{n} program{'s' if n != 1 else ''} solved",
        ]
    return "\n".join(lines)


def _precision(dtype: str | None) -> str:
    if not dtype:
        return "not recorded in this plan file (planned before uniap recorded it)"
    from uniap.cost_model import optimizer_bytes_per_param

    master = " + fp32 master copy" if dtype in ("bfloat16", "float16") else ""
    return (
        f"{dtype} parameters, activations and gradients; AdamW state fp32{master} "
        f"({optimizer_bytes_per_param(dtype)} B/parameter)"
    )
