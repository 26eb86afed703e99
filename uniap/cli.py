"""``uniap`` command line: thin wrappers over the public API.

    uniap plan --model llama-7b --cluster a100-2x8 --global-batch-size 64 [--out plan.yaml]
    uniap show plan.yaml
    uniap profile --model gpt-tiny [--cluster cpu-2] --global-batch-size 16 --out profile.yaml
    uniap plan --model gpt-tiny --cluster cpu-2 --global-batch-size 16 --profile profile.yaml
    uniap models | clusters
    uniap demo                    # plan the demo model on cpu-4, then train it on 4 processes
    torchrun --nproc-per-node 2 -m uniap.cli profile --model gpt-tiny --out profile.yaml

Bad input prints one line, ``uniap: error: ...``, and exits with code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from uniap.errors import InfeasibleError, UniapError
from uniap.schedules import SCHEDULES

__all__ = ["main"]

DEMO_MODEL = "gpt-tiny"
DEMO_CLUSTER = "cpu-4"
DEMO_BATCH = 16


def _cmd_plan(args: argparse.Namespace) -> int:
    from uniap.models import resolve_model
    from uniap.planner import plan

    model, example = resolve_model(args.model)
    profile = None
    if args.profile:
        from uniap.profiles import MeasuredProfile

        profile = MeasuredProfile.load(args.profile)
    p = plan(model, args.cluster, global_batch_size=args.global_batch_size, example_inputs=example,
             dtype=args.dtype, time_limit_s=args.time_limit_s, profile=profile, seq_len=args.seq_len,
             schedules=[args.schedule] if args.schedule else None,
             progress=None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True)))
    print(p.describe())
    if args.out:
        (p.to_json if args.out.endswith(".json") else p.to_yaml)(args.out)
        print(f"plan written to {args.out}")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    """Measure the model and the launched cluster into a profile YAML. Under ``torchrun``
    every rank measures (:func:`_profile_on_ranks`); run plainly, it launches ``torchrun
    --nproc-per-node N`` on itself (``N`` = ``--nproc``, else the cluster's devices, else 2)
    with one thread per process. An existing ``--out`` made for the same model, machine,
    library versions and batches is reused (``--force`` measures again). Rank 0 shows
    progress on stderr and writes the file."""
    if "LOCAL_RANK" not in os.environ:
        return _launch_profile(args)
    return _profile_on_ranks(args)


def _forwarded_profile_args(args: argparse.Namespace) -> list[str]:
    argv = ["--model", args.model, "--global-batch-size", str(args.global_batch_size),
            "--out", args.out, "--warmup", str(args.warmup), "--repeats", str(args.repeats)]  # fmt: skip
    if args.cluster:
        argv += ["--cluster", args.cluster]
    if args.batches:
        argv += ["--batches", args.batches]
    if args.force:
        argv.append("--force")
    if args.quiet:
        argv.append("--quiet")
    return argv


def _launch_profile(args: argparse.Namespace) -> int:
    from uniap._dist import free_port
    from uniap.cluster import load_cluster
    from uniap.models import resolve_model

    resolve_model(args.model)  # a bad name fails before launching
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
    port = args.port or free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(port), "-m", "uniap.cli", "profile", *_forwarded_profile_args(args)]  # fmt: skip
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if not args.quiet:
        print(f"launching {nproc} processes: torchrun --nproc-per-node {nproc} -m uniap.cli profile ...",
              file=sys.stderr, flush=True)  # fmt: skip
    rc = subprocess.call(cmd, env=env)
    return 0 if rc == 0 else 2


def _profile_on_ranks(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from uniap import models
    from uniap._dist import default_device, init_from_env
    from uniap.cluster import Cluster, load_cluster
    from uniap.errors import ConfigError
    from uniap.graph import build_graph
    from uniap.profiler import collect_profile
    from uniap.profiles import MeasuredProfile

    t0 = time.perf_counter()
    rank = int(os.environ.get("RANK", "0"))
    verbose = rank == 0 and not args.quiet

    def say(msg: str) -> None:
        if verbose:
            print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    spec, example = models.resolve_model(args.model)
    cluster = load_cluster(args.cluster) if args.cluster else Cluster.detect()
    device = default_device()
    batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    if isinstance(spec, str):
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
                say(f"{out} matches {graph.name} on this machine: reused (--force to measure again)")
                return 0
        except ConfigError as e:
            say(f"{out} is stale, measuring again ({e})")
    init_from_env(timeout_s=600)
    try:
        say(f"profiling {graph.name} ({graph.num_layers} layers) on {dist.get_world_size()} ranks, "
            f"{cluster.name}")  # fmt: skip
        profile = collect_profile(
            model, example, graph=graph, cluster=cluster, global_batch_size=args.global_batch_size,
            device=device, batches=batches, warmup=args.warmup, repeats=args.repeats,
            progress=say, targets=targets, loss_fn=loss_fn,
        )  # fmt: skip
        if rank == 0:
            profile.to_yaml(out)
            if not args.quiet:
                print(profile.summary())
            say(f"profile written to {out}")
    finally:
        dist.destroy_process_group()
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from uniap.contract import Plan

    p = Plan.load(args.plan)
    print(p.describe())
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from uniap import models

    print("\n".join(models.list_models()))
    return 0


def _cmd_clusters(args: argparse.Namespace) -> int:
    from uniap.cluster import list_presets, load_cluster

    for name in list_presets():
        print(load_cluster(name).describe())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from uniap.planner import plan

    print(f"== planning {DEMO_MODEL} on the {DEMO_CLUSTER} preset (global batch {DEMO_BATCH})")
    p = plan(DEMO_MODEL, DEMO_CLUSTER, global_batch_size=DEMO_BATCH)
    example = Path(__file__).resolve().parent.parent / "examples" / "train_gpt.py"
    if args.plan_only or not example.exists():
        print(p.describe())
        return 0
    with tempfile.TemporaryDirectory(prefix="uniap-demo-") as tmp:
        plan_file = Path(tmp) / "plan.yaml"
        p.to_yaml(plan_file)
        print(f"plan: {p.summary()}")
        print(f"\n== training {DEMO_MODEL} on 4 CPU processes (gloo): "
              f"torchrun --nproc-per-node 4 {example.name} --plan plan.yaml")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port",
               str(args.port), str(example), "--steps", str(args.steps), "--plan", str(plan_file)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.call(cmd, env=env)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (exit 2), without the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see `{self.prog} --help`)\n")


def _one_line(message: object) -> str:
    """The message with line breaks and other control characters escaped, so an error is
    always exactly one line (a key such as ``"\\r"`` in a user's file must not split it)."""
    text = str(message)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="uniap", description="Automatic parallelism for PyTorch (UniAP).")
    ap.add_argument("-v", "--verbose", action="store_true", help="log decisions (INFO)")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    p = sub.add_parser("plan", help="find the fastest plan that fits")
    p.add_argument("--model", required=True, help="preset name (see `uniap models`) or module:function")
    p.add_argument("--cluster", required=True, help="preset name (see `uniap clusters`) or a YAML file")
    p.add_argument("--global-batch-size", type=int, required=True)
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the model's)")
    p.add_argument("--schedule", choices=list(SCHEDULES), default=None,
                   help="restrict to one schedule: " + "; ".join(f"{s.name}: {s.description}" for s in SCHEDULES.values()))
    p.add_argument("--time-limit-s", type=float, default=60.0, help="per program solved")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length of a text preset")
    p.add_argument("--profile", default=None, help="a measured profile YAML")
    p.add_argument("--out", default=None, help="write the plan (.yaml or .json)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(fn=_cmd_plan)
    pr = sub.add_parser("profile", help="measure the model and the cluster into a profile YAML")
    pr.add_argument("--model", required=True, help="preset name (see `uniap models`) or module:function")
    pr.add_argument("--cluster", default=None,
                    help="preset or YAML with the launched world size (default: detected)")
    pr.add_argument("--global-batch-size", type=int, default=16,
                    help="the batch the plans will use: local batches measured are its divisors")
    pr.add_argument("--out", required=True, help="profile YAML to write (reused when it matches)")
    pr.add_argument("--nproc", type=int, default=None,
                    help="processes to launch when not under torchrun (default: the cluster's devices, else 2)")
    pr.add_argument("--warmup", type=int, default=2)
    pr.add_argument("--repeats", type=int, default=5)
    pr.add_argument("--batches", default=None, help="comma-separated local batch sizes to time")
    pr.add_argument("--force", action="store_true", help="measure even if --out matches")
    pr.add_argument("--port", type=int, default=None, help="rendezvous port when launching")
    pr.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    pr.set_defaults(fn=_cmd_profile)
    s = sub.add_parser("show", help="print a plan file")
    s.add_argument("plan")
    s.set_defaults(fn=_cmd_show)
    sub.add_parser("models", help="list model presets").set_defaults(fn=_cmd_models)
    sub.add_parser("clusters", help="list cluster presets").set_defaults(fn=_cmd_clusters)
    d = sub.add_parser("demo", help="plan and train the demo model on 4 CPU processes")
    d.add_argument("--plan-only", action="store_true")
    d.add_argument("--steps", type=int, default=5)
    d.add_argument("--port", type=int, default=29517)
    d.set_defaults(fn=_cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except (UniapError, InfeasibleError) as e:
        print(f"uniap: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"uniap: error: {_one_line(f'{where}{e.strerror or e}')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("uniap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
