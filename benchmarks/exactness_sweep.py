"""Exhaustive sweep of the planner under tight memory (see :mod:`uniap.exactness`).

Random chains of 3-8 layers of different sizes and tiny presets, on 4 and 8 devices, with
and without recompute, TP up to 1 or 2, 1F1B and GPipe; for each, the planner is asked at every
memory limit where the optimum changes and just below it, and compared with the enumeration.

    .venv/bin/python benchmarks/exactness_sweep.py --models 60          # ~2,000 limits
    .venv/bin/python benchmarks/exactness_sweep.py --models 4 --quick   # a smoke run

Prints one row per model and a summary; exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np
import torch
from machine import machine
from torch import nn

from uniap import models
from uniap.cluster import Cluster
from uniap.exactness import MLP, small_cluster, sweep
from uniap.graph import build_graph


def cluster(nodes: int, per_node: int, rng: np.random.Generator) -> Cluster:
    return small_cluster(
        nodes,
        per_node,
        gflops=int(rng.choice([20, 50, 200])),
        intra_gb_s=int(rng.choice([1, 2, 10])),
        inter_gbit_s=int(rng.choice([1, 10])),
    )


def random_instance(seed: int):
    """(name, graph, cluster, global batch, planner options) of one random instance."""
    rng = np.random.default_rng(seed)
    nodes, per_node = [(8, 1), (4, 1), (2, 4), (8, 1), (2, 2)][seed % 5]
    n = nodes * per_node
    max_tp = 1 if n == 8 or rng.random() < 0.5 else 2
    if seed % 7 == 3:  # a tiny preset
        name = str(rng.choice(["gpt-tiny", "t5-tiny", "bert-tiny"]))
        over = {"n_layers": 2, "n_decoder_layers": 2} if name == "t5-tiny" else {}
        with torch.device("meta"):
            m = models.build_model(name, device="meta", **over)
        x = models.example_batch(m, 2, device="meta")[0]
    else:
        L = int(rng.integers(3, 9 if max_tp == 1 else 7))
        blocks = []
        for _ in range(L):
            if rng.random() < 0.25:
                blocks.append(nn.LayerNorm(64))
            else:
                blocks.append(MLP(64, int(rng.choice([64, 128, 256, 512, 1024]))))
        with torch.device("meta"):
            m = nn.Sequential(*blocks)
        x = torch.empty(2, int(rng.choice([8, 16, 64])), 64, device="meta")
        name = f"chain{L}"
    graph = build_graph(m, x, name=name)
    opts = {
        "max_tp": max_tp,
        "recompute": bool(rng.random() < 0.5),
        "schedules": [["1F1B"], ["GPipe"], ["GPipe", "1F1B"]][int(rng.integers(0, 3))],
    }
    return name, graph, cluster(nodes, per_node, rng), int(rng.choice([8, 16])), opts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=60, help="random instances (default 60)")
    ap.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    ap.add_argument("--quick", action="store_true", help="at most 8 limits per instance")
    args = ap.parse_args()
    logging.getLogger("uniap").setLevel(logging.ERROR)
    print(f"# machine: {machine()}")
    print(
        f"{'seed':>4} {'model':<10} {'devices':<7} {'opts':<34} {'limits':>6} {'bad':>4} "
        f"{'wall_s':>7}"
    )
    total = bad = skipped = 0
    t_all = time.perf_counter()
    for seed in range(args.seed, args.seed + args.models):
        name, graph, cl, B, opts = random_instance(seed)
        t0 = time.perf_counter()
        o = f"tp<={opts['max_tp']} rc={int(opts['recompute'])} {'+'.join(opts['schedules'])} B={B}"
        try:
            res = sweep(
                graph, cl, global_batch_size=B, max_checks=8 if args.quick else None, **opts
            )
        except ValueError as e:  # more assignments than the enumeration takes: nothing to check
            if not str(e).startswith("too many assignments"):
                raise
            skipped += 1
            print(f"{seed:>4} {name:<10} {cl.name:<7} {o:<34} skipped: {e}")
            continue
        wrong = [r for r in res if not r.ok]
        total, bad = total + len(res), bad + len(wrong)
        print(
            f"{seed:>4} {name:<10} {cl.name:<7} {o:<34} {len(res):>6} {len(wrong):>4} "
            f"{time.perf_counter() - t0:>7.1f}"
        )
        for r in wrong:
            print(
                f"     MISMATCH limit={r.memory_limit_bytes:.0f} B expected={r.expected_s:.6g} "
                f"got={r.got_s:.6g} ({r.status})"
            )
        sys.stdout.flush()
    print(
        f"# {args.models} instances ({skipped} too large to enumerate, skipped), {total} memory "
        f"limits, {bad} mismatches, {time.perf_counter() - t_all:.0f} s"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
