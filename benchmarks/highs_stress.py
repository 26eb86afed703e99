"""Does HiGHS prove the true optimum of the program over runs on large tables? Solves of hard
pipelined tables under several seeds, cold and with a cutoff just above the best answer, each
checked against the best plan any solve of that table found.

    .venv/bin/python benchmarks/highs_stress.py              # 5 tables x 3 seeds x 2 (about 2 min)
    .venv/bin/python benchmarks/highs_stress.py --seeds 5
    .venv/bin/python benchmarks/highs_stress.py --option mip_feasibility_tolerance=1e-9

Tables: the 128-layer Llama (Llama-7B's layer, 128 of them) on 32 H100s (bf16, batch 64 and
256: pp = 4; fp32, batch 256: pp = 8) and on 1024 H100s (fp32, batch 8192, pp = 8), and
Llama-2-70B on 64 H100s (fp32, batch 512, pp = 8). Each solve is
``uniap.milp.solve(t, labels=False, program="runs", bottleneck_s=memory_bottleneck_bound(t))``
(what the planner builds for such a table, without its warm start), once without a cutoff and
once with the cutoff 1e-4 above the best plan of the table's cold solves. A solve is **wrong**
when HiGHS calls it optimal and its plan is slower (by more than 1e-9) than the best plan any
solve of the table found: those plans are evaluated by the cost model, so the best one is a
real assignment that the "optimal" one missed. ``--option name=value`` (repeatable) passes
HiGHS options on top of the program's own, to compare settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine  # noqa: E402
from search_grid import h100  # noqa: E402

from uniap import milp, models  # noqa: E402
from uniap.bounds import memory_bottleneck_bound  # noqa: E402
from uniap.cost_model import CostModel  # noqa: E402
from uniap.graph import build_graph  # noqa: E402
from uniap.precision import resolve_precision  # noqa: E402

TABLES = [  # (model preset, n_layers or None, devices, global batch, precision, pp, c)
    ("llama-7b", 128, 32, 64, "bf16-mixed", 4, 8),
    ("llama-7b", 128, 32, 256, "bf16-mixed", 4, 32),
    ("llama-7b", 128, 32, 256, "fp32", 8, 64),
    ("llama-7b", 128, 1024, 8192, "fp32", 8, 64),
    ("llama2-70b", None, 64, 512, "fp32", 8, 64),
]


def tables_of(
    preset: str, n_layers: int | None, n: int, batch: int, precision: str, pp: int, c: int
):
    over = {"n_layers": n_layers} if n_layers else {}
    m = models.build_model(preset, device="meta", **over)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    g = build_graph(m, models.example_batch(m, 2, device="meta")[0], dtype=dtype)
    cm = CostModel(g, h100(n), None, precision=resolve_precision(precision))
    return cm.tables(pp, c, batch, "1F1B", 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--time-limit-s", type=float, default=60.0)
    ap.add_argument("--option", action="append", default=[], help="HiGHS option name=value")
    args = ap.parse_args()
    extra = {}
    for opt in args.option:
        name, _, value = opt.partition("=")
        extra[name] = json.loads(value) if value[:1] in "-0123456789tf[{" else value
    if extra:
        base = milp._HiGHS.__init__

        def init(self, *a, **k):
            base(self, *a, **{**k, **extra})

        milp._HiGHS.__init__ = init
    print(f"machine: {machine()}")
    print(f"HiGHS options on top of the program's: {extra or 'none'}")
    print()
    print("| table | seed | cutoff | status | plan s | best s | wall s | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    wrong = total = 0
    wall_total = 0.0
    for spec in TABLES:
        preset, n_layers, n, batch, precision, pp, c = spec
        name = f"{'llama-128L' if n_layers else preset} x {n} B={batch} {precision} pp={pp} c={c}"
        t = tables_of(*spec)
        floor = memory_bottleneck_bound(t)
        runs = []
        for cutoff_rel in (None, 1e-4):
            best = min((r[3] for r in runs), default=float("inf"))
            cutoff = best * (1 + cutoff_rel) if cutoff_rel is not None else None
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                sol = milp.solve(
                    t,
                    labels=False,
                    program="runs",
                    bottleneck_s=floor,
                    incumbent_tpi_s=cutoff,
                    time_limit_s=args.time_limit_s,
                    seed=seed,
                )
                wall = time.perf_counter() - t0
                wall_total += wall
                runs.append((seed, cutoff, sol.status, sol.time_per_iteration_s, wall))
        best = min(r[3] for r in runs)
        for seed, cutoff, status, tpi, wall in runs:
            bad = status == "optimal" and tpi > best * (1 + 1e-9)
            wrong += bad
            total += 1
            cut = f"{cutoff:.6f}" if cutoff is not None else "-"
            print(
                f"| {name} | {seed} | {cut} | {status} | {tpi:.6f} | {best:.6f} | {wall:.2f} | "
                f"{'**wrong**' if bad else 'ok'} |",
                flush=True,
            )
    print()
    print(f"wrong optima: {wrong} of {total} solves; {wall_total:.1f} s of solves")


if __name__ == "__main__":
    main()
