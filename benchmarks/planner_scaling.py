"""Planner scaling: UOP wall time, programs solved, chosen plan and predicted throughput for the
paper's models on 8, 16 and 32 GPUs and Llama-2-70B on 64 to 1024 H100s (analytic profiles).

    .venv/bin/python benchmarks/planner_scaling.py            # full table
    .venv/bin/python benchmarks/planner_scaling.py --quick    # two rows

Prints a markdown table and the machine it ran on. Times are wall-clock on this machine;
"trace" is the one-off meta-device trace of the model, "UOP" the search itself.
"""

from __future__ import annotations

import argparse
import logging
import resource
import time

import torch
from machine import machine

from uniap import models
from uniap.cluster import load_cluster
from uniap.graph import build_graph
from uniap.planner import plan_graph

PAPER_MODELS = ["bert-huge", "vit-huge", "t5-large", "swin-huge", "llama-7b"]
CLUSTERS = [("a100-1x8", 64), ("a100-2x8", 128), ("h100-4x8", 256)]


def h100(nodes: int):
    return load_cluster("h100-128x8").replace(name=f"h100-{nodes}x8", num_nodes=nodes)


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--time-limit-s", type=float, default=60.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = [(m, load_cluster(c), b) for m in PAPER_MODELS for c, b in CLUSTERS]
    rows += [("llama2-70b", h100(n), 2 * n * 8) for n in (8, 32, 128)]
    if args.quick:
        rows = [rows[len(CLUSTERS) * 4 + 1], rows[-1]]
    graphs: dict[str, tuple] = {}
    print(f"machine: {machine()}")
    print()
    print(
        "| model | cluster | devices | global batch | trace s | UOP s | programs | plan | "
        "samples/s | status |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, cluster, batch in rows:
        if name not in graphs:
            t0 = time.perf_counter()
            m = models.build_model(name, device="meta")
            g = build_graph(
                m, models.example_batch(name, 2, device="meta")[0], name=name, dtype=torch.bfloat16
            )
            graphs[name] = (g, time.perf_counter() - t0)
        g, trace_s = graphs[name]
        t0 = time.perf_counter()
        p = plan_graph(g, cluster, global_batch_size=batch, time_limit_s=args.time_limit_s)
        wall = time.perf_counter() - t0
        print(
            f"| {name} | {cluster.name} | {cluster.world_size} | {batch} | {trace_s:.2f} | "
            f"{wall:.2f} | {p.solver['milps_solved']} | {p.summary().split(' | ')[0]} | "
            f"{p.predicted['samples_per_s']:.1f} | {p.solver['status']} |",
            flush=True,
        )
    print()
    print(f"peak resident memory of the whole process (torch included): {rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
