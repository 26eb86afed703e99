"""How far the cost model's interleaved 1F1B formula is from torch's order of operations.

This script plans each workload with interleaved 1F1B and with 1F1B at the same pipeline
degree, then replays each plan's predicted stage times through torch's order of operations
(:func:`uniap.plot.timeline`, its own event loop: every operation starts when its rank is
free and its input has arrived, the order :func:`uniap.schedules.interleaved_order` that a
unit test compares with torch's), and prints the predicted time next to the replayed one.
For 1F1B the cost model's formula is that replay's closed form. For interleaved 1F1B the cost
model once used a closed form over each rank's summed chunks, ``(sum p + sum o) / v + (c - 1 /
v) max_r P_r + max s + step``, exact only for equal chunks; the planner balanced those sums
and its plans replayed 1.27-1.33x slower than predicted at pp = 4 and 8 (benchmarks/README.md).
It now takes the longest path through that order, and this script checks they agree.

    .venv/bin/python benchmarks/interleaved_fidelity.py [--time-limit-s 20]
"""

from __future__ import annotations

import argparse
import logging
import time

from machine import machine

from uniap.planner import plan
from uniap.plot import timeline
from uniap.report import plan_report

# (model, cluster, global batch, pipeline degree)
WORKLOADS = [
    ("gpt-tiny", "cpu-4", 16, 2),
    ("llama-7b", "a100-2x8", 64, 2),
    ("llama-7b", "a100-2x8", 64, 4),
    ("llama-7b", "a100-2x8", 64, 8),
    ("llama-7b", "a100-2x8", 256, 4),
]


def replayed_s(p) -> float:
    """The plan's forwards and backwards replayed through its schedule's order, plus the
    once-per-iteration terms as predicted (the largest rank's gradient sync and optimizer step,
    the loss's all-reduce)."""
    r = plan_report(p)
    ops = timeline(p.schedule, p.num_microbatches, r["stage_detail"], p.virtual_stages)
    end = max(op[3] for row in ops for op in row if op[0] in "FBW")
    comm = r["communication_s"]
    return end + comm["dp_sync"] + comm["loss_all_reduce"] + r["time_breakdown_s"]["optimizer"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit-s", type=float, default=20.0, help="per program")
    args = ap.parse_args()
    logging.getLogger("uniap").setLevel(logging.ERROR)
    print(f"machine: {machine()}")
    print()
    print(
        "| model / cluster | B | pp | schedule | plan | predicted | replayed | replayed / "
        "predicted | solver |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    t0 = time.perf_counter()
    for model, cluster, batch, pp in WORKLOADS:
        for sched in ("1F1B", "Interleaved1F1B"):
            p = plan(
                model,
                cluster,
                global_batch_size=batch,
                schedules=[sched],
                pp_degrees=[pp],
                time_limit_s=args.time_limit_s,
            )
            pred = p.predicted["time_per_iteration_s"]
            rep = replayed_s(p)
            head = f"pp={p.pp_degree}" + (f" v={p.virtual_stages}" if p.virtual_stages > 1 else "")
            print(
                f"| {model} / {cluster} | {batch} | {pp} | {sched} | {head} "
                f"c={p.num_microbatches} | {pred:.4g} s | {rep:.4g} s | {rep / pred:.3f} | "
                f"{p.solver['status']} |",
                flush=True,
            )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
