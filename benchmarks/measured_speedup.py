"""Measured speedup of uniap's plan over the best hand-tuned uniform plan, 4 CPU processes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/measured_speedup.py          # ~15-25 min
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/measured_speedup.py --models gpt --reps 5

For each model (different families, heterogeneous layers: embedding and head layers several
times the size of a block, encoder and decoder blocks of different sizes):

1. **profile**: :func:`uniap.profiler.collect_profile` on 4 spawned gloo processes (what
   ``uniap profile`` and ``make demo`` run), one thread per process;
2. **budget**: a per-process memory budget of ``--tightness`` x the peak the measured cost
   model predicts for pure DDP, so the budget binds (DDP does not fit) and the plans must
   trade memory for time. It is a planning budget, not this machine's RAM (the runs'
   allocator-level peaks are printed next to it);
3. **plans**: uniap's plan (:func:`uniap.planner.plan_graph` with the measured profile) and
   the best hand-tuned plan (``benchmarks/baselines/handset.py``, ``handtuned``: the grid a
   user could search by hand on the same cost model, every pp, micro-batch count, stage
   split, TP degree, DDP or FSDP, with and without checkpointing, one strategy for every
   layer), both predicted to fit;
4. **runs**: both plans in one spawned group of 4 (``accuracy_harness``'s ``run`` job):
   warm-up, then ``--reps`` rounds of one iteration of uniap's plan then one of the
   hand-tuned plan (interleaved: a burst of load on the shared machine hits both alike).
   An iteration is ``train_step`` + ``AdamW.step`` + ``zero_grad`` after a barrier, the
   slowest rank's time.

The table gives, per model, each plan's median and min-max iteration time, and the speedup
``median(hand-tuned) / median(uniap)`` with the min-max of the per-round ratios. The machine
it ran on heads the output.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accuracy_harness import spawn  # noqa: E402
from baselines import handset, to_plan  # noqa: E402
from machine import machine, omp_threads  # noqa: E402

from uniap.cluster import load_cluster  # noqa: E402
from uniap.contract import LayerStrategy, Plan, Stage, Strategy  # noqa: E402
from uniap.cost_model import CostModel  # noqa: E402
from uniap.graph import build_graph  # noqa: E402
from uniap.models import build_model, example_batch  # noqa: E402
from uniap.planner import plan_graph  # noqa: E402
from uniap.profiles import MeasuredProfile  # noqa: E402

WORLD = 4
CLUSTER = "cpu-4"
GLOBAL_BATCH = 16
MODELS: dict[str, tuple[str, dict]] = {
    # decoder LM: 8k vocabulary, so embedding and head are each ~5x a block
    "gpt": ("gpt-tiny", {"vocab_size": 8192, "seq_len": 64, "dim": 128, "n_layers": 4}),
    # encoder-decoder: decoder blocks (cross-attention) 1.3x the encoder's; 4k vocabulary
    "t5": (
        "t5-tiny",
        {
            "vocab_size": 4096,
            "seq_len": 64,
            "dim": 128,
            "n_layers": 2,
            "n_decoder_layers": 2,
            "ffn_dim": 512,
        },
    ),
    # vision: patch embedding and a 1000-class head next to the blocks
    "vit": (
        "vit-tiny",
        {
            "image_size": 64,
            "patch_size": 8,
            "num_classes": 1000,
            "dim": 128,
            "n_layers": 4,
            "ffn_dim": 512,
        },
    ),
    # encoder with an MLM head over an 8k vocabulary
    "bert": ("bert-tiny", {"vocab_size": 8192, "seq_len": 64, "dim": 128, "n_layers": 4}),
}


def graph_of(name: str, overrides: dict):
    meta = build_model(name, device="meta", **overrides)
    return build_graph(meta, example_batch(meta, 2, device="meta")[0], name=meta.uniap_name)


def uniform_plan(graph, dp: int, kind: str) -> Plan:
    """Every layer ``(dp, 1, kind)`` on one stage."""
    layers = tuple(LayerStrategy(f, Strategy(dp, 1, kind)) for f in graph.fqns)
    return Plan(
        graph.name,
        graph.signature,
        graph.num_layers,
        dp,
        GLOBAL_BATCH,
        1,
        "1F1B",
        (Stage(tuple(range(dp)), layers),),
    )


def plans_for(graph, prof: MeasuredProfile, tightness: float) -> dict:
    """The budget, uniap's plan and the best hand-tuned plan, with their predictions."""
    base = load_cluster(CLUSTER)
    ddp = CostModel(graph, base, prof).evaluate(uniform_plan(graph, WORLD, "DDP"))
    memory_fraction = 0.9  # the planner's default usable share of the budget
    cluster = base.with_memory(tightness * max(ddp.peak_memory_bytes) / memory_fraction)
    cm = CostModel(graph, cluster, prof, memory_fraction=memory_fraction)
    uni = plan_graph(graph, cluster, global_batch_size=GLOBAL_BATCH, profile=prof)
    best = handset(cm, GLOBAL_BATCH, "handtuned")
    if not best.fits:
        raise RuntimeError(f"no hand-tuned plan fits {graph.name}'s budget; raise --tightness")
    t = cm.tables(best.pp, best.num_microbatches, GLOBAL_BATCH)
    hand = to_plan(cm, t, best.stage_of, best.strategy_of, GLOBAL_BATCH)
    return {
        "cluster": cluster,
        "ddp_peak_bytes": max(ddp.peak_memory_bytes),
        "uniap": (uni, cm.evaluate(uni)),
        "hand": (hand, cm.evaluate(hand), best.detail.split(";")[0]),
    }


def _mib(x: float) -> str:
    return f"{x / 2**20:.1f}"


def _ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:.0f} ({min(xs) * 1e3:.0f}-{max(xs) * 1e3:.0f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--reps", type=int, default=15, help="interleaved rounds (A B) per model")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="profile timing repeats")
    ap.add_argument("--tightness", type=float, default=0.5, help="budget / pure DDP's peak")
    args = ap.parse_args()

    t_start = time.perf_counter()
    print(f"machine: {platform.node()}, {machine(omp_threads())} (shared with other work)")
    print(
        f"{WORLD} gloo processes on this host, global batch {GLOBAL_BATCH}, budget "
        f"{args.tightness} x pure DDP's predicted peak, {args.warmup} warm-up + {args.reps} "
        "interleaved rounds; iteration = train_step + AdamW.step, slowest rank",
        flush=True,
    )
    rows, details = [], []
    for key in args.models:
        name, overrides = MODELS[key]
        graph = graph_of(name, overrides)
        job = {
            "model": name,
            "model_overrides": overrides,
            "global_batch_size": GLOBAL_BATCH,
            "cluster": CLUSTER,
        }
        t0 = time.perf_counter()
        prof = MeasuredProfile.from_dict(
            spawn(WORLD, {**job, "kind": "profile", "repeats": args.repeats})
        )
        t_prof = time.perf_counter() - t0
        p = plans_for(graph, prof, args.tightness)
        uni, uni_ev = p["uniap"]
        hand, hand_ev, hand_what = p["hand"]
        same = (uni.stages, uni.num_microbatches, uni.schedule) == (
            hand.stages,
            hand.num_microbatches,
            hand.schedule,
        )
        t0 = time.perf_counter()
        runs = spawn(
            WORLD,
            {
                **job,
                "kind": "run",
                "plans": [uni.to_dict(), hand.to_dict()],
                "warmup": args.warmup,
                "steps": args.reps,
            },
        )
        t_run = time.perf_counter() - t0
        u_t, h_t = runs[0]["step_times_s"], runs[1]["step_times_s"]
        ratios = [h / u for u, h in zip(u_t, h_t)]
        speedup = statistics.median(h_t) / statistics.median(u_t)
        n_params = sum(layer.num_params for layer in graph.layers)
        rows.append(
            f"| {key} ({name}, {n_params / 1e6:.1f} M params, {graph.num_layers} layers) "
            f"| {_mib(p['cluster'].device_memory_bytes)} "
            f"| {uni_ev.time_per_iteration_s * 1e3:.0f} / {hand_ev.time_per_iteration_s * 1e3:.0f} "
            f"| {_ms(u_t)} | {_ms(h_t)} | {speedup:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) "
            f"| {_mib(max(runs[0]['rank_allocator_bytes']))} / "
            f"{_mib(max(runs[1]['rank_allocator_bytes']))} |"
        )
        details.append(
            f"- {key}: profile {t_prof:.0f} s, runs {t_run:.0f} s; pure DDP predicted "
            f"{_mib(p['ddp_peak_bytes'])} MiB\n"
            f"  - uniap: {uni.summary()}\n"
            f"  - hand-tuned ({hand_what}): {hand.summary()}"
            + ("\n  - the two plans are the same" if same else "")
        )
        print(rows[-1], flush=True)
        print(details[-1], flush=True)
    print(
        "\n| model | budget (MiB / process) | predicted ms (uniap / hand-tuned) "
        "| uniap measured ms, median (min-max) | hand-tuned measured ms, median (min-max) "
        "| speedup, median (min-max of per-round ratios) "
        "| allocator peak MiB (uniap / hand-tuned) |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n" + "\n".join(details))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
