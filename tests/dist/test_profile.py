"""`uniap profile` on 2 CPU processes, then `uniap plan` from the profile it wrote. (How well
the measured profile predicts measured iteration times is a benchmark,
``benchmarks/cost_model_accuracy.py``, not a test: it is a timing.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from uniap.contract import Plan
from uniap.models import build_model, example_batch
from uniap.profiles import MeasuredProfile

pytestmark = pytest.mark.dist

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


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


def test_profile_cli_two_processes_then_plan_from_it(tmp_path: Path) -> None:
    """`uniap profile` launches 2 ranks, writes a measured profile, reuses it, and
    `uniap plan --profile` plans from it (provenance: measured)."""
    out = tmp_path / "profile.yaml"
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
    assert r.returncode == 0, r.stderr[-2000:]
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
