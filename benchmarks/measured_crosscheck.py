"""Measured cross-check on this CPU machine: uniap's plan vs the best hand-set plan (pure DDP,
pure FSDP, Megatron-style; the one the cost model predicts fastest), measured step time of a
small GPT on 2 gloo processes.

    OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --nproc-per-node 2 \\
        benchmarks/measured_crosscheck.py [--steps 20] [--warmup 3]

Every rank builds the same model (same seed), derives the same hand-set plan from the
``cpu-2`` cluster's cost model, and runs ``--warmup`` + ``--steps`` AdamW steps with
``uniap.parallelize(plan=<hand-set>)`` and with ``plan=None`` (uniap plans on rank 0). Rank 0
prints the median iteration time (``train_step`` + optimizer step) of each and writes
``benchmarks/results/crosscheck.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import HANDSET_METHODS, handset, to_plan  # noqa: E402
from machine import machine, omp_threads  # noqa: E402

import uniap  # noqa: E402
from uniap.cluster import load_cluster  # noqa: E402
from uniap.cost_model import CostModel  # noqa: E402
from uniap.graph import build_graph  # noqa: E402
from uniap.models import build_model, example_batch, loss_fn_for  # noqa: E402

MODEL = "gpt-tiny"
OVERRIDES = {"dim": 256, "n_layers": 6, "seq_len": 64, "n_heads": 8}
"""A GPT a little bigger than gpt-tiny, so compute is not lost in overheads."""
GLOBAL_BATCH = 16
CLUSTER = "cpu-2"


def _model():
    return build_model(MODEL, device="cpu", seed=0, **OVERRIDES)


def best_handset(model, x0) -> tuple[str, uniap.Plan]:
    """The hand-set plan the cost model predicts fastest (deterministic on every rank)."""
    graph = build_graph(model, x0, name=getattr(model, "uniap_name", None))
    cm = CostModel(graph, load_cluster(CLUSTER))
    best = None
    for m in HANDSET_METHODS:
        r = handset(cm, GLOBAL_BATCH, m)
        if (
            r.found
            and r.fits
            and (best is None or r.time_per_iteration_s < best.time_per_iteration_s)
        ):
            best = r
    assert best is not None, "no hand-set plan fits"
    t = cm.tables(best.pp, best.num_microbatches, GLOBAL_BATCH)
    return f"{best.method} ({best.detail.split(';')[0]})", to_plan(
        cm, t, best.stage_of, best.strategy_of, GLOBAL_BATCH
    )


def measure(plan, steps: int, warmup: int) -> tuple[uniap.Plan, list[float]]:
    """Iteration times (train_step + optimizer step) after ``warmup`` steps."""
    model = _model()
    x0, _ = example_batch(model, GLOBAL_BATCH, seed=0)
    pm = uniap.parallelize(
        model,
        CLUSTER,
        global_batch_size=GLOBAL_BATCH,
        example_inputs=x0,
        loss_fn=loss_fn_for(MODEL),
        plan=plan,
    )
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    times = []
    for step in range(warmup + steps):
        x, y = example_batch(model, GLOBAL_BATCH, seed=step + 1)
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        pm.train_step(x, y)
        opt.step()
        dist.barrier()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return pm.plan, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "crosscheck.md"
    )
    args = ap.parse_args()
    model = _model()
    x0, _ = example_batch(model, GLOBAL_BATCH, seed=0)
    name, hand = best_handset(model, x0)
    hand_plan, hand_t = measure(hand, args.steps, args.warmup)
    uni_plan, uni_t = measure(None, args.steps, args.warmup)
    if dist.get_rank() == 0:
        rows = []
        for label, p, ts in (
            (f"best hand-set: {name}", hand_plan, hand_t),
            ("uniap", uni_plan, uni_t),
        ):
            pred = p.predicted.get("time_per_iteration_s", float("nan"))
            rows.append(
                f"| {label} | {p.summary().split(' | ')[0]} | {pred * 1e3:.1f} | "
                f"{statistics.median(ts) * 1e3:.1f} | {min(ts) * 1e3:.1f} | {max(ts) * 1e3:.1f} |"
            )
        ratio = statistics.median(hand_t) / statistics.median(uni_t)
        cfg = ", ".join(f"{k}={v}" for k, v in OVERRIDES.items())
        text = "\n".join(
            [
                "# Measured cross-check: uniap's plan vs the best hand-set plan (CPU, gloo)",
                "",
                f"machine: {machine(omp_threads())}",
                f"model: {MODEL} with {cfg}; global batch {GLOBAL_BATCH}; cluster {CLUSTER} "
                f"(2 processes); {args.warmup} warm-up + {args.steps} measured steps; iteration = "
                "train_step + AdamW step, between barriers.",
                "",
                "| plan | layout | predicted ms | measured median ms | min ms | max ms |",
                "|---|---|---|---|---|---|",
                *rows,
                "",
                f"measured speedup of uniap over the best hand-set plan (median): {ratio:.2f}x",
            ]
        )
        print(text, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
