"""Train the tiny GPT with a plan uniap finds (or one you give), on 4 CPU processes.

    torchrun --nproc-per-node 4 examples/train_gpt.py --steps 5
    torchrun --nproc-per-node 4 examples/train_gpt.py --plan plan.yaml    # a saved plan
    uniap plan --model gpt-tiny --cluster cpu-4 --global-batch-size 16 --out plan.yaml

Rank 0 plans ``gpt-tiny`` for the cluster (``cpu-4`` on CPU with 4 processes, else the detected
one) and broadcasts the plan; every rank applies its share of it; then ``--steps`` AdamW steps
on synthetic next-token batches. Rank 0 prints the plan, then uniap's training log every
step (``uniap.training`` logger): loss, iteration time next to the plan's predicted time per
iteration, samples/s and tokens/s, MFU against the cluster's peak, and the measured peak
memory of its stage next to the prediction. Without a GPU it runs on CPU with gloo (set
``OMP_NUM_THREADS=1`` on small machines). Bad input prints one line, ``train_gpt.py: error: ...``,
and exits with code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
from typing import NoReturn

import torch
import torch.distributed as dist

import uniap
from uniap.errors import InfeasibleError, UniapError
from uniap.models import build_model, example_batch, loss_fn_for
from uniap.report import plan_report, render_plan

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


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("uniap.training").setLevel(logging.INFO)
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
    pm.measure_memory = True  # on CPU too, to log measured next to predicted memory
    pm.training_log.every = 1  # uniap's training log, every step (rank 0)
    rank = dist.get_rank()
    plan = pm.plan
    if rank == 0:
        print(render_plan(plan_report(plan)), flush=True)
        print(
            f"\ntraining {MODEL} for {args.steps} steps on {dist.get_world_size()} processes "
            f"({pm.device.type}), global batch {GLOBAL_BATCH}",
            flush=True,
        )
    opt = torch.optim.AdamW(pm.param_groups(), lr=args.lr, foreach=True)
    for step in range(1, args.steps + 1):
        x, y = example_batch(MODEL, GLOBAL_BATCH, seed=step)
        opt.zero_grad()
        pm.train_step(x, y)  # logs the step on rank 0 (see uniap.training_log)
        opt.step()
    records = pm.training_log.records if pm.training_log is not None else []
    if rank == 0 and len(records) > 1:
        measured = statistics.median(
            r["iteration_s"] for r in records[1:]
        )  # the first step warms up
        predicted = records[-1]["predicted_iteration_s"]
        source = plan.provenance.get("profile", "?")
        print(
            f"\nmedian iteration {measured * 1e3:.1f} ms measured (steps 2-{len(records)}), "
            f"{predicted * 1e3:.1f} ms predicted ({100 * (measured / predicted - 1):+.0f}%) "
            f"from the {source} profile",
            flush=True,
        )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (UniapError, InfeasibleError) as e:
        _fail(str(e))
