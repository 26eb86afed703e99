"""Train gpt-tiny with a checkpoint every K steps; a restarted job resumes from the latest one.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc-per-node 4 \
        --max-restarts 1 examples/train_resumable.py \
        --ckpt-dir /tmp/uniap-ckpt --steps 20 --ckpt-every 5

(``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: with torch 2.13 restarted workers otherwise read the
previous attempt's addresses from the store torchrun shares with them; pytorch/pytorch#135712.)

Kill any rank mid-training (``kill -9``): torchrun restarts every worker, they find the
newest complete checkpoint with ``uniap.checkpoint.latest``, load it (model, optimizer, RNG,
data position) and finish; the result equals an uninterrupted run. Run it again after it
finished and it resumes at the end and does nothing. A peer that hangs makes the others fail
after ``--timeout-s`` seconds (the process group timeout) instead of waiting forever.

The data stream is addressed by position: batch ``i`` is ``example_batch(model, B, seed=1000 + i)``,
so the checkpoint's data position (the next batch index) is all a restart needs.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
import torch.distributed as dist

from uniap import checkpoint
from uniap.api import parallelize
from uniap.models import build_model, example_batch, loss_fn_for

LR, EPS = 1e-3, 1e-6


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt-tiny")
    ap.add_argument("--cluster", default=None, help="preset or YAML (default: cpu-<world size>)")
    ap.add_argument("--plan", default=None, help="a plan file (default: plan on rank 0)")
    ap.add_argument("--global-batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ckpt-every", type=int, default=5)
    ap.add_argument("--ckpt-dir", required=True)
    ap.add_argument("--timeout-s", type=float, default=60.0, help="process group timeout")
    ap.add_argument("--out", default=None, help="rank 0 writes the final full state dict here")
    ap.add_argument(
        "--step-delay-s", type=float, default=0.0, help="sleep per step (to watch a kill)"
    )
    return ap.parse_args()


def main() -> None:
    args = _args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("uniap.training").setLevel(
        logging.INFO
    )  # uniap's training log, every 10 steps
    world = int(os.environ.get("WORLD_SIZE", "1"))
    big_b = args.global_batch_size
    model = build_model(args.model, device="cpu", seed=0)
    example = example_batch(args.model, big_b, seed=1000)[0]

    ckpt = checkpoint.latest(args.ckpt_dir)
    plan = args.plan
    if plan is None and ckpt is not None:
        saved = checkpoint.verify(ckpt).plan
        plan = saved if saved.world_size == world else None  # same world: keep its plan
    pm = parallelize(
        model,
        None if plan is not None else (args.cluster or f"cpu-{world}"),
        plan=plan,
        global_batch_size=big_b,
        example_inputs=example,
        loss_fn=loss_fn_for(args.model),
        timeout_s=args.timeout_s,
    )
    opt = torch.optim.AdamW(pm.param_groups(), lr=LR, eps=EPS, foreach=True)
    rank = dist.get_rank()
    start = 0
    if ckpt is not None:
        meta = checkpoint.load(ckpt, pm, opt)
        start = meta.data_position["next_batch"]
        if rank == 0:
            restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            print(f"resumed from {ckpt} at step {start} (restart {restarts})", flush=True)
    elif rank == 0:
        print(f"training from scratch: {pm.plan.summary()}", flush=True)

    for step in range(start, args.steps):
        x, y = example_batch(args.model, big_b, seed=1000 + step)
        opt.zero_grad()
        loss = pm.train_step(x, y)
        opt.step()
        if rank == 0:
            print(f"step {step + 1} loss {loss!r}", flush=True)
        done = step + 1
        if done % args.ckpt_every == 0 or done == args.steps:
            checkpoint.save(
                checkpoint.step_dir(args.ckpt_dir, done),
                pm,
                opt,
                step=done,
                data_position={"next_batch": done},
            )
        time.sleep(args.step_delay_s)

    full = checkpoint.export_full_state_dict(pm)
    if rank == 0:
        if args.out:
            torch.save(full, args.out)
        print(f"finished {args.steps} steps", flush=True)
    dist.barrier()  # every rank done with its collectives before the group goes away
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
