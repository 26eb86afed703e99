"""What each widening of the strategy space buys: uniap's predicted throughput with the old
space (DDP and FSDP per layer, GPipe and 1F1B) against the whole space, per row, on the rows
where each new choice should win.

    .venv/bin/python benchmarks/strategy_space.py

Each row plans the same model, cluster, global batch and precision twice with the analytic
profile: ``old`` offers only the kinds and schedules uniap had before the space was widened,
``new`` everything uniap offers now (``uniap.contract.KINDS``, ``uniap.schedules.SCHEDULES``).
The table gives both predicted throughputs, their ratio, and the new plan; a row whose new
choice is not in the library (or whose cluster preset is missing) is printed as skipped with
the reason. Both plans are the planner's proven optimum of their space unless the status says
otherwise. Prints the machine it ran on.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from dataclasses import dataclass

import torch

from uniap import models
from uniap.cluster import list_presets, load_cluster
from uniap.contract import KINDS
from uniap.errors import InfeasibleError
from uniap.graph import build_graph
from uniap.planner import plan_graph
from uniap.schedules import SCHEDULES

OLD_KINDS = ("DDP", "FSDP")
OLD_SCHEDULES = ("GPipe", "1F1B")


@dataclass(frozen=True)
class Row:
    choice: str
    """The new choice the row is meant to show (a kind or a schedule name)."""
    why: str
    model: str
    cluster: str
    global_batch_size: int
    precision: str = "bf16-mixed"


ROWS = (
    Row("HSDP", "multi-node, slow inter-node links", "llama-7b", "a100-pcie-2x8", 64),
    Row("HSDP", "4 nodes of H100, large batch", "llama-7b", "h100-4x8", 512),
    Row(
        "ZeRO2",
        "Galvatron's Llama-7B inputs: 2 x 8 A100-40GB, batch 64",
        "llama-7b",
        "a100-2x8",
        64,
    ),
    Row("FSDP-offload", "does not fit without offload: 2 x 24 GB", "llama-7b", "rtx4090-1x2", 8),
    Row("Interleaved1F1B", "deep pipeline, many micro-batches", "llama-7b", "a100-pcie-2x8", 512),
)


def _plan(graph, cluster, row: Row, kinds, schedules, time_limit_s: float):
    t0 = time.perf_counter()
    try:
        p = plan_graph(
            graph,
            cluster,
            global_batch_size=row.global_batch_size,
            precision=row.precision,
            kinds=kinds,
            schedules=schedules,
            time_limit_s=time_limit_s,
        )
    except InfeasibleError:
        return None, "no plan fits", time.perf_counter() - t0
    return p, p.solver["status"], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--time-limit-s", type=float, default=60.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}, torch {torch.__version__}"
    )
    print(f"old space: kinds {list(OLD_KINDS)}, schedules {list(OLD_SCHEDULES)}")
    print(f"new space: kinds {list(KINDS)}, schedules {list(SCHEDULES)}")
    print()
    print("| new choice | row | model | cluster | B | old samples/s (status) | "
          "new samples/s (status) | new / old | new plan |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    graphs = {}
    for row in ROWS:
        head = f"| {row.choice} | {row.why} | {row.model} | {row.cluster} | {row.global_batch_size}"
        if row.choice not in KINDS and row.choice not in SCHEDULES:
            print(f"{head} | skipped: {row.choice} is not in uniap's space | | | |", flush=True)
            continue
        if row.cluster not in list_presets():
            print(f"{head} | skipped: no cluster preset {row.cluster} | | | |", flush=True)
            continue
        key = (row.model, row.precision)
        if key not in graphs:
            dtype = torch.float32 if row.precision == "fp32" else torch.bfloat16
            m = models.build_model(row.model, device="meta")
            ex = models.example_batch(m, 2, device="meta")[0]
            graphs[key] = build_graph(m, ex, name=row.model, dtype=dtype)
        graph, cluster = graphs[key], load_cluster(row.cluster)
        old, old_status, old_s = _plan(
            graph, cluster, row, OLD_KINDS, OLD_SCHEDULES, args.time_limit_s
        )
        new, new_status, new_s = _plan(graph, cluster, row, None, None, args.time_limit_s)

        def rate(p) -> float:
            return p.predicted["samples_per_s"] if p is not None else 0.0

        ratio = f"{rate(new) / rate(old):.2f}x" if old is not None and new is not None else "-"
        plan_text = new.summary().split(" | ")[0] if new is not None else "-"
        print(
            f"{head} | {rate(old):.2f} ({old_status}, {old_s:.1f} s) | "
            f"{rate(new):.2f} ({new_status}, {new_s:.1f} s) | {ratio} | {plan_text} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
