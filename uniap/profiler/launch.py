"""``uniap profile``: measure a model and the launched cluster into a profile YAML.

Run under ``torchrun`` (every rank runs it), or plainly: it then launches
``torchrun --nproc-per-node N`` on itself (``N`` = ``--nproc``, else the cluster's devices,
else 2), with one thread per process on CPU::

    uniap profile --model gpt-tiny --cluster cpu-2 --global-batch-size 16 --out profile.yaml
    torchrun --nproc-per-node 2 -m uniap.cli profile --model gpt-tiny --out profile.yaml

An existing ``--out`` made for the same model, machine, library versions and batches is
reused (``--force`` measures again). Rank 0 shows progress on stderr and writes the file.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from uniap.errors import ConfigError, UniapError

__all__ = ["run_profile"]

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forwarded(args: argparse.Namespace) -> list[str]:
    argv = [
        "--model",
        args.model,
        "--global-batch-size",
        str(args.global_batch_size),
        "--out",
        args.out,
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
    ]
    if args.cluster:
        argv += ["--cluster", args.cluster]
    if args.batches:
        argv += ["--batches", args.batches]
    if args.force:
        argv.append("--force")
    if args.quiet:
        argv.append("--quiet")
    return argv


def _launch(args: argparse.Namespace) -> int:
    from uniap.cli import _resolve_model
    from uniap.cluster import load_cluster

    _resolve_model(args.model, args.global_batch_size)  # a bad name fails before launching
    nproc = args.nproc
    if args.cluster:
        cluster = load_cluster(args.cluster)
        if nproc is not None and nproc != cluster.world_size:
            raise UniapError(
                f"--nproc {nproc} but cluster {cluster.name!r} has {cluster.world_size} devices; "
                "drop --nproc or pass the matching cluster"
            )
        nproc = cluster.world_size
    nproc = nproc or 2
    port = args.port or _free_port()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(port),
        "-m",
        "uniap.cli",
        "profile",
        *_forwarded(args),
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if not args.quiet:
        print(
            f"launching {nproc} processes: torchrun --nproc-per-node {nproc} -m uniap.cli profile ...",
            file=sys.stderr,
            flush=True,
        )
    rc = subprocess.call(cmd, env=env)
    return 0 if rc == 0 else 2


def run_profile(args: argparse.Namespace) -> int:
    """The ``profile`` subcommand (see the module docstring); returns the exit code."""
    if "LOCAL_RANK" not in os.environ:
        return _launch(args)
    import torch
    import torch.distributed as dist

    from uniap.cli import _resolve_model
    from uniap.cluster import Cluster, load_cluster
    from uniap.executor import default_device
    from uniap.graph import build_graph
    from uniap.profiler.collect import collect_profile
    from uniap.profiler.measured import MeasuredProfile

    t0 = time.perf_counter()
    rank = int(os.environ.get("RANK", "0"))
    verbose = rank == 0 and not args.quiet

    def say(msg: str) -> None:
        if verbose:
            print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    spec, example = _resolve_model(args.model, args.global_batch_size)
    cluster = load_cluster(args.cluster) if args.cluster else Cluster.detect()
    device = default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    if isinstance(spec, str):
        from uniap import models

        name = spec
        model = models.build_model(spec, device="cpu", seed=0)
        example, targets = models.example_batch(spec, args.global_batch_size)
        loss_fn = models.loss_fn_for(spec)
    else:  # a user's model: no known loss, so the cost model's analytic loss memory
        model, name, targets, loss_fn = spec, None, None, None
    graph = build_graph(model, example, name=name)
    out = Path(args.out)
    if out.exists() and not args.force:
        try:
            old = MeasuredProfile.load(out)
            old.check_compatible(graph, cluster)
            same = batches is None or old.settings.get("batches") == sorted(batches)
            if same and old.settings.get("global_batch_size") == args.global_batch_size:
                say(
                    f"{out} matches {graph.name} on this machine: reused (--force to measure again)"
                )
                return 0
        except ConfigError as e:
            say(f"{out} is stale, measuring again ({e})")
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=600)
    )
    try:
        say(
            f"profiling {graph.name} ({graph.num_layers} layers) on {dist.get_world_size()} ranks, "
            f"{cluster.name}"
        )
        profile = collect_profile(
            model,
            example,
            graph=graph,
            cluster=cluster,
            global_batch_size=args.global_batch_size,
            device=device,
            batches=batches,
            warmup=args.warmup,
            repeats=args.repeats,
            progress=say,
            targets=targets,
            loss_fn=loss_fn,
        )
        if rank == 0:
            profile.to_yaml(out)
            if not args.quiet:
                print(profile.summary())
            say(f"profile written to {out}")
    finally:
        dist.destroy_process_group()
    return 0
