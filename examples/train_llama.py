"""Pretrain a Hugging Face Llama with uniap: built on the meta device, mixed precision, gradient
clipping, cosine learning rate with warmup, a checkpoint every N steps, resume from the latest.

    # 4 CPU processes, a tiny config (fp32 on CPU), checkpoints in /tmp/llama-ckpt
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 4 examples/train_llama.py --tiny \\
        --steps 20 --ckpt-every 5 --ckpt-dir /tmp/llama-ckpt
    # GPUs, unchanged: a real config (config.json of a Llama; default: Llama-2-7B's shape),
    # bf16-mixed, optionally from pretrained weights (a save_pretrained or DCP directory)
    torchrun --nproc-per-node 8 examples/train_llama.py --config llama/config.json \\
        --pretrained llama/ --global-batch-size 64 --seq-len 4096 --ckpt-dir /ckpt/llama

Run it again with the same ``--ckpt-dir`` and it resumes from the newest complete checkpoint
(model, optimizer, RNG, data position; the same plan when the world size is unchanged), so an
interrupted job finishes exactly as an uninterrupted one. ``--stop-after K`` ends the job after
K steps (an interruption, for trying a resume).

The model is built under ``torch.device("meta")`` (no memory); ``parallelize`` shards it there
and each rank allocates and initialises only its own shards (Llama's initialisation: normal
``initializer_range`` for linear and embedding weights, ones for the norms), or
``--pretrained`` fills them from a checkpoint, each rank reading only its slices. Precision:
``bf16-mixed`` on CUDA (bf16 compute, fp32 master weights, gradients and optimizer state),
``fp32`` on CPU (``--precision`` overrides). The data are random tokens (batch ``i`` is drawn
from a generator seeded with ``--seed`` and ``i``): nothing is downloaded.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import uniap
from uniap import checkpoint


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny config (2 layers, hidden 64)")
    ap.add_argument("--config", default=None, help="a Llama config.json or its directory")
    ap.add_argument("--pretrained", default=None, help="load these weights before training")
    ap.add_argument("--cluster", default=None, help="preset or YAML (default: detected)")
    ap.add_argument("--plan", default=None, help="a plan file (default: plan on rank 0)")
    ap.add_argument("--precision", default=None, help="default: bf16-mixed on CUDA, else fp32")
    ap.add_argument("--global-batch-size", type=int, default=None, help="tiny 8, else 32")
    ap.add_argument("--seq-len", type=int, default=None, help="tiny 32, else 2048")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup-steps", type=int, default=None, help="default: steps // 10")
    ap.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0, help="max global gradient norm")
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--ckpt-dir", default="checkpoints/llama")
    ap.add_argument("--stop-after", type=int, default=None, help="end after this many steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    tiny = args.tiny
    args.global_batch_size = args.global_batch_size or (8 if tiny else 32)
    args.seq_len = args.seq_len or (32 if tiny else 2048)
    if args.warmup_steps is None:
        args.warmup_steps = max(1, args.steps // 10)
    return args


def llama_config(args: argparse.Namespace) -> Any:
    """The model's config: tiny, read from a local file, or Llama-2-7B's shape."""
    import transformers

    if args.config is not None:
        return transformers.AutoConfig.from_pretrained(args.config)
    if args.tiny:
        return transformers.LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    return transformers.LlamaConfig()


def build_on_meta(config: Any) -> nn.Module:
    """The model on the meta device (shapes only); parallelize initialises each rank's shards,
    the rotary frequencies included (Hugging Face's own ``_init_weights`` recomputes them)."""
    import transformers

    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup to ``--lr``, then cosine decay to ``--min-lr-ratio * lr`` at the end."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cosine)


def batch(step: int, args: argparse.Namespace, vocab_size: int) -> dict[str, torch.Tensor]:
    """Batch ``step`` of the random token stream (the same on every rank and every run)."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    ids = torch.randint(vocab_size, (args.global_batch_size, args.seq_len), generator=g)
    return {"input_ids": ids, "labels": ids}


def make_optimizer(params: Any, args: argparse.Namespace) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay, foreach=True
    )


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    precision = args.precision or ("bf16-mixed" if cuda else "fp32")
    config = llama_config(args)
    model = build_on_meta(config)

    ckpt = checkpoint.latest(args.ckpt_dir)
    plan = args.plan
    if plan is None and ckpt is not None:
        saved = checkpoint.verify(ckpt).plan
        plan = saved if saved.world_size == world else None  # same world: keep its plan
    cluster = args.cluster or (f"cpu-{world}" if not cuda and world in (2, 4, 8) else None)
    pm = uniap.parallelize(
        model,
        None if plan is not None else cluster,
        plan=plan,
        global_batch_size=args.global_batch_size,
        example_inputs=batch(0, args, config.vocab_size),
        precision=precision,
        seed=args.seed,
    )
    rank = dist.get_rank()
    opt = make_optimizer(pm.param_groups(), args)
    start = 0
    if ckpt is not None:
        start = checkpoint.load(ckpt, pm, opt).data_position["next_step"]
        if rank == 0:
            print(f"resumed from {ckpt} at step {start}", flush=True)
    else:
        if args.pretrained is not None:
            checkpoint.load_pretrained(pm, args.pretrained)
        if rank == 0:
            origin = args.pretrained or "scratch"
            print(f"training from {origin} ({precision}): {pm.plan.summary()}", flush=True)

    end = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    for step in range(start, end):
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        loss = pm.train_step(batch(step, args, config.vocab_size))
        norm = float(pm.clip_grad_norm_(args.clip))
        opt.step()
        if rank == 0:
            print(f"step {step + 1} loss {loss!r} grad_norm {norm:.4f} lr {lr:.3e}", flush=True)
        done = step + 1
        if done % args.ckpt_every == 0 or done == args.steps:
            checkpoint.save(
                checkpoint.step_dir(args.ckpt_dir, done),
                pm,
                opt,
                step=done,
                data_position={"next_step": done},
            )
    if rank == 0:
        print(f"stopped after step {end}" if end < args.steps else "finished", flush=True)
    dist.barrier()  # every rank done with its collectives before the group goes away
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
