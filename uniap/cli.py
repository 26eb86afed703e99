"""``uniap`` command line: thin wrappers over the public API.

    uniap plan --model llama-7b --cluster a100-2x8 --global-batch-size 64 [--out plan.yaml]
        [--explain]
    uniap show plan.yaml [--layers] [--json] [--plot plan.png] [--html plan.html]
    uniap explain plan.yaml      # or the `uniap plan` arguments: plan, then explain
    uniap profile --model gpt-tiny [--cluster cpu-2] --global-batch-size 16 --out profile.yaml
    uniap plan --model gpt-tiny --cluster cpu-2 --global-batch-size 16 --profile profile.yaml
    uniap models | clusters
    uniap demo                    # profile, plan and train the demo model on 4 CPU processes

Every command's ``--help`` has a description and examples. Bad input prints one line,
``uniap: error: ...``, and exits with code 2.

One module: each command is a thin wrapper with its help text and two examples; the argument
definitions (a description and a default for every option) make up most of its length.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from uniap.contract import KINDS
from uniap.errors import InfeasibleError, UniapError
from uniap.schedules import SCHEDULES

__all__ = ["main"]

DEMO_MODEL = "gpt-tiny"
DEMO_CLUSTER = "cpu-4"
DEMO_BATCH = 16


def _schedule_list(text: str) -> list[str]:
    """``--schedule``: one name of :mod:`uniap.schedules` or several, comma-separated."""
    names = [n.strip() for n in text.split(",")]
    bad = [n for n in names if n not in SCHEDULES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {bad[0]!r} (choose from {', '.join(SCHEDULES)}, or several "
            "separated by commas)"
        )
    return names


def _stages_per_rank(text: str) -> list[int]:
    """``--virtual-stages``: stages per rank of the interleaved schedules, comma-separated."""
    try:
        vs = [int(n) for n in text.split(",")]
    except ValueError:
        vs = []
    if not vs or any(v < 2 for v in vs):
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: whole numbers of at least 2, separated by commas (e.g. 2,4)"
        )
    return vs


def _plan_from_args(args: argparse.Namespace):
    from uniap.models import resolve_model
    from uniap.planner import plan

    model, example = resolve_model(args.model)
    profile = None
    if args.profile:
        from uniap.profiles import MeasuredProfile

        profile = MeasuredProfile.load(args.profile)
    return plan(
        model,
        args.cluster,
        global_batch_size=args.global_batch_size,
        example_inputs=example,
        dtype=args.dtype,
        precision=args.precision,
        time_limit_s=args.time_limit_s,
        profile=profile,
        seq_len=args.seq_len,
        schedules=args.schedule,
        virtual_stages=args.virtual_stages,
        progress_interval_s=args.progress_interval_s,
        kinds=args.kinds.split(",") if args.kinds else None,
        sequence_parallel=args.sequence_parallel,
        vocab_parallel=not args.no_vocab_parallel,
    )


def _cmd_plan(args: argparse.Namespace) -> int:
    from uniap.explain import render_explain
    from uniap.report import plan_report, render_plan

    p = _plan_from_args(args)
    print(render_plan(plan_report(p)))
    if args.explain:
        print()
        print(render_explain(p))
    if args.out:
        (p.to_json if args.out.endswith(".json") else p.to_yaml)(args.out)
        print(f"plan written to {args.out}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from uniap.contract import Plan
    from uniap.explain import render_explain

    if args.plan:
        if args.model or args.cluster or args.global_batch_size:
            raise UniapError(
                "uniap explain: give a plan file, or --model/--cluster/--global-batch-size to plan "
                "and explain, not both"
            )
        p = Plan.load(args.plan)
    else:
        missing = [
            f"--{n.replace('_', '-')}"
            for n in ("model", "cluster", "global_batch_size")
            if not getattr(args, n)
        ]
        if missing:
            raise UniapError(
                f"uniap explain: give a plan file, or {', '.join(missing)} to plan first; "
                "e.g. uniap explain plan.yaml"
            )
        p = _plan_from_args(args)
    print(render_explain(p))
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
            "--out", args.out, "--warmup", str(args.warmup),
            "--repeats", str(args.repeats)]  # fmt: skip
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
           "--master-port", str(port),
           "-m", "uniap.cli", "profile", *_forwarded_profile_args(args)]  # fmt: skip
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if not args.quiet:
        print(f"launching {nproc} processes: torchrun --nproc-per-node {nproc} -m uniap.cli "
              "profile ...",
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
        # on the meta device: the profiler puts one layer at a time on the device
        model = models.build_model(spec, device="meta")
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
    import json

    from uniap.contract import Plan
    from uniap.report import plan_report, render_plan

    p = Plan.load(args.plan)
    cm = _cost_model_for(p, args) if args.model else None
    if args.cluster and not args.model:
        raise UniapError("uniap show: --cluster re-derives the costs with --model; give both")
    report = plan_report(p, cm)
    if args.plot:
        from uniap.plot import plot_plan

        plot_plan(p, args.plot, report=report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_plan(report, layers=args.layers))
    if args.plot:
        print(f"picture written to {args.plot}", file=sys.stderr if args.json else sys.stdout)
    if args.html:
        from uniap.plot import plan_html

        Path(args.html).write_text(plan_html(p, report=report))
        print(f"page written to {args.html}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _cost_model_for(p, args: argparse.Namespace):
    """The cost model of the plan's model on a cluster (``show --model/--cluster``)."""
    from uniap.cluster import load_cluster
    from uniap.cost_model import CostModel
    from uniap.graph import ModelGraph
    from uniap.models import resolve_model

    if not args.cluster:
        raise UniapError(
            "uniap show: --model needs --cluster (the cluster the plan was made for, "
            f"{p.provenance.get('cluster', 'see the plan file')})"
        )
    model, example = resolve_model(args.model)
    graph = _graph(model, example, args.seq_len, p.provenance.get("dtype"))
    assert isinstance(graph, ModelGraph)
    profile = None
    if args.profile:
        from uniap.profiles import MeasuredProfile

        profile = MeasuredProfile.load(args.profile)
    return CostModel(graph, load_cluster(args.cluster), profile, precision=p.precision)


def _graph(model, example, seq_len, dtype):
    import torch

    from uniap import models
    from uniap.graph import build_graph

    dt = getattr(torch, dtype) if dtype else None
    if isinstance(model, str):
        m = models.build_model(model, device="meta", **({"seq_len": seq_len} if seq_len else {}))
        return build_graph(m, models.example_batch(m, 2, device="meta")[0], name=model, dtype=dt)
    return build_graph(model, example, dtype=dt)


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
    """Profile the demo model on this machine (so the prediction is about this machine, not a
    datasheet), plan with that profile, then train with the plan and print measured next to
    predicted. ``--analytic`` skips the profile (the cpu-4 preset's datasheet numbers)."""
    from uniap.planner import plan

    example = Path(__file__).resolve().parent.parent / "examples" / "train_gpt.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="uniap-demo-") as tmp:
        profile = None
        if not args.analytic:
            profile_file = Path(tmp) / "profile.yaml"
            print(
                f"== profiling {DEMO_MODEL} on this machine (4 processes, gloo): uniap profile "
                f"--model {DEMO_MODEL} --cluster {DEMO_CLUSTER} --global-batch-size {DEMO_BATCH}",
                flush=True,
            )
            cmd = [
                sys.executable,
                "-m",
                "uniap",
                "profile",
                "--model",
                DEMO_MODEL,
                "--cluster",
                DEMO_CLUSTER,
                "--global-batch-size",
                str(DEMO_BATCH),
                "--out",
                str(profile_file),
                "--quiet",
            ]
            t0 = time.perf_counter()
            if subprocess.call(cmd, env=env) != 0 or not profile_file.exists():
                raise UniapError(
                    "uniap demo: profiling failed (see above); `uniap demo --analytic` plans "
                    "from the cpu-4 preset's datasheet numbers instead"
                )
            print(f"profile measured in {time.perf_counter() - t0:.0f} s", flush=True)
            profile = str(profile_file)
        source = (
            "this machine's measured profile"
            if profile
            else f"the {DEMO_CLUSTER} preset's datasheet numbers"
        )
        print(
            f"== planning {DEMO_MODEL} on {DEMO_CLUSTER} (global batch {DEMO_BATCH}) from {source}",
            flush=True,
        )
        p = plan(
            DEMO_MODEL, DEMO_CLUSTER, global_batch_size=DEMO_BATCH, profile=_load_profile(profile)
        )
        if args.plan_only or not example.exists():
            from uniap.report import plan_report, render_plan

            print(render_plan(plan_report(p)))
            if not args.plan_only:
                print(
                    f"(not training: {example} is part of the source checkout, not of an installed "
                    "package; run `make demo` from a clone to train)"
                )
            return 0
        plan_file = Path(tmp) / "plan.yaml"
        p.to_yaml(plan_file)
        print(f"plan: {p.summary()}")
        print(
            f"\n== training {DEMO_MODEL} on 4 CPU processes (gloo): "
            f"torchrun --nproc-per-node 4 {example.name} --plan plan.yaml"
        )
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "4",
            "--master-port",
            str(args.port),
            str(example),
            "--steps",
            str(args.steps),
            "--plan",
            str(plan_file),
        ]
        return subprocess.call(cmd, env=env)


def _load_profile(path: str | None):
    if path is None:
        return None
    from uniap.profiles import MeasuredProfile

    return MeasuredProfile.load(path)


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


def _command(
    sub, name: str, summary: str, description: str, examples: list[str]
) -> argparse.ArgumentParser:
    """A subcommand with a one-line summary (``uniap --help``), a description and examples."""
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples)
    return sub.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, 90),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_plan_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument(
        "--model",
        required=required,
        metavar="NAME|MODULE:FUNCTION",
        help="a preset (see `uniap models`) or module:function returning (model, example_inputs) "
        "or a model with .example_inputs; the module is imported from the current "
        "directory or PYTHONPATH",
    )
    p.add_argument(
        "--cluster",
        required=required,
        metavar="NAME|FILE.yaml",
        help="a preset (see `uniap clusters`) or a cluster YAML file",
    )
    p.add_argument(
        "--global-batch-size",
        type=int,
        required=required,
        metavar="B",
        help="samples per iteration over all data-parallel replicas (the micro-batch count "
        "and size are chosen by the planner among the divisors of B)",
    )
    p.add_argument(
        "--precision",
        choices=["bf16-mixed", "fp16-mixed", "fp32"],
        default=None,
        help="precision to plan for: bf16-mixed / fp16-mixed = 16-bit compute and activations, "
        "fp32 master weights, gradient reductions and AdamW state (default: bf16-mixed on "
        "CUDA clusters, fp32 on CPU ones, or from --dtype)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="compute dtype of parameters and activations without mixed precision (prefer "
        "--precision; default: from --precision)",
    )
    p.add_argument(
        "--schedule",
        type=_schedule_list,
        default=None,
        metavar="S[,S...]",
        help=f"pipeline schedule(s) to plan for, among {', '.join(SCHEDULES)}; several, "
        "comma-separated, and the planner picks the best (default: 1F1B, which never needs "
        "more memory than GPipe at the same time per iteration; Interleaved1F1B: the layers "
        "on pp * v stages, v stages per rank, for a bubble v times smaller)",
    )
    p.add_argument(
        "--virtual-stages",
        type=_stages_per_rank,
        default=None,
        metavar="V[,V...]",
        help="stages per rank v the interleaved schedules are tried at, comma-separated "
        "(default 2; each v is a candidate of its own, with pp * v at most the layers)",
    )
    p.add_argument(
        "--kinds",
        default=None,
        metavar="K[,K...]",
        help="data-parallel kinds to offer, comma-separated, among "
        f"{', '.join(KINDS)} (default: all but FSDP-offload, which is searched when no plan "
        "fits without it on a cluster with a host section)",
    )
    p.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="offer Megatron sequence parallelism on the tensor-parallel layers that support it "
        "(less activation memory for more TP communication; off by default: it doubles the "
        "tp > 1 strategies searched)",
    )
    p.add_argument(
        "--no-vocab-parallel",
        action="store_true",
        help="keep the embedding and head at tp = 1 (by default they may be vocabulary-parallel, "
        "their loss run under loss_parallel(), which takes cross-entropy only)",
    )
    p.add_argument(
        "--time-limit-s",
        type=float,
        default=60.0,
        metavar="S",
        help="time limit per program solved; a plan found at the limit is reported with its gap "
        "(default: 60)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        metavar="N",
        help="sequence length of a text preset (default: the preset's)",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="FILE.yaml",
        help="a measured profile from `uniap profile` (default: analytic costs from the cluster's "
        "datasheet numbers)",
    )
    p.add_argument(
        "--progress-interval-s",
        type=float,
        default=5.0,
        metavar="S",
        help="during a solve, print the candidate, incumbent, bound and gap every S seconds "
        "(default: 5)",
    )
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no progress lines (default: shown on stderr)"
    )


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="uniap",
        description=textwrap.fill(
            "Automatic parallelism for PyTorch (UniAP): find the fastest plan that fits (pipeline "
            "stages, data/tensor parallelism, FSDP, recompute per layer), see why it won, and run "
            "it.",
            90,
        ),
        epilog="examples:\n  uniap plan --model gpt-tiny --cluster cpu-4 --global-batch-size 16 "
        "--out plan.yaml\n  uniap show plan.yaml --plot plan.png\n\nSee `uniap COMMAND --help` for "
        "each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="log what uniap decides (INFO)")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser, metavar="COMMAND")
    p = _command(
        sub,
        "plan",
        "find the fastest plan that fits",
        "Find the plan with the lowest predicted time per iteration that fits in device memory: "
        "every pipeline degree, micro-batch count and per-layer strategy is searched and solved "
        "exactly. Prints the plan (the precision assumed, the stage table, where the time and "
        "memory go) and writes it with --out.",
        [
            "uniap plan --model llama-7b --cluster a100-2x8 --global-batch-size 64 --dtype "
            "bfloat16 --out plan.yaml",
            "uniap plan --model mymodels:build --cluster my-cluster.yaml --global-batch-size 32 "
            "--explain",
        ],
    )
    _add_plan_args(p)
    p.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="write the plan (.yaml, or .json) (default: not written)",
    )
    p.add_argument(
        "--explain", action="store_true", help="also print why this plan won (as `uniap explain`)"
    )
    p.set_defaults(fn=_cmd_plan)

    e = _command(
        sub,
        "explain",
        "why this plan won: the best plan at every pipeline degree",
        "Show the best plan found at every (pipeline degree, schedule) tried, its time per "
        "iteration and what binds it (memory on a stage, the pipeline bubble, a link), the "
        "winner's time per term, and the runner-up and why it lost. Reads a plan file, or plans "
        "first with the `uniap plan` arguments.",
        [
            "uniap explain plan.yaml",
            "uniap explain --model gpt-tiny --cluster cpu-4 --global-batch-size 16",
        ],
    )
    e.add_argument(
        "plan",
        nargs="?",
        default=None,
        help="a plan file from `uniap plan --out` (default: plan now)",
    )
    _add_plan_args(e, required=False)
    e.set_defaults(fn=_cmd_explain)

    s = _command(
        sub,
        "show",
        "print a plan file as a readable report (or JSON, or a picture)",
        "Print a plan: precision, schedule, the stage table (one row per run of layers with one "
        "strategy), the predicted time split into compute / exposed communication / bubble / "
        "optimizer, and memory per stage split into parameters / gradients / optimizer state / "
        "activations against the limit. --model and --cluster re-derive the costs with the "
        "cost model (and fill --layers' per-layer costs).",
        [
            "uniap show plan.yaml --layers",
            "uniap show plan.yaml --plot plan.png   # needs matplotlib: pip install 'uniap[plot]'",
        ],
    )
    s.add_argument("plan", help="a plan file from `uniap plan --out`")
    s.add_argument(
        "--layers", action="store_true", help="also list every layer: stage, strategy, time, memory"
    )
    s.add_argument("--json", action="store_true", help="print the report as JSON (for tools)")
    s.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="draw the device grid, the pipeline timeline and memory per stage (matplotlib)",
    )
    s.add_argument(
        "--html",
        default=None,
        metavar="FILE.html",
        help="write one self-contained page: the picture, the report and why it won (matplotlib)",
    )
    s.add_argument(
        "--model",
        default=None,
        metavar="NAME|MODULE:FUNCTION",
        help="the plan's model, to re-derive costs (default: use the numbers stored in the plan)",
    )
    s.add_argument(
        "--cluster",
        default=None,
        metavar="NAME|FILE.yaml",
        help="the plan's cluster (with --model)",
    )
    s.add_argument(
        "--profile", default=None, metavar="FILE.yaml", help="a measured profile (with --model)"
    )
    s.add_argument(
        "--seq-len",
        type=int,
        default=None,
        metavar="N",
        help="sequence length of a text preset (with --model)",
    )
    s.set_defaults(fn=_cmd_show)

    pr = _command(
        sub,
        "profile",
        "measure the model and the cluster into a profile YAML",
        "Time every distinct layer, the collectives on every group shape, the overlap of "
        "communication with compute and the pipeline's own overhead on the launched devices, "
        "and write them to a profile that `uniap plan --profile` uses instead of analytic costs. "
        "Runs under torchrun, or launches it.",
        [
            "uniap profile --model gpt-tiny --cluster cpu-2 --global-batch-size 16 --out "
            "profile.yaml",
            "torchrun --nproc-per-node 8 -m uniap.cli profile --model llama-7b --global-batch-size "
            "64 --out p.yaml",
        ],
    )
    pr.add_argument(
        "--model",
        required=True,
        metavar="NAME|MODULE:FUNCTION",
        help="preset name (see `uniap models`) or module:function",
    )
    pr.add_argument(
        "--cluster",
        default=None,
        metavar="NAME|FILE.yaml",
        help="preset or YAML with the launched world size (default: detected)",
    )
    pr.add_argument(
        "--global-batch-size",
        type=int,
        default=16,
        metavar="B",
        help="the batch the plans will use: local batches measured are its divisors (default: 16)",
    )
    pr.add_argument(
        "--out",
        required=True,
        metavar="FILE.yaml",
        help="profile YAML to write (reused when it matches)",
    )
    pr.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="processes to launch when not under torchrun (default: the cluster's devices, else 2)",
    )
    pr.add_argument("--warmup", type=int, default=2, help="untimed runs before timing (default: 2)")
    pr.add_argument(
        "--repeats", type=int, default=5, help="timed runs per measurement (default: 5)"
    )
    pr.add_argument(
        "--batches",
        default=None,
        metavar="B1,B2,..",
        help="comma-separated local batch sizes to time (default: the divisors that plans can use)",
    )
    pr.add_argument("--force", action="store_true", help="measure even if --out matches")
    pr.add_argument(
        "--port",
        type=int,
        default=None,
        help="rendezvous port when launching (default: a free one)",
    )
    pr.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    pr.set_defaults(fn=_cmd_profile)

    _command(
        sub,
        "models",
        "list model presets",
        "List the model presets (random weights, built from configs).",
        ["uniap models", "uniap models | grep llama"],
    ).set_defaults(fn=_cmd_models)
    _command(
        sub,
        "clusters",
        "list cluster presets",
        "List the cluster presets with their devices, memory, peak FLOP/s and links (each number's "
        "datasheet source is in its YAML). Write your own cluster YAML in the same layout.",
        ["uniap clusters", "uniap plan --model gpt-tiny --cluster cpu-4 --global-batch-size 16"],
    ).set_defaults(fn=_cmd_clusters)
    d = _command(
        sub,
        "demo",
        "profile, plan and train the demo model on 4 CPU processes",
        f"Profile {DEMO_MODEL} on this machine (4 processes), plan it on the {DEMO_CLUSTER} preset "
        f"(global batch {DEMO_BATCH}) from that profile, then train it with examples/train_gpt.py "
        "on 4 CPU processes (gloo), printing measured next to predicted time.",
        ["uniap demo", "uniap demo --analytic --plan-only"],
    )
    d.add_argument("--plan-only", action="store_true", help="plan and print, do not train")
    d.add_argument(
        "--analytic",
        action="store_true",
        help="skip profiling: plan from the preset's datasheet numbers (the prediction is then "
        "about a datasheet machine, not this one)",
    )
    d.add_argument("--steps", type=int, default=8, help="training steps (default: 8)")
    d.add_argument("--port", type=int, default=29517, help="rendezvous port (default: 29517)")
    d.set_defaults(fn=_cmd_demo)
    return ap


def _setup_progress(args: argparse.Namespace) -> None:
    """Progress lines (logger ``uniap.progress``) as plain lines on stderr unless ``-q``."""
    from uniap.progress import LOGGER_NAME

    log = logging.getLogger(LOGGER_NAME)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    _setup_progress(args)
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
