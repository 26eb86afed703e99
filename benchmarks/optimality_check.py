"""The MILP's optimum at LLM size against an independent exact method (:mod:`uniap.verify`, a
dynamic program over layers that shares no code with :mod:`uniap.milp`).

    .venv/bin/python benchmarks/optimality_check.py              # fixed splits
    .venv/bin/python benchmarks/optimality_check.py --all-splits # also every split where affordable

For each workload and ``pp`` in {1, 2, 4}: uniap's planner restricted to that ``pp``
(``plan_graph(..., pp_degrees=[pp])``) gives a plan and its ``c``; on the cost tables of that
``(pp, c)`` the DP computes the least TPI over every strategy assignment on the MILP plan's own
stage split (``pp = 1``: the one split), and with ``--all-splits`` over every split for the
workloads and ``pp`` listed in ``ALL_SPLITS`` (the cost grows with the number of splits times
the stage fronts). Prints one markdown table: the MILP's TPI, the DP's, their relative
difference, the MILP's status and both wall times.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import Workload, a100, graph_of, h100  # noqa: E402
from machine import machine  # noqa: E402

from uniap.cost_model import CostModel  # noqa: E402
from uniap.planner import plan_graph  # noqa: E402
from uniap.verify import optimum  # noqa: E402


def workloads() -> list[Workload]:
    """Llama-7B on two A100 nodes (roomy and memory-tight) and Llama-2-70B on 8 H100 nodes."""
    tight = a100(2, "nvlink")
    tight = tight.replace(name=f"{tight.name}-20.8GiB", device_memory_bytes=20.8 * 2**30)
    return [
        Workload("llama-7b", a100(2, "nvlink"), 128),
        Workload("llama-7b", tight, 128),
        Workload("llama2-70b", h100(8), 128),
    ]


ALL_SPLITS = {("llama-7b", 2), ("llama-7b", 4)}
"""(model, pp) where ``--all-splits`` searches every split (the others: too many splits x
fronts)."""


def check(w: Workload, pp: int, all_splits: bool) -> dict:
    """One row: the MILP's plan for this ``pp`` and the DP's optimum on its split (and on all)."""
    g = graph_of(w)
    B = w.global_batch_size
    t0 = time.perf_counter()
    plan = plan_graph(g, w.cluster, global_batch_size=B, pp_degrees=[pp])
    milp_s = time.perf_counter() - t0
    cm = CostModel(g, w.cluster)
    t = cm.tables(pp, plan.num_microbatches, B)
    stage_of, _ = cm.assignment(plan, t)
    milp = cm.evaluate(plan).time_per_iteration_s
    fixed = optimum(t, stage_of)
    row = {
        "workload": w.name,
        "pp": pp,
        "c": plan.num_microbatches,
        "L": t.num_layers,
        "K": t.num_strategies,
        "status": plan.solver.get("status"),
        "milp": milp,
        "milp_s": milp_s,
        "fixed": fixed.time_per_iteration_s,
        "fixed_s": fixed.wall_s,
        "labels": fixed.max_labels,
        "all": None,
        "all_s": None,
        "splits": None,
    }
    if all_splits and pp > 1 and (w.model, pp) in ALL_SPLITS:
        # Only assignments below the MILP's TPI (+1e-6) are looked for: the DP then either
        # finds the optimum itself (equal to the MILP's, or better: the MILP was not optimal)
        # or proves that nothing beats the MILP's plan by more than 1e-6.
        every = optimum(t, upper_bound_s=milp * (1 + 1e-6))
        row.update(all=every.time_per_iteration_s, all_s=every.wall_s, splits=every.splits_searched)
    return row


def _rel(a: float, b: float) -> str:
    if not (math.isfinite(a) and math.isfinite(b)):
        return "-"
    return f"{(b - a) / a:+.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--all-splits", action="store_true", help="also every split where affordable (ALL_SPLITS)"
    )
    ap.add_argument("--pp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--only", default=None, help="only workloads whose name contains this")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    print(
        "| workload | pp | c | layers | strategies | MILP status | MILP TPI (s) | DP TPI, MILP's "
        "split (s) | DP - MILP (rel) | DP TPI, every split (s) | splits | MILP s | DP s (split / "
        "every) | max labels |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for w in workloads():
        if args.only and args.only not in w.name:
            continue
        for pp in args.pp:
            r = check(w, pp, args.all_splits)
            every = "-" if r["all"] is None else f"{r['all']:.9g} ({_rel(r['milp'], r['all'])})"
            all_s = "" if r["all_s"] is None else f" / {r['all_s']:.1f}"
            print(
                f"| {r['workload']} | {pp} | {r['c']} | {r['L']} | {r['K']} | {r['status']} | "
                f"{r['milp']:.9g} | {r['fixed']:.9g} | {_rel(r['milp'], r['fixed'])} | {every} | "
                f"{r['splits'] or '-'} | "
                f"{r['milp_s']:.1f} | {r['fixed_s']:.1f}{all_s} | {r['labels']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
