"""Executor overhead: uniap's training step vs the same parallelism written by hand.

    .venv/bin/python benchmarks/executor_overhead.py                  # prints the table
    .venv/bin/python benchmarks/executor_overhead.py --out benchmarks/results/executor_overhead.md

For each fixed plan, on 2 CPU processes with gloo and a small GPT (``gpt-tiny`` at hidden 128,
4 blocks, sequence 64, global batch 16), both versions run the same iteration:
``zero_grad`` + forward/backward of the global batch + ``AdamW.step``. Hand-written:

* ``dp2 DDP``: ``torch.nn.parallel.DistributedDataParallel`` around the model, each rank its
  half of the batch;
* ``dp2 FSDP``: FSDP2 ``fully_shard`` on every layer, then on the root (torchtitan style);
* ``pp2 1F1B c4``: the model split by hand into two stages (embed + 2 blocks | 2 blocks +
  norm + head), ``PipelineStage`` + ``Schedule1F1B`` with 4 micro-batches;
* ``dp2 FSDP bf16-mixed``: as ``dp2 FSDP`` with FSDP2's ``MixedPrecisionPolicy(bf16, fp32)``
  on every state and the forward and loss under ``torch.autocast(bfloat16)`` (uniap:
  ``parallelize(..., precision="bf16-mixed")``);
* ``dp2 FSDP c4 root``: FSDP with 4 micro-batches per step (gradient accumulation), where the
  stage root matters (uniap: the model as the FSDP2 root of its layers, parameters kept
  unsharded and gradients unreduced until the last micro-batch). Hand-written, torchtitan's
  way: ``fully_shard(layer, reshard_after_forward=False)`` per layer, ``fully_shard(model)``,
  ``set_requires_gradient_sync(last)`` and ``set_reshard_after_backward(last)`` per
  micro-batch (the same collectives as uniap's), each loss divided by 4.

uniap runs ``parallelize(model, plan=...)`` + ``train_step``. The two alternate step by step
(after a barrier, so both ranks start together), ``--warmup`` untimed steps first, then the
median over ``--steps`` steps on rank 0. ratio = hand / uniap (1.0 = no overhead; the target
is >= 0.97). uniap's step also all-reduces the loss (the hand-written loops do not), which is
counted as overhead; it runs with ``ParallelModel``'s defaults (on CPU, no per-step memory
measurement: ``--measure-memory`` turns it on, to show what the saved-tensor hooks cost).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from machine import machine
from torch import nn

from uniap._dist import free_port

WORLD = 2
GLOBAL_BATCH = 16
MODEL_OVERRIDES = {"dim": 128, "n_layers": 4, "n_heads": 4, "seq_len": 64}
PLANS = ("dp2 DDP", "dp2 FSDP", "pp2 1F1B c4", "dp2 FSDP bf16-mixed", "dp2 FSDP c4 root")
BF16 = "dp2 FSDP bf16-mixed"
ACCUMULATE = "dp2 FSDP c4 root"
NUM_ACCUMULATE = 4


def _model() -> nn.Module:
    from uniap.models import build_model

    return build_model("gpt-tiny", device="cpu", seed=0, **MODEL_OVERRIDES)


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from uniap.models import example_batch

    return example_batch(_model_meta(), GLOBAL_BATCH, seed=seed)


_META: list[nn.Module] = []


def _model_meta() -> nn.Module:
    if not _META:
        from uniap.models import build_model

        _META.append(build_model("gpt-tiny", **MODEL_OVERRIDES))
    return _META[0]


def _plan(name: str, fqns: list[str], signature: str) -> Any:
    from uniap.contract import LayerStrategy, Plan, Stage, Strategy

    if name == "pp2 1F1B c4":
        half = len(fqns) // 2 - 1  # embed + 2 blocks | 2 blocks + norm + head
        stages = (
            Stage((0,), tuple(LayerStrategy(f, Strategy(1, 1, "DDP")) for f in fqns[: half + 1])),
            Stage((1,), tuple(LayerStrategy(f, Strategy(1, 1, "DDP")) for f in fqns[half + 1 :])),
        )
        c, schedule = 4, "1F1B"
    else:
        kind = name.split()[1]
        stages = (Stage((0, 1), tuple(LayerStrategy(f, Strategy(2, 1, kind)) for f in fqns)),)
        c, schedule = (NUM_ACCUMULATE if name == ACCUMULATE else 1), "1F1B"
    return Plan(
        model_name="gpt-tiny",
        model_signature=signature,
        num_layers=len(fqns),
        world_size=WORLD,
        global_batch_size=GLOBAL_BATCH,
        num_microbatches=c,
        schedule=schedule,
        stages=stages,
    )


# ------------------------------------------------------------------------------ hand-written
class _Chain(nn.Module):
    """Consecutive layers of the model, run in order (one pipeline stage)."""

    def __init__(self, model: nn.Module, fqns: list[str]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(model.get_submodule(f)) for f in fqns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _hand_written(name: str, model: nn.Module, fqns: list[str], loss_fn: Any) -> Any:
    """A ``step(x, y)`` closure (global batch in, local work done) and its optimizer."""
    rank = dist.get_rank()
    if name == "pp2 1F1B c4":
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        half = len(fqns) // 2 - 1
        part = _Chain(model, fqns[: half + 1] if rank == 0 else fqns[half + 1 :])
        stage = PipelineStage(part, rank, WORLD, torch.device("cpu"))
        sched = Schedule1F1B(stage, n_microbatches=4, loss_fn=loss_fn)
        opt = torch.optim.AdamW(part.parameters(), lr=1e-3)

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            opt.zero_grad()
            if rank == 0:
                sched.step(x)
            else:
                sched.step(target=y, losses=[])
            opt.step()

        return step
    local = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
    if name == "dp2 DDP":
        wrapped: nn.Module = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
    else:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy()
        if name == BF16:
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        wrapped = copy.deepcopy(model)
        for f in fqns:
            fully_shard(
                wrapped.get_submodule(f), mp_policy=mp, reshard_after_forward=name != ACCUMULATE
            )
        fully_shard(wrapped, mp_policy=mp, reshard_after_forward=name != ACCUMULATE)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if name == BF16 else contextlib.nullcontext()
    )

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad()
        if name == ACCUMULATE:
            xs, ys = x[local].chunk(NUM_ACCUMULATE), y[local].chunk(NUM_ACCUMULATE)
            for m, (xm, ym) in enumerate(zip(xs, ys, strict=True)):
                last = m == NUM_ACCUMULATE - 1
                wrapped.set_requires_gradient_sync(last)
                wrapped.set_reshard_after_backward(last)
                (loss_fn(wrapped(xm), ym) / NUM_ACCUMULATE).backward()
        else:
            with autocast:
                loss = loss_fn(wrapped(x[local]), y[local])
            loss.backward()
        opt.step()

    return step


def _uniap(
    name: str, model: nn.Module, fqns: list[str], loss_fn: Any, signature: str, measure: bool
) -> Any:
    from uniap.api import parallelize

    x0, _ = _batch(0)
    if name == BF16:  # the model's signature at its compute dtype
        from uniap.graph import build_graph

        signature = build_graph(model, x0, name="gpt-tiny", dtype=torch.bfloat16).signature
    plan = _plan(name, fqns, signature)
    pm = parallelize(
        model,
        plan=plan,
        loss_fn=loss_fn,
        global_batch_size=GLOBAL_BATCH,
        example_inputs=x0,
        precision="bf16-mixed" if name == BF16 else None,
    )
    pm.measure_memory = measure or pm.measure_memory
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad()
        pm.train_step(x, y)
        opt.step()

    return step, plan.summary()


# ------------------------------------------------------------------------------ per rank
def _worker(rank: int, port: int, out: str, warmup: int, steps: int, measure: bool) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from uniap._dist import init_local_worker

    init_local_worker(rank, WORLD, port, backend="gloo", timeout_s=300)
    from uniap.graph import build_graph
    from uniap.models import loss_fn_for

    model = _model()
    loss_fn = loss_fn_for("gpt-tiny")
    graph = build_graph(model, _batch(0)[0], name="gpt-tiny")
    fqns = list(graph.fqns)
    rows = []
    for name in PLANS:
        hand = _hand_written(name, model, fqns, loss_fn)
        mine, summary = _uniap(name, model, fqns, loss_fn, graph.signature, measure)
        times: dict[str, list[float]] = {"hand": [], "uniap": []}
        for i in range(warmup + steps):
            x, y = _batch(i)
            for label, fn in (
                (("hand", hand), ("uniap", mine)) if i % 2 else (("uniap", mine), ("hand", hand))
            ):
                dist.barrier()
                t0 = time.perf_counter()
                fn(x, y)
                dt = time.perf_counter() - t0
                if i >= warmup:
                    times[label].append(dt)
        # a step ends when the slowest rank ends: take the max over ranks per step
        t = torch.tensor([times["hand"], times["uniap"]], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        hand_s, uniap_s = statistics.median(t[0].tolist()), statistics.median(t[1].tolist())
        rows.append({"plan": name, "uniap_plan": summary, "hand_s": hand_s, "uniap_s": uniap_s})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30, help="timed steps (>= 20)")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    ap.add_argument(
        "--measure-memory",
        action="store_true",
        help="uniap measures every step's peak memory (on CPU: saved-tensor hooks)",
    )
    args = ap.parse_args()
    if args.steps < 20:
        print("executor_overhead.py: error: --steps must be >= 20", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.start_processes(
            _worker,
            args=(free_port(), out, args.warmup, args.steps, args.measure_memory),
            nprocs=WORLD,
            join=True,
            start_method="spawn",
        )
        rows = json.loads(Path(out).read_text())
    load = os.getloadavg()
    lines = [
        "# Executor overhead: uniap vs hand-written torch.distributed",
        "",
        f"Machine: {machine()}; CPU gloo, world {WORLD}, 1 thread per process; "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min).",
        f"Model: gpt-tiny with {MODEL_OVERRIDES}, global batch {GLOBAL_BATCH}; "
        f"{args.warmup} warm-up steps, median of {args.steps} alternating steps "
        "(max over ranks per step); a step = zero_grad + forward/backward + AdamW.step; "
        "uniap's per-step memory measurement "
        f"{'on' if args.measure_memory else 'off (default on CPU)'}.",
        "",
        "| plan | uniap plan | hand-written median s | uniap median s | ratio hand/uniap |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['plan']} | `{r['uniap_plan']}` | {r['hand_s']:.4f} | {r['uniap_s']:.4f} | "
            f"{r['hand_s'] / r['uniap_s']:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
