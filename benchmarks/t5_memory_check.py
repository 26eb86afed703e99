"""Where does the T5 memory miss come from? T5 with a 4k vocabulary (``measured_speedup.py``'s)
at world 4: uniap's plan of the speedup run and variants of it (no checkpointing, no TP, DDP
head or embedding, all FSDP, all DDP), measured profile, one iteration each: predicted peak
vs the tensor count and the allocator's peak (gradients zeroed in place).

    .venv/bin/python benchmarks/t5_memory_check.py      # ~4 min on 2 cores
    KEEP="all FSDP dp4;all DDP dp4" .venv/bin/python benchmarks/t5_memory_check.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from accuracy_harness import spawn  # noqa: E402

from uniap.cluster import load_cluster  # noqa: E402
from uniap.contract import LayerStrategy, Plan, Stage, Strategy  # noqa: E402
from uniap.cost_model import CostModel  # noqa: E402
from uniap.graph import build_graph  # noqa: E402
from uniap.models import build_model, example_batch  # noqa: E402
from uniap.profiles import MeasuredProfile  # noqa: E402

WORLD, BATCH = 4, 16
T5 = {
    "vocab_size": 4096,
    "seq_len": 64,
    "dim": 128,
    "n_layers": 2,
    "n_decoder_layers": 2,
    "ffn_dim": 512,
}


def variants() -> dict[str, list[tuple]]:
    """Per plan, one ``(dp, tp, kind, recompute)`` per layer (embed, 2 encoder blocks, norm,
    2 decoder blocks, norm, head)."""
    F4, D4 = (4, 1, "FSDP", False), (4, 1, "DDP", False)
    D22, F22 = (2, 2, "DDP", False), (2, 2, "FSDP", False)

    def ckpt(s: tuple) -> tuple:
        return (*s[:3], True)

    uniap = [F4, ckpt(D22), ckpt(F22), D4, ckpt(D4), ckpt(F4), D4, F4]
    return {
        "uniap plan (speedup run)": uniap,
        "same, no checkpointing": [s[:3] + (False,) for s in uniap],
        "same, no TP (dp4, kinds and ckpt kept)": [(4, 1, s[2], s[3]) for s in uniap],
        "same, head DDP": uniap[:-1] + [D4],
        "same, embed DDP": [D4] + uniap[1:],
        "all FSDP dp4": [F4] * 8,
        "all DDP dp4": [D4] * 8,
        "all DDP dp4 + ckpt blocks": [D4, ckpt(D4), ckpt(D4), D4, ckpt(D4), ckpt(D4), D4, D4],
    }


def main() -> None:
    meta = build_model("t5-tiny", device="meta", **T5)
    g = build_graph(meta, example_batch(meta, 2, device="meta")[0], name=meta.uniap_name)

    def plan(spec: list[tuple]) -> Plan:
        layers = tuple(
            LayerStrategy(f, Strategy(dp, tp, kind, rc))
            for f, (dp, tp, kind, rc) in zip(g.fqns, spec)
        )
        stage = Stage(tuple(range(WORLD)), layers)
        return Plan(g.name, g.signature, g.num_layers, WORLD, BATCH, 1, "1F1B", (stage,))

    keep = os.environ.get("KEEP")
    plans = {n: plan(s) for n, s in variants().items() if not keep or n in keep.split(";")}
    job = {"model": "t5-tiny", "model_overrides": T5, "global_batch_size": BATCH}
    job["cluster"] = "cpu-4"
    profile_job = {**job, "kind": "profile", "warmup": 1, "repeats": 1}
    prof = MeasuredProfile.from_dict(spawn(WORLD, {**profile_job, "batches": [1, 2, 4, 8, 16]}))
    run_job = {**job, "kind": "run", "warmup": 0, "steps": 1, "time": False}
    runs = spawn(WORLD, {**run_job, "plans": [p.to_dict() for p in plans.values()]})
    cm = CostModel(g, load_cluster("cpu-4"), prof, recompute=True)
    print(
        "| plan | predicted (MiB) | count (MiB) | allocator (MiB) | pred vs allocator "
        "| allocator - count (MiB) |"
    )
    print("|---|---|---|---|---|---|")
    mib = 2**20
    for (name, p), r in zip(plans.items(), runs):
        pred = cm.evaluate(p).peak_memory_bytes[0]
        cnt, alloc = r["stage_counted_bytes"][0], r["stage_allocator_bytes"][0]
        print(
            f"| {name} | {pred / mib:.1f} | {cnt / mib:.1f} | {alloc / mib:.1f} "
            f"| {pred / alloc - 1:+.1%} | {(alloc - cnt) / mib:.1f} |"
        )


if __name__ == "__main__":
    main()
