"""``uniap`` command line: thin wrappers over the public API.

    uniap plan --model llama-7b --cluster a100-2x8 --global-batch-size 64 [--out plan.yaml]
    uniap show plan.yaml
    uniap profile --model gpt-tiny [--cluster cpu-2] --global-batch-size 16 --out profile.yaml
    uniap plan --model gpt-tiny --cluster cpu-2 --global-batch-size 16 --profile profile.yaml
    uniap models | clusters
    uniap demo                    # plan the demo model on cpu-4, then train it on 4 processes

Bad input prints one line, ``uniap: error: ...``, and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from uniap.errors import InfeasibleError, UniapError

__all__ = ["main"]

DEMO_MODEL = "gpt-tiny"
DEMO_CLUSTER = "cpu-4"
DEMO_BATCH = 16


def _resolve_model(spec: str, batch_size: int):
    """A preset name, or ``module:function`` returning a model or ``(model, example_inputs)``."""
    from uniap import models

    if ":" not in spec:
        if spec not in models.list_models():
            raise UniapError(f"unknown model {spec!r}; presets: {', '.join(models.list_models())}; "
                             "or give module:function")
        return spec, None
    mod_name, fn_name = spec.split(":", 1)
    if not mod_name or not fn_name:
        raise UniapError(f"--model {spec!r}: expected module:function, e.g. mypkg.models:build")
    try:
        mod = importlib.import_module(mod_name)
    except (ImportError, ValueError, TypeError) as e:
        raise UniapError(f"cannot import module {mod_name!r} for --model {spec!r}: {e}") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise UniapError(f"--model {spec!r}: {mod_name!r} has no callable {fn_name!r}")
    try:
        out = fn()
    except Exception as e:  # the user's builder: report it in one line
        raise UniapError(f"--model {spec!r}: calling {fn_name}() failed: {type(e).__name__}: {e}") from None
    if isinstance(out, tuple) and len(out) == 2:
        return out
    example = getattr(out, "example_inputs", None)
    if example is None:
        raise UniapError(f"--model {spec!r}: the function must return (model, example_inputs) "
                         "or a model with an `example_inputs` attribute")
    return out, example


def _cmd_plan(args: argparse.Namespace) -> int:
    from uniap.planner import plan

    model, example = _resolve_model(args.model, args.global_batch_size)
    profile = None
    if args.profile:
        from uniap.profiler import MeasuredProfile

        profile = MeasuredProfile.load(args.profile)
    p = plan(model, args.cluster, global_batch_size=args.global_batch_size, example_inputs=example,
             dtype=args.dtype, precision=args.precision, time_limit_s=args.time_limit_s, profile=profile, seq_len=args.seq_len,
             schedules=[args.schedule] if args.schedule else None,
             progress=None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True)))
    print(p.describe())
    if args.out:
        (p.to_json if args.out.endswith(".json") else p.to_yaml)(args.out)
        print(f"plan written to {args.out}")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from uniap.profiler.launch import run_profile

    return run_profile(args)


def _cmd_show(args: argparse.Namespace) -> int:
    from uniap.plan import Plan

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
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (compute dtype; prefer --precision)")
    p.add_argument("--precision", choices=["bf16-mixed", "fp16-mixed", "fp32"], default=None,
                   help="mixed precision to plan for (default: bf16-mixed on CUDA clusters, fp32 on CPU ones, "
                        "or from --dtype)")
    p.add_argument("--schedule", choices=["GPipe", "1F1B"], default=None)
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
