"""Worst-case search time: the planner over a grid of models, cluster sizes, global batch sizes
and precisions, every cell printed, the worst cell reported (not the median).

    .venv/bin/python benchmarks/search_grid.py             # the whole grid (about 90 cells)
    .venv/bin/python benchmarks/search_grid.py --quick     # one model, three sizes
    .venv/bin/python benchmarks/search_grid.py --models llama2-70b --devices 8   # some cells

Grid: Llama-7B, Llama-2-70B and a 128-layer Llama (Llama-7B's layer, 128 of them) on 8, 32,
64, 256 and 1024 H100s (nodes of 8), global batch 1x, 2x and 8x the device count, in
``bf16-mixed`` and ``fp32``. Each cell is the search (``plan_graph``) plus the model's one-off
meta-device trace (``build_graph``, done once per model and precision and added to every cell
of it, as a user planning a model from scratch pays it); the worst search alone is printed too.
Building the model on the meta device is the user's code, not timed; the process's first trace
pays torch's one-off warm-up, which is measured on a tiny model first and printed, not added.
Targets: <= 1 s per cell up to 32 devices, <= 10 s at 1024 devices, status optimal (gap 0).
Prints the machine it ran on and the load average (1 min) at each cell: on a shared machine
the wall times are upper bounds, so the CPU time of this process (``cpu s``, search plus
trace; HiGHS runs one thread, so on a quiet machine it is about the wall time) is printed
too. The solver's time limit is wall time: under load a cell can stop at it where a quiet
machine would have proven the optimum.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
from machine import machine

from uniap import models
from uniap.cluster import load_cluster
from uniap.errors import InfeasibleError
from uniap.graph import build_graph
from uniap.planner import plan_graph

MODELS = {
    "llama-7b": ("llama-7b", {}),
    "llama2-70b": ("llama2-70b", {}),
    "llama-128L": ("llama-7b", {"n_layers": 128}),
}
DEVICES = (8, 32, 64, 256, 1024)
BATCH_FACTORS = (1, 2, 8)
PRECISIONS = ("bf16-mixed", "fp32")
TARGET_S = {8: 1.0, 32: 1.0, 1024: 10.0}


def h100(devices: int):
    nodes = max(1, devices // 8)
    return load_cluster("h100-128x8").replace(name=f"h100-{nodes}x8", num_nodes=nodes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="llama-7b on 8, 32 and 1024 devices")
    ap.add_argument("--time-limit-s", type=float, default=60.0)
    ap.add_argument("--models", help=f"comma-separated subset of {list(MODELS)}")
    ap.add_argument("--devices", help=f"comma-separated subset of {list(DEVICES)}")
    ap.add_argument("--precisions", help=f"comma-separated subset of {list(PRECISIONS)}")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    names = ["llama-7b"] if args.quick else list(MODELS)
    devices = (8, 32, 1024) if args.quick else DEVICES
    if args.models:
        names = args.models.split(",")
        unknown = sorted(set(names) - set(MODELS))
        if unknown:
            ap.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    if args.devices:
        devices = tuple(int(d) for d in args.devices.split(","))
    precisions = tuple(args.precisions.split(",")) if args.precisions else PRECISIONS
    print(f"machine: {machine()}")
    t0 = time.perf_counter()
    tiny = models.build_model("gpt-tiny", device="meta")
    build_graph(tiny, models.example_batch(tiny, 2, device="meta")[0])
    warm_s = time.perf_counter() - t0
    print(f"process warm-up (first trace, a tiny model; not counted): {warm_s:.2f} s")
    print()
    print("| model | devices | global batch | precision | load | trace s | search s | total s | "
          "cpu s | status | gap | plan |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    worst: dict[int, tuple[float, str]] = {}
    worst_search: dict[int, tuple[float, str]] = {}
    worst_cpu: dict[int, tuple[float, str]] = {}
    misses = []
    for name in names:
        preset, overrides = MODELS[name]
        for precision in precisions:
            dtype = torch.float32 if precision == "fp32" else torch.bfloat16
            m = models.build_model(preset, device="meta", **overrides)
            inputs = models.example_batch(m, 2, device="meta")[0]
            t0, c0 = time.perf_counter(), time.process_time()
            g = build_graph(m, inputs, name=name, dtype=dtype)
            trace_s, trace_cpu_s = time.perf_counter() - t0, time.process_time() - c0
            for n in devices:
                for f in BATCH_FACTORS:
                    t0, c0 = time.perf_counter(), time.process_time()
                    try:
                        p = plan_graph(
                            g,
                            h100(n),
                            global_batch_size=f * n,
                            precision=precision,
                            time_limit_s=args.time_limit_s,
                        )
                        status, gap = p.solver["status"], p.solver.get("gap", float("nan"))
                        summary = p.summary().split(" | ")[0]
                    except InfeasibleError:  # proven: no plan of the space fits in memory
                        status, gap, summary = "infeasible", 0.0, "no plan fits (proven)"
                    search_s = time.perf_counter() - t0
                    cpu_s = time.process_time() - c0 + trace_cpu_s
                    total = search_s + trace_s
                    cell = f"{name} x {n} B={f * n} {precision}"
                    if total > worst.get(n, (0.0, ""))[0]:
                        worst[n] = (total, cell)
                    if search_s > worst_search.get(n, (0.0, ""))[0]:
                        worst_search[n] = (search_s, cell)
                    if cpu_s > worst_cpu.get(n, (0.0, ""))[0]:
                        worst_cpu[n] = (cpu_s, cell)
                    limit = TARGET_S.get(n)
                    if (limit is not None and total > limit) or status not in (
                        "optimal",
                        "infeasible",
                    ):
                        misses.append(f"{cell}: {total:.2f} s, {status}")
                    load = os.getloadavg()[0]
                    print(
                        f"| {name} | {n} | {f * n} | {precision} | {load:.1f} | {trace_s:.2f} | "
                        f"{search_s:.2f} | {total:.2f} | {cpu_s:.2f} | {status} | {gap:.2g} | "
                        f"{summary} |",
                        flush=True,
                    )
    print()
    for n in sorted(worst):
        target = f" (target {TARGET_S[n]:g} s)" if n in TARGET_S else ""
        print(
            f"worst cell at {n} devices: {worst[n][0]:.2f} s search + trace, {worst[n][1]}{target}"
            f"; worst search alone {worst_search[n][0]:.2f} s, {worst_search[n][1]}"
            f"; worst CPU time {worst_cpu[n][0]:.2f} s, {worst_cpu[n][1]}"
        )
    print("cells missing a target or not optimal:", "; ".join(misses) if misses else "none")


if __name__ == "__main__":
    main()
