"""Train the tiny GPT with a plan uniap finds (or one you give), on 4 CPU processes.

    torchrun --nproc-per-node 4 examples/train_gpt.py --steps 5
    torchrun --nproc-per-node 4 examples/train_gpt.py --plan plan.yaml    # a saved plan
    uniap plan --model gpt-tiny --cluster cpu-4 --global-batch-size 16 --out plan.yaml

Rank 0 plans ``gpt-tiny`` for the cluster (``cpu-4`` on CPU with 4 processes, else the detected
one) and broadcasts the plan; every rank applies its share of it; then ``--steps`` AdamW steps
on synthetic next-token batches. Rank 0 prints, per step, the loss, the time of
``train_step`` and the iteration time (``train_step`` + optimizer step) next to the plan's
predicted time per iteration, and at the end the measured peak memory of its stage next to
the prediction. Without a GPU it runs on CPU with gloo (set ``OMP_NUM_THREADS=1`` on small
machines). Bad input prints one line, ``train_gpt.py: error: ...``, and exits with code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import NoReturn

import torch
import torch.distributed as dist

import uniap
from uniap.errors import InfeasibleError, UniapError
from uniap.models import build_model, example_batch, loss_fn_for

MODEL = "gpt-tiny"
GLOBAL_BATCH = 16
SEED = 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _fail(message)


def _fail(message: str) -> NoReturn:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"train_gpt.py: error: {message}", file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(2)


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = _Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    ap.add_argument("--plan", default=None, help="a plan file (.yaml/.json); default: plan now")
    ap.add_argument(
        "--cluster", default=None, help="cluster preset or YAML (default: cpu-4 / detected)"
    )
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("-v", "--verbose", action="store_true", help="log what uniap decides (INFO)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        _fail(f"--steps must be at least 1, got {args.steps}")
    if args.plan is not None and not os.path.exists(args.plan):
        _fail(f"--plan {args.plan!r}: no such file")
    return args


def _cluster(spec: str | None) -> str | uniap.Cluster:
    if spec is not None:
        return spec
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not torch.cuda.is_available() and world == 4:
        return "cpu-4"
    return uniap.Cluster.detect()


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    model = build_model(MODEL, device="cpu", seed=SEED)
    loss_fn = loss_fn_for(MODEL)
    x0, _ = example_batch(MODEL, GLOBAL_BATCH, seed=0)
    pm = uniap.parallelize(
        model,
        _cluster(args.cluster),
        global_batch_size=GLOBAL_BATCH,
        example_inputs=x0,
        loss_fn=loss_fn,
        plan=args.plan,
    )
    pm.measure_memory = True  # on CPU too, to print measured next to predicted memory
    rank = dist.get_rank()
    plan = pm.plan
    predicted_tpi = plan.predicted.get("time_per_iteration_s")
    if rank == 0:
        print(plan.describe(), flush=True)
        print(
            f"\ntraining {MODEL} for {args.steps} steps on {dist.get_world_size()} processes "
            f"({pm.device.type}), global batch {GLOBAL_BATCH}",
            flush=True,
        )
    opt = torch.optim.AdamW(pm.param_groups(), lr=args.lr, foreach=True)
    for step in range(1, args.steps + 1):
        x, y = example_batch(MODEL, GLOBAL_BATCH, seed=step)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = pm.train_step(x, y)
        opt.step()
        tpi = time.perf_counter() - t0
        if rank == 0:
            pred = f"{predicted_tpi:.4f} s" if isinstance(predicted_tpi, float) else "n/a"
            print(
                f"step {step:3d} | loss {loss:.4f} | train_step {pm.last_step_time_s:.4f} s | "
                f"TPI predicted {pred}, measured {tpi:.4f} s",
                flush=True,
            )
    if rank == 0:
        predicted_mem = plan.predicted.get("peak_memory_bytes") or []
        pred = (
            _fmt_bytes(predicted_mem[pm.stage_index])
            if pm.stage_index < len(predicted_mem)
            else "n/a"
        )
        print(
            f"peak memory of rank 0 (stage {pm.stage_index}): predicted {pred}, measured "
            f"{_fmt_bytes(pm.peak_memory_bytes)} ({pm.memory_breakdown})",
            flush=True,
        )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (UniapError, InfeasibleError) as e:
        _fail(str(e))
