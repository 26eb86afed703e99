"""`uniap profile` on 2 CPU processes, and a 3-plan version of the cost-model accuracy
benchmark (profile, run, compare), each in its own spawned group."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from uniap.cluster import load_cluster
from uniap.cost_model import CostModel
from uniap.graph import build_graph
from uniap.models import build_model, example_batch
from uniap.contract import Plan
from uniap.profiles import MeasuredProfile

pytestmark = pytest.mark.dist

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SMALL = {"vocab_size": 256, "seq_len": 32, "dim": 64, "n_layers": 2, "n_heads": 4}


def gpt_two_layers():
    """The 2-block toy GPT and an example batch (for `--model test_profile:gpt_two_layers`)."""
    model = build_model("gpt-tiny", device="cpu", seed=0, n_layers=2)
    return model, example_batch(model, 8)[0]


def _uniap(*argv: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]),
        "CUDA_VISIBLE_DEVICES": "",
    }
    return subprocess.run(
        [sys.executable, "-m", "uniap.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
    )


def test_profile_cli_two_processes_under_60_s_then_plan_from_it(tmp_path: Path) -> None:
    """`uniap profile` launches 2 ranks, writes a measured profile in < 60 s, reuses it, and
    `uniap plan --profile` plans from it (provenance: measured)."""
    out = tmp_path / "profile.yaml"
    t0 = time.perf_counter()
    r = _uniap(
        "profile",
        "--model",
        "test_profile:gpt_two_layers",
        "--cluster",
        "cpu-2",
        "--global-batch-size",
        "8",
        "--repeats",
        "3",
        "--out",
        str(out),
    )
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    assert wall < 60, f"profiling took {wall:.0f} s"
    assert "collectives on n2-intra-consecutive" in r.stderr and "blocks.0 (x2) tp2" in r.stderr
    prof = MeasuredProfile.load(out)
    assert prof.hardware["world_size"] == 2 and prof.source == "measured"
    assert set(prof.collectives) == {"all_reduce", "all_gather", "reduce_scatter", "p2p"}
    block = next(lp for lp in prof.layers.values() if lp.fqns[0] == "blocks.0")
    assert block.fwd_s[1][-1] > block.fwd_s[1][0] > 0 and 2 in block.fwd_s
    assert block.activation_bytes[1][-1] > block.activation_bytes[1][0] > 0
    # the block also ran sequence parallel, saving less than under plain TP
    assert all(s < t for s, t in zip(block.sp_activation_bytes[2], block.activation_bytes[2]))

    again = _uniap(
        "profile",
        "--model",
        "test_profile:gpt_two_layers",
        "--cluster",
        "cpu-2",
        "--global-batch-size",
        "8",
        "--out",
        str(out),
    )
    assert again.returncode == 0 and "reused" in again.stderr

    plan_out = tmp_path / "plan.yaml"
    p = _uniap(
        "plan",
        "--model",
        "test_profile:gpt_two_layers",
        "--cluster",
        "cpu-2",
        "--global-batch-size",
        "8",
        "--profile",
        str(out),
        "--out",
        str(plan_out),
        "-q",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert Plan.load(plan_out).provenance["profile"] == "measured"


def test_three_plans_predicted_order_matches_measured_extremes() -> None:
    """Profile, then run 3 clearly different plans: the plan predicted slowest is measured
    slower than the plan predicted fastest, and every error stays under 100 %."""
    from accuracy_harness import spawn
    from cost_model_accuracy import make_plan

    from uniap.models import GPTConfig

    job = {"model_config": SMALL, "global_batch_size": 16, "cluster": "cpu-2"}
    prof = MeasuredProfile.from_dict(
        spawn(2, {**job, "kind": "profile", "repeats": 3, "batches": [1, 8]})
    )
    meta = build_model(GPTConfig(**SMALL), device="meta")
    graph = build_graph(meta, example_batch(meta, 2, device="meta")[0], name=meta.uniap_name)
    D, one = (2, 1, "DDP"), (1, 1, "DDP")
    plans = [
        make_plan(graph, 2, [[D]], 1),
        make_plan(graph, 2, [[D]], 8),
        make_plan(graph, 2, [[one] * 3, [one] * (graph.num_layers - 3)], 16, "GPipe"),
    ]
    runs = spawn(
        2, {**job, "kind": "run", "plans": [p.to_dict() for p in plans], "warmup": 1, "steps": 5}
    )
    cm = CostModel(graph, load_cluster("cpu-2"), prof, recompute=False)
    pred = [cm.evaluate(p).time_per_iteration_s for p in plans]
    meas = [r["tpi_s"] for r in runs]
    fast, slow = pred.index(min(pred)), pred.index(max(pred))
    assert meas[slow] > meas[fast], (pred, meas)
    assert all(abs(p / m - 1) < 1.0 for p, m in zip(pred, meas)), (pred, meas)
