"""Faults: a SIGKILLed rank under ``torchrun --max-restarts=1`` costs nothing (the job restarts,
resumes from the latest checkpoint and ends where an uninterrupted run ends), and a hung peer
makes the others fail within the process group timeout instead of hanging.

Every process here is started by the test; only those are killed, by pid (or by the process
group the test created for torchrun), and every wait is bounded.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from uniap._dist import free_port

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "train_resumable.py"
STEPS, EVERY, KILL_AFTER_STEP = 9, 3, 5
RTOL, ATOL = 1e-4, 1e-5


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _descendants(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        for c in _children(todo.pop()):
            seen.append(c)
            todo.append(c)
    return seen


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if SCRIPT.name.encode() not in cmd:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _wait_for(predicate: Any, timeout_s: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"torchrun exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def _losses(text: str) -> list[tuple[int, float]]:
    return [(int(s), float(v)) for s, v in re.findall(r"^step (\d+) loss (\S+)$", text, re.M)]


def _reference(steps: int) -> dict[str, torch.Tensor]:
    from uniap.models import build_model, example_batch, loss_fn_for

    model = build_model("gpt-tiny", device="cpu", seed=0)
    loss_fn = loss_fn_for("gpt-tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6)
    for step in range(steps):
        x, y = example_batch("gpt-tiny", 8, seed=1000 + step)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return model.state_dict()


def test_sigkill_rank2_torchrun_restarts_resumes_and_matches(tmp_path: Path) -> None:
    """kill -9 of rank 2 after step 5: torchrun restarts, the job resumes from the latest
    checkpoint, recomputes the lost steps bit-identically and ends with the reference
    parameters."""
    log = tmp_path / "torchrun.log"
    checkpoint_dir = tmp_path / "ckpt"
    out = tmp_path / "final.pt"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
        "--max-restarts", "1", "--monitor-interval", "0.2", str(SCRIPT),
        "--ckpt-dir", str(checkpoint_dir), "--steps", str(STEPS), "--ckpt-every", str(EVERY),
        "--out", str(out), "--step-delay-s", "0.4", "--timeout-s", "30",
    ]  # fmt: skip
    # torch 2.13: workers restarted by torchrun would read the previous attempt's gloo addresses
    # from the rendezvous store it shares with them (pytorch/pytorch#135712); a private store
    # avoids it
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    with log.open("w") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
    try:
        _wait_for(lambda: f"step {KILL_AFTER_STEP} loss" in log.read_text(), 150, "step 5", proc)
        victims = [p for p in _descendants(proc.pid) if _rank_of(p) == 2]
        assert len(victims) == 1, f"rank 2 not found among {_descendants(proc.pid)}"
        os.kill(victims[0], signal.SIGKILL)
        rc = proc.wait(timeout=150)
    finally:
        if proc.poll() is None:  # only the session this test created
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    resumed = re.search(r"resumed from (\S+) at step (\d+) \(restart 1\)", text)
    assert resumed, text[-3000:]
    at = int(resumed.group(2))
    assert at % EVERY == 0 and 0 < at < KILL_AFTER_STEP + EVERY, at
    assert resumed.group(1) == str(checkpoint_dir / f"step_{at:08d}")
    assert f"finished {STEPS} steps" in text
    seen: dict[int, list[float]] = {}
    for s, v in _losses(text):
        seen.setdefault(s, []).append(v)
    assert sorted(seen) == list(range(1, STEPS + 1))
    # steps run before the kill and again after the restart: the same loss, bit for bit
    assert len(seen[at + 1]) == 2, seen
    assert all(len(set(v)) == 1 for v in seen.values()), seen
    full = torch.load(out, weights_only=True)
    ref = _reference(STEPS)
    assert set(full) == set(ref)
    bad = [k for k in ref if not torch.allclose(full[k], ref[k], rtol=RTOL, atol=ATOL)]
    assert not bad, f"parameters differ from the uninterrupted run: {bad[:5]}"


# ------------------------------------------------------------------------------ hung peer
def _hung_peer_worker(rank: int, port: int, timeout_s: float, queue: Any) -> None:
    """Rank 1 joins, then hangs; rank 0 trains and reports how long until it got an error."""
    try:
        _hung_peer_body(rank, port, timeout_s, queue)
    except BaseException as e:  # noqa: BLE001 - reported to the test instead of lost
        queue.put((f"rank {rank} failed: {type(e).__name__}: {e}", -1.0))
    queue.close()
    queue.join_thread()  # put() is asynchronous: flush it before the hard exit
    os._exit(0)  # the group is broken: do not wait on it at exit


def _hung_peer_body(rank: int, port: int, timeout_s: float, queue: Any) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="",
    )  # fmt: skip
    from toy import build_toy, make_plan, toy_batch, toy_fqns, toy_loss

    from uniap.api import parallelize

    plan = make_plan(toy_fqns(), 2, [[(2, 1, "DDP")]], global_batch_size=8, num_microbatches=1)
    x, y = toy_batch(8)
    pm = parallelize(build_toy(), plan=plan, loss_fn=toy_loss, global_batch_size=8,
                     timeout_s=timeout_s)  # fmt: skip
    pm.train_step(x, y)  # both ranks: the group works
    if rank == 1:
        queue.put(("hanging", 0.0))
        time.sleep(600)  # the parent kills this process
        return
    t0 = time.monotonic()
    try:
        pm.train_step(x, y)
        queue.put(("no error", time.monotonic() - t0))
    except Exception as e:  # noqa: BLE001 - the test inspects it
        queue.put((f"{type(e).__name__}: {e}", time.monotonic() - t0))


def test_hung_peer_fails_within_process_group_timeout() -> None:
    """parallelize(timeout_s=3): with rank 1 stuck, rank 0's next train_step raises a timeout
    error within seconds instead of hanging."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_hung_peer_worker, args=(r, port, 3.0, queue), daemon=True)
        for r in range(2)
    ]
    for p in procs:
        p.start()
    try:
        got = dict(queue.get(timeout=120) for _ in range(2))
    finally:
        for p in procs:  # only the processes this test started
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(timeout=10)
    assert "hanging" in got, got
    ((message, waited_s),) = ((m, t) for m, t in got.items() if m != "hanging")
    assert "Timed out waiting 3000ms" in message, message  # the timeout given to parallelize
    assert 2.5 <= waited_s <= 20, (message, waited_s)
