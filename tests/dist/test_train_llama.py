"""``examples/train_llama.py --tiny`` under ``torchrun`` on 4 CPU processes: a job stopped after
step 4 (checkpoint at step 3) and started again resumes from the checkpoint, recomputes step 4
bit for bit and ends with the losses of training on one process (meta-device start with the
same per-layer seeds, clipping, cosine schedule, AdamW).

Every process here is started by the test and waited for with a bound.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "train_llama.py"
STEPS, EVERY, STOP = 6, 3, 4
RTOL, ATOL = 1e-4, 1e-5
FLAGS = ["--tiny", "--steps", str(STEPS), "--ckpt-every", str(EVERY), "--warmup-steps", "2"]


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("train_llama", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torchrun(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "4", str(SCRIPT), *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout


def _losses(text: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"^step (\d+) loss (\S+) ", text, re.M)}


def _reference(example: Any) -> list[float]:
    """The same training on one process: the model initialised as the ranks initialise their
    shards (per-layer seeds), fp32."""
    from uniap.executor.materialize import init_model
    from uniap.graph import layer_chain

    args = example._args(FLAGS + ["--ckpt-dir", "unused"])
    config = example.llama_config(args)
    model = example.build_on_meta(config)
    # the Hugging Face model's own _init_weights per init unit, as the ranks do
    init_model(model, [f for f, _ in layer_chain(model)], seed=args.seed)
    opt = example.make_optimizer(model.parameters(), args)
    losses = []
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = example.lr_at(step, args)
        opt.zero_grad()
        loss = model(**example.batch(step, args, config.vocab_size)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip, foreach=True)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_train_llama_tiny_stops_resumes_and_matches_one_process(tmp_path: Path) -> None:
    """Stop after step 4, start again: resumed at the step-3 checkpoint, step 4 recomputed
    bit for bit, steps 1-6 equal to one process (rtol 1e-4)."""
    ckpt = tmp_path / "ckpt"
    first = _torchrun(*FLAGS, "--ckpt-dir", str(ckpt), "--stop-after", str(STOP))
    assert f"stopped after step {STOP}" in first, first
    second = _torchrun(*FLAGS, "--ckpt-dir", str(ckpt))
    assert f"resumed from {ckpt / 'step_00000003'} at step 3" in second, second
    assert "finished" in second
    before, after = _losses(first), _losses(second)
    assert sorted(before) == [1, 2, 3, 4] and sorted(after) == [4, 5, 6]
    assert after[4] == before[4]  # the same plan, weights, optimizer state and batch
    losses = [before[s] for s in (1, 2, 3)] + [after[s] for s in (4, 5, 6)]
    ref = _reference(_example())
    assert all(abs(a - b) <= ATOL + RTOL * abs(b) for a, b in zip(losses, ref, strict=True)), (
        losses,
        ref,
    )
    assert (ckpt / "step_00000006").is_dir()
