"""Does the cost model predict real runs? Profile small models of several families, run many
plans, compare.

    .venv/bin/python benchmarks/cost_model_accuracy.py --rounds 2   # 4 families, ~35 min
    .venv/bin/python benchmarks/cost_model_accuracy.py --families gpt   # one family, ~5 min
    .venv/bin/python benchmarks/cost_model_accuracy.py --quick    # 3 plans, 1 round, no world 4

Families (``--families``, :data:`FAMILIES`): ``gpt`` (decoder; the model the cost model was
developed on), ``bert`` (encoder, masked-LM head), ``t5`` (encoder-decoder with
cross-attention) and ``hf-llama`` (a Hugging Face ``LlamaForCausalLM`` built from a
``transformers`` config with random weights: GQA, RoPE, SwiGLU; never used while developing
the cost model). All at global batch 16, sequence 64, hidden 128, vocabulary 512.

World 2 (gloo, one thread per process): in each of ``--rounds`` rounds, measure a profile and
run 12 distinct plans (pp 1 and 2; DDP, FSDP and TP mixes; GPipe and 1F1B; several
micro-batch counts) plus the plan the planner picks from the first profile, each through
``uniap.parallelize``; the profiles are combined (the median of every measured number) and
each plan's time is the median over the rounds, so that the speed changes of a shared
machine between profiling and running hit both alike (a probe before each round shows them); print
predicted vs measured time per iteration (median after warm-up) and peak memory per rank, the median
and worst relative errors, Spearman's rank correlation, whether the planner's plan is the
measured-fastest, and the effect of calibration (fitted on half of the plans, judged on the
other half). World 4 (4 processes on the machine's cores: on 2 cores each rank gets half a
core, so its times say more about the scheduler than about the model): one profile
(``--repeats4``) and 5 plans (``--steps4`` timed iterations each), time and memory. The
header and every family print the machine's load average: on a shared machine it says how
much the timings can be trusted. A summary table per family and world size ends the output.

    .venv/bin/python benchmarks/cost_model_accuracy.py --memory-only   # no timing, ~20 min

Memory is measured three ways per rank (the stage's worst rank is shown):

- **count**: :class:`uniap.executor.memory.StepMemory`, the tensors the cost model charges
  (parameters, gradients, optimizer state, saved activations) around ``train_step``;
- **live**: the peak of live tensor storages (torch's ``MemTracker``) over one iteration;
- **allocator**: :class:`uniap.executor.memory.AllocatorPeak` over one iteration
  (``train_step`` + ``AdamW.step``): on CPU the c10 allocator's own records (under
  ``torch.profiler`` with ``profile_memory``), on CUDA ``max_memory_allocated``. It sees what
  the count cannot: FSDP's all-gathered parameters and unsharded gradients, communication
  and reshard buffers, the loss's and the optimizer's temporaries.

``allocator - count`` is what the cost model does not charge; the table puts it next to the
stage's largest layer's parameter bytes (the size of one FSDP all-gather buffer). At world 2
memory-only also runs one plan per sharded kind at one micro-batch (:func:`kind_plans`:
ZeRO2, FSDP-offload over 2 ranks and on stages of one device), whose transients (gathered
parameters, whole gradients before their reduce-scatter) are not charged either.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from accuracy_harness import build_job_model, compare, spawn  # noqa: E402
from machine import machine  # noqa: E402

from uniap.calibration import Measurement, calibrate  # noqa: E402
from uniap.cluster import load_cluster  # noqa: E402
from uniap.contract import LayerStrategy, Plan, Stage, Strategy  # noqa: E402
from uniap.cost_model import CostModel  # noqa: E402
from uniap.graph import build_graph  # noqa: E402
from uniap.planner import plan_graph  # noqa: E402
from uniap.profiles import MeasuredProfile  # noqa: E402

MODEL = {"vocab_size": 512, "seq_len": 64, "dim": 128, "n_layers": 4, "n_heads": 4}
BATCH = 16
FAMILIES: dict[str, dict] = {
    "gpt": {
        "label": "decoder: uniap GPT (the model the cost model was developed on)",
        "job": {"model": "gpt-tiny", "model_overrides": MODEL},
    },
    "bert": {
        "label": "encoder: uniap BERT, masked-LM head",
        "job": {
            "model": "bert-tiny",
            "model_overrides": {
                "vocab_size": 512,
                "seq_len": 64,
                "dim": 128,
                "n_layers": 4,
                "n_heads": 4,
                "ffn_dim": 512,
            },
        },
    },
    "t5": {
        "label": "encoder-decoder: uniap T5 (2 + 2 blocks, cross-attention)",
        "job": {
            "model": "t5-tiny",
            "model_overrides": {
                "vocab_size": 512,
                "seq_len": 64,
                "dim": 128,
                "n_layers": 2,
                "n_decoder_layers": 2,
                "n_heads": 4,
                "ffn_dim": 512,
            },
        },
    },
    "hf-llama": {
        "label": "Hugging Face transformers LlamaForCausalLM from a config, random weights "
        "(GQA, RoPE, SwiGLU; not used while developing the cost model)",
        "job": {
            "hf": {
                "family": "llama",
                "overrides": {
                    "hidden_size": 128,
                    "intermediate_size": 352,
                    "num_hidden_layers": 4,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 2,
                    "vocab_size": 512,
                    "max_position_embeddings": 64,
                },
                "seq_len": 64,
            }
        },
    },
}


def family_graph(job: dict):
    """The layer graph of the job's model (built on the meta device; a Hugging Face model on
    the CPU: tiny)."""
    model, x, _, _ = build_job_model({**job, "global_batch_size": 2}, device="meta")
    return build_graph(model, x, name=model.uniap_name)


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def make_plan(graph, world: int, stages: list[list[tuple]], c: int, schedule: str = "1F1B") -> Plan:
    """``stages``: per stage, one ``(dp, tp, kind)`` per layer (a shorter list repeats its last)."""
    fqns = list(graph.fqns)
    g = world // len(stages)
    out, u = [], 0
    sizes = _split(len(fqns), [len(s) for s in stages])
    for i, (spec, n) in enumerate(zip(stages, sizes)):
        layers = []
        for j in range(n):
            dp, tp, kind = spec[min(j, len(spec) - 1)]
            layers.append(LayerStrategy(fqns[u], Strategy(dp, tp, kind)))
            u += 1
        out.append(Stage(tuple(range(i * g, (i + 1) * g)), tuple(layers)))
    return Plan(graph.name, graph.signature, len(fqns), world, BATCH, c, schedule, tuple(out))


def best_plan(graph, cluster, profile) -> Plan:
    """The planner's plan for the benchmark's model and batch from ``profile``."""
    return plan_graph(
        graph,
        cluster,
        global_batch_size=BATCH,
        profile=profile,
        recompute=False,
        schedules=["GPipe", "1F1B"],
    )


def _same_plan(a: Plan, b: Plan) -> bool:
    """The same layout, schedule and micro-batch count (predictions and timings aside)."""
    return (a.stages, a.num_microbatches, a.schedule) == (b.stages, b.num_microbatches, b.schedule)


def _split(total: int, lengths: list[int]) -> list[int]:
    """Layers per stage: a stage spec longer than 1 gives its exact count, the last takes the
    rest."""
    sizes = [n if n > 1 else 0 for n in lengths]
    rest = total - sum(sizes)
    free = [i for i, n in enumerate(sizes) if n == 0]
    for k, i in enumerate(free):
        sizes[i] = rest // len(free) + (1 if k < rest % len(free) else 0)
    return sizes


def blocks_tp(graph, other: str, tp_blocks: set[int] | None = None) -> list[tuple]:
    """pp=1 on 2 ranks: the listed blocks (the layers with a TP plan, counted from 0; default
    all) at tp 2, the other layers dp 2."""
    spec, block = [], 0
    for layer in graph.layers:
        if layer.tp_pairs and layer.supports_tp(2):  # blocks, not the vocabulary layers
            spec.append((1, 2, "DDP") if tp_blocks is None or block in tp_blocks else (2, 1, other))
            block += 1
        else:
            spec.append((2, 1, other))
    return spec


def world2_plans(graph) -> list[tuple[str, Plan]]:
    D, F = (2, 1, "DDP"), (2, 1, "FSDP")
    one = (1, 1, "DDP")
    L = graph.num_layers
    a, b = (L + 1) // 2, 2  # the first stage's layers: about half, and two
    return [
        ("pp1 DDP c1", make_plan(graph, 2, [[D]], 1)),
        ("pp1 DDP c4", make_plan(graph, 2, [[D]], 4)),
        ("pp1 FSDP c1", make_plan(graph, 2, [[F]], 1)),
        ("pp1 FSDP c2", make_plan(graph, 2, [[F]], 2)),
        ("pp1 TP blocks + DDP c1", make_plan(graph, 2, [blocks_tp(graph, "DDP")], 1)),
        ("pp1 TP blocks + FSDP c2", make_plan(graph, 2, [blocks_tp(graph, "FSDP")], 2)),
        ("pp1 TP 2 blocks + DDP c2", make_plan(graph, 2, [blocks_tp(graph, "DDP", {1, 2})], 2)),
        (
            f"pp2 GPipe c2 ({a}|{L - a})",
            make_plan(graph, 2, [[one] * a, [one] * (L - a)], 2, "GPipe"),
        ),
        (
            f"pp2 GPipe c8 ({a}|{L - a})",
            make_plan(graph, 2, [[one] * a, [one] * (L - a)], 8, "GPipe"),
        ),
        (
            f"pp2 1F1B c4 ({a}|{L - a})",
            make_plan(graph, 2, [[one] * a, [one] * (L - a)], 4, "1F1B"),
        ),
        (
            f"pp2 1F1B c16 ({a}|{L - a})",
            make_plan(graph, 2, [[one] * a, [one] * (L - a)], 16, "1F1B"),
        ),
        (
            f"pp2 1F1B c4 ({b}|{L - b})",
            make_plan(graph, 2, [[one] * b, [one] * (L - b)], 4, "1F1B"),
        ),
    ]


def kind_plans(graph) -> list[tuple[str, Plan]]:
    """World 2, memory only: one plan per sharded kind at one micro-batch, whose transient
    (gathered parameters, whole gradients before their reduce-scatter) the cost model does
    not charge, next to DDP's: ZeRO2, FSDP-offload over 2 ranks, and FSDP-offload on stages
    of one device."""
    L = graph.num_layers
    a = (L + 1) // 2
    one = (1, 1, "FSDP-offload")
    return [
        ("pp1 ZeRO2 c1", make_plan(graph, 2, [[(2, 1, "ZeRO2")]], 1)),
        ("pp1 FSDP-offload c1", make_plan(graph, 2, [[(2, 1, "FSDP-offload")]], 1)),
        (
            f"pp2 FSDP-offload dp1 1F1B c2 ({a}|{L - a})",
            make_plan(graph, 2, [[one] * a, [one] * (L - a)], 2, "1F1B"),
        ),
    ]


# the host side of CPU offload for the memory predictions of kind_plans (device memory does
# not depend on these numbers)
_HOST = {"host_memory_bytes": 64 * 2**30, "host_link_bandwidth_bytes_per_s": 10e9}
_HOST |= {"host_optimizer_s_per_param": 2e-9}


def world4_plans(graph) -> list[tuple[str, Plan]]:
    L = graph.num_layers
    a = (L + 1) // 2
    D4, F4 = (4, 1, "DDP"), (4, 1, "FSDP")
    D2, F2 = (2, 1, "DDP"), (2, 1, "FSDP")
    return [
        ("w4 pp1 DDP c1", make_plan(graph, 4, [[D4]], 1)),
        ("w4 pp1 FSDP c1", make_plan(graph, 4, [[F4]], 1)),
        ("w4 pp1 FSDP c2", make_plan(graph, 4, [[F4]], 2)),
        (
            f"w4 pp2 DDP 1F1B c4 ({a}|{L - a})",
            make_plan(graph, 4, [[D2] * a, [D2] * (L - a)], 4, "1F1B"),
        ),
        (
            f"w4 pp2 FSDP GPipe c4 ({a}|{L - a})",
            make_plan(graph, 4, [[F2] * a, [F2] * (L - a)], 4, "GPipe"),
        ),
    ]


def fmt_mib(x: float) -> str:
    return f"{x / 2**20:.1f}"


def memory_table(graph, plans, evals, runs) -> list[float]:
    """Print predicted vs counted, live and allocator peaks per stage; the errors against the
    allocator. The runs are on CPU devices, where FSDP-offload's host state sits in the same
    memory as the device's: "predicted" is the device bytes plus the stage's host bytes per
    rank (:attr:`~uniap.cost_model.Evaluation.host_memory_bytes`, zero without offload)."""
    print(
        "\n| plan | stage | predicted (MiB) | count (MiB) | live (MiB) | allocator (MiB) "
        "| pred vs count | pred vs allocator | allocator - count (MiB) | largest layer (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    layer_bytes = {layer.fqn: layer.param_bytes for layer in graph.layers}
    errs = []
    for (name, plan), ev, r in zip(plans, evals, runs):
        for i, st in enumerate(plan.stages):
            pred = ev.peak_memory_bytes[i] + ev.host_memory_bytes[i]
            cnt, live = r["stage_counted_bytes"][i], r["stage_peak_bytes"][i]
            alloc = r["stage_allocator_bytes"][i]
            largest = max(layer_bytes[ls.fqn] for ls in st.layers)
            errs.append(pred / alloc - 1)
            print(
                f"| {name} | {i} | {fmt_mib(pred)} | {fmt_mib(cnt)} | {fmt_mib(live)} "
                f"| {fmt_mib(alloc)} | {pred / cnt - 1:+.1%} | {pred / alloc - 1:+.1%} "
                f"| {fmt_mib(alloc - cnt)} | {fmt_mib(largest)} |"
            )
    return errs


def memory_only(graph, job: dict, plans: list[tuple[str, Plan]], world: int) -> list[float]:
    """Profile once (one repeat: memory does not need timing repeats), run every plan once,
    print the memory table; the errors against the allocator."""
    cluster_name = "cpu-2" if world == 2 else "cpu-4"
    jobw = {**job, "cluster": cluster_name}
    prof = MeasuredProfile.from_dict(
        spawn(
            world,
            {**jobw, "kind": "profile", "warmup": 1, "repeats": 1, "batches": [1, 2, 4, 8, 16]},
        )
    )
    runs = spawn(
        world,
        {
            **jobw,
            "kind": "run",
            "plans": [p.to_dict() for _, p in plans],
            "warmup": 0,
            "steps": 1,
            "time": False,
        },
    )
    cluster = load_cluster(cluster_name)
    if any(ls.strategy.offloaded for _, p in plans for ls in p.layer_strategies):
        cluster = cluster.replace(**_HOST)
    cm = CostModel(graph, cluster, prof, recompute=False)
    errs = memory_table(graph, plans, [cm.evaluate(p) for _, p in plans], runs)
    print(
        f"memory error against the allocator (world {world}): median "
        f"{statistics.median(abs(x) for x in errs):.1%}, worst {max(abs(x) for x in errs):.1%}"
    )
    return errs


def world2(graph, job: dict, args: argparse.Namespace) -> dict:
    """World 2: ``args.rounds`` rounds of (probe, profile, run every plan); the time and memory
    tables, calibration; the summary numbers."""
    cluster = load_cluster("cpu-2")
    plans = world2_plans(graph)
    if args.quick:
        plans = [plans[0], plans[4], plans[8]]
    profiles, run_sets, probes = [], [], []
    chosen, chosen_index = None, -1
    for r in range(args.rounds):
        probes.append(spawn(2, {**job, "kind": "probe"}))
        print(f"== round {r + 1}/{args.rounds}: profiling (world 2); {load_line()}", flush=True)
        prof_r = MeasuredProfile.from_dict(
            spawn(2, {**job, "kind": "profile", "repeats": args.repeats})
        )
        profiles.append(prof_r)
        if chosen is None:  # the planner's choice from the first profile, run in every round
            chosen = best_plan(graph, cluster, prof_r)
            same = [i for i, (_, p) in enumerate(plans) if _same_plan(p, chosen)]
            if same:  # one of the listed plans: measured once, marked (a rerun is only noise)
                chosen_index = same[0]
                name = plans[chosen_index][0]
                plans[chosen_index] = (f"{name} (planner's choice)", plans[chosen_index][1])
            else:
                chosen_index = len(plans)
                plans.append(("planner's choice: " + chosen.summary(), chosen))
        print(f"== round {r + 1}/{args.rounds}: running {len(plans)} plans (world 2)", flush=True)
        run_sets.append(
            spawn(
                2,
                {
                    **job,
                    "kind": "run",
                    "plans": [p.to_dict() for _, p in plans],
                    "warmup": args.warmup,
                    "steps": args.steps,
                },
            )
        )
    probes.append(spawn(2, {**job, "kind": "probe"}))
    prof = MeasuredProfile.combine(profiles)
    print(f"   {prof.settings['wall_s']} s of profiling; {prof.hardware['device_name']}")
    print(prof.summary())
    if args.profile_out:
        prof.to_yaml(args.profile_out.replace(".yaml", f"-{graph.name}.yaml"))
    # per plan: the median over rounds of each round's median step; memory of the last round
    runs = []
    for i in range(len(plans)):
        per_round = [rs[i] for rs in run_sets]
        runs.append(
            {
                **per_round[-1],
                **{
                    k: statistics.median(r[k] for r in per_round)
                    for k in ("tpi_s", "train_step_s", "optimizer_s")
                },
            }
        )
    drift = max(probes) / min(probes) - 1
    print(
        "machine-speed probe (one block fwd+bwd on both ranks, before each round and after "
        f"the last): {' / '.join(f'{p * 1e3:.1f}' for p in probes)} ms, spread {drift:.0%}"
    )
    cm = CostModel(graph, cluster, prof, recompute=False)
    evals = [cm.evaluate(p) for _, p in plans]
    pred = [e.time_per_iteration_s for e in evals]
    meas = [r["tpi_s"] for r in runs]
    stats = compare(pred, meas)
    print(
        "\n| # | plan | predicted TPI (ms) | measured TPI (ms) | (fwd+bwd / optimizer) | error "
        "| predicted peak (MiB) | measured peak (MiB) | mem error |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for i, ((name, _), e, r, err) in enumerate(zip(plans, evals, runs, stats["errors"])):
        pm, mm = max(e.peak_memory_bytes), max(r["stage_peak_bytes"])
        print(
            f"| {i + 1} | {name} | {e.time_per_iteration_s * 1e3:.1f} | {r['tpi_s'] * 1e3:.1f} "
            f"| {r['train_step_s'] * 1e3:.1f} / {r['optimizer_s'] * 1e3:.1f} | {err:+.1%} "
            f"| {fmt_mib(pm)} | {fmt_mib(mm)} | {pm / mm - 1:+.1%} |"
        )
    mem_errs = memory_table(graph, plans, evals, runs)
    fastest = min(meas)
    chosen_meas = meas[chosen_index]
    print(
        f"\nTPI error: median {stats['median_abs_error']:.1%}, worst "
        f"{stats['worst_abs_error']:.1%}; "
        f"Spearman rank correlation {stats['spearman']:.3f}"
    )
    print(
        f"memory error against the allocator (world 2): median "
        f"{statistics.median(abs(x) for x in mem_errs):.1%}, "
        f"worst {max(abs(x) for x in mem_errs):.1%}"
    )
    print(
        f"planner's plan measured {chosen_meas * 1e3:.1f} ms; measured-fastest {fastest * 1e3:.1f} "
        f"ms ({plans[meas.index(fastest)][0]}): {chosen_meas / fastest - 1:+.1%}"
    )
    if args.rounds > 1:
        again = best_plan(graph, cluster, prof)
        same = _same_plan(again, chosen)
        print(
            "the combined profile's plan: "
            + ("the same plan" if same else f"{again.summary()} (differs from round 1's)")
        )

    # calibration: fit on the even-numbered plans, judge on the odd-numbered ones
    ms = [Measurement(p, r["tpi_s"]) for (_, p), r in zip(plans, runs)]
    fit_set = ms[0::2]
    cal = calibrate(prof, fit_set, graph=graph, cluster=cluster)
    cm_cal = CostModel(graph, cluster, cal, recompute=False)
    pred_cal = [cm_cal.evaluate(m.plan).time_per_iteration_s for m in ms]
    before_held = compare(pred[1::2], meas[1::2])["median_abs_error"]
    after_held = compare(pred_cal[1::2], meas[1::2])["median_abs_error"]
    after_all = compare(pred_cal, meas)
    print(
        f"\ncalibration ({', '.join(f'{k} {v:.3g}' for k, v in cal.calibration.items())}), fitted "
        f"on {len(fit_set)} plans: held-out median error {before_held:.1%} -> {after_held:.1%}; "
        f"all plans {stats['median_abs_error']:.1%} -> {after_all['median_abs_error']:.1%} (worst "
        f"{after_all['worst_abs_error']:.1%}, Spearman {after_all['spearman']:.3f})"
    )
    return {
        "plans": len(plans),
        "tpi_median": stats["median_abs_error"],
        "tpi_worst": stats["worst_abs_error"],
        "spearman": stats["spearman"],
        "mem_median": statistics.median(abs(x) for x in mem_errs),
        "mem_worst": max(abs(x) for x in mem_errs),
        "chosen_vs_fastest": chosen_meas / fastest - 1,
        "raw": {
            "plans": [[n, p.to_dict()] for n, p in plans],
            "profiles": [p.to_dict() for p in profiles],
            "runs": run_sets,
            "probes_s": probes,
        },
    }


def world4(graph, job: dict, args: argparse.Namespace) -> dict:
    """World 4 (4 ranks on the machine's cores): one profile (``args.repeats4`` repeats), every
    plan run ``args.steps4`` times; time and memory against the prediction."""
    jobw = {**job, "cluster": "cpu-4"}
    print(f"== world 4: profiling; {load_line()}", flush=True)
    prof = MeasuredProfile.from_dict(
        spawn(4, {**jobw, "kind": "profile", "warmup": 1, "repeats": args.repeats4})
    )
    plans = world4_plans(graph)
    print(f"== world 4: running {len(plans)} plans", flush=True)
    runs = spawn(
        4,
        {
            **jobw,
            "kind": "run",
            "plans": [p.to_dict() for _, p in plans],
            "warmup": 1,
            "steps": args.steps4,
        },
    )
    cm = CostModel(graph, load_cluster("cpu-4"), prof, recompute=False)
    evals = [cm.evaluate(p) for _, p in plans]
    stats = compare([e.time_per_iteration_s for e in evals], [r["tpi_s"] for r in runs])
    print("\n| plan | predicted TPI (ms) | measured TPI (ms) | error |")
    print("|---|---|---|---|")
    for (name, _), e, r, err in zip(plans, evals, runs, stats["errors"]):
        print(
            f"| {name} | {e.time_per_iteration_s * 1e3:.1f} | {r['tpi_s'] * 1e3:.1f} | {err:+.1%} |"
        )
    mem_errs = memory_table(graph, plans, evals, runs)
    print(
        f"\nTPI error (world 4): median {stats['median_abs_error']:.1%}, worst "
        f"{stats['worst_abs_error']:.1%}; Spearman {stats['spearman']:.3f}"
    )
    print(
        f"memory error against the allocator (world 4): median "
        f"{statistics.median(abs(x) for x in mem_errs):.1%}, "
        f"worst {max(abs(x) for x in mem_errs):.1%}"
    )
    return {
        "plans": len(plans),
        "tpi_median": stats["median_abs_error"],
        "tpi_worst": stats["worst_abs_error"],
        "spearman": stats["spearman"],
        "mem_median": statistics.median(abs(x) for x in mem_errs),
        "mem_worst": max(abs(x) for x in mem_errs),
    }


def summary_table(rows: list[tuple[str, int, dict]], memory_only_run: bool) -> None:
    print("\n== summary per family (errors: |predicted / measured - 1|)")
    if memory_only_run:
        print("\n| family | world | plans | memory vs allocator: median | worst |")
        print("|---|---|---|---|---|")
        for fam, world, r in rows:
            print(
                f"| {fam} | {world} | {r['plans']} | {r['mem_median']:.1%} | {r['mem_worst']:.1%} |"
            )
        return
    print(
        "\n| family | world | plans | TPI error: median | worst | Spearman "
        "| memory vs allocator: median | worst |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for fam, world, r in rows:
        print(
            f"| {fam} | {world} | {r['plans']} | {r['tpi_median']:.1%} | {r['tpi_worst']:.1%} "
            f"| {r['spearman']:.3f} | {r['mem_median']:.1%} | {r['mem_worst']:.1%} |"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--families",
        default=",".join(FAMILIES),
        help=f"comma-separated model families of {list(FAMILIES)} (default all)",
    )
    ap.add_argument("--quick", action="store_true", help="3 plans, no world-4 runs")
    ap.add_argument(
        "--memory-only",
        action="store_true",
        help="no timing: one profile and one iteration per plan, world 2 and 4, memory tables",
    )
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of (profile, run every plan); the profiles are combined (median) and each "
        "plan's time is the median over rounds, so that a change of the shared machine's speed "
        "between profiling and running hits both alike (default 3; 1 with --quick)",
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats4", type=int, default=3, help="world-4 profile repeats")
    ap.add_argument("--steps4", type=int, default=3, help="world-4 timed iterations per plan")
    ap.add_argument(
        "--set-to-none",
        action="store_true",
        help="zero_grad(set_to_none=True) between iterations (torch's default); default: "
        "gradients zeroed in place and kept allocated",
    )
    ap.add_argument("--repeats", type=int, default=7, help="profile repeats")
    ap.add_argument(
        "--profile-out",
        default=None,
        help="also save each family's combined world-2 profile (NAME.yaml -> NAME-<model>.yaml)",
    )
    ap.add_argument(
        "--raw-out",
        default=None,
        help="also save every round's profile and measurements (JSON) to this file",
    )
    args = ap.parse_args()
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    t0 = time.perf_counter()
    print(
        f"machine: {machine()}; "
        f"{load_line()} at the start; gloo, 1 thread per process; global batch {BATCH}; "
        f"zero_grad(set_to_none={args.set_to_none})"
    )
    rows, raw = [], {}
    for fam in families:
        spec = FAMILIES[fam]
        job = {
            **spec["job"],
            "global_batch_size": BATCH,
            "cluster": "cpu-2",
            "set_to_none": args.set_to_none,
        }
        graph = family_graph(job)
        params = sum(la.num_params for la in graph.layers)
        print(
            f"\n## {fam}: {spec['label']}\n{graph.name}, {params / 1e6:.2f} M parameters, "
            f"{graph.num_layers} layers ({', '.join(graph.fqns)}); config "
            f"{spec['job'].get('model_overrides') or spec['job']['hf']}; {load_line()}",
            flush=True,
        )
        t_fam = time.perf_counter()
        if args.memory_only:
            for world, ps in (
                (2, world2_plans(graph) + kind_plans(graph)),
                (4, world4_plans(graph)),
            ):
                print(f"\n== {fam}, world {world}, memory only", flush=True)
                errs = memory_only(graph, job, ps, world)
                rows.append(
                    (
                        fam,
                        world,
                        {
                            "plans": len(ps),
                            "mem_median": statistics.median(abs(x) for x in errs),
                            "mem_worst": max(abs(x) for x in errs),
                        },
                    )
                )
        else:
            r2 = world2(graph, job, args)
            raw[fam] = r2.pop("raw")
            rows.append((fam, 2, r2))
            if not args.quick:
                rows.append((fam, 4, world4(graph, job, args)))
        print(f"\n{fam}: {time.perf_counter() - t_fam:.0f} s; {load_line()}", flush=True)
    summary_table(rows, args.memory_only)
    if args.raw_out:
        with open(args.raw_out, "w") as f:
            json.dump(raw, f)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; {load_line()} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
