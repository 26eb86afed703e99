"""Spawn harness: run MANY cases inside ONE spawned process group, kept for the session.

``run_cases(world_size, "module:function", cases)`` runs ``function(case)`` on every rank of a
group of ``world_size`` spawned processes, for every case in order, and returns
``{case["name"]: result}``: rank 0's return value (a JSON-able dict), or ``{"error": ...}`` if
any rank raised (``error`` names the rank). The processes have the torchrun environment
variables set; on ``device="cpu"`` the GPUs are hidden and the group is gloo, on
``device="cuda"`` it is NCCL with one GPU per rank. Each case is followed by a small all-gather
of the ranks' status, so a failure on one rank is reported for that case and not
misattributed. A rank stuck in a collective is released by the process group timeout
(``UNIAP_TEST_PG_TIMEOUT_S``).

Starting a group (importing torch, transformers and uniap in every process, the rendezvous)
costs seconds per process on a small machine, so the group of each world size and device is
kept between calls and serves every test module of the session: the next call sends its cases
to the same processes. A group whose process group broke (a timeout), or in which a rank
died, is stopped and the next call starts a new one; :func:`close_groups` stops them all (the
session's end; at interpreter exit too).
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import queue
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from uniap._dist import free_port

PG_TIMEOUT_S = float(os.environ.get("UNIAP_TEST_PG_TIMEOUT_S", "90"))


def _run_job(rank: int, world_size: int, target: str, cases: list[dict], out: str) -> bool:
    """Run one call's cases on this rank; rank 0 writes the results to ``out`` after each
    case. Returns False when the process group broke."""
    import torch.distributed as dist

    mod_name, fn_name = target.split(":")
    fn = getattr(importlib.import_module(mod_name), fn_name)
    results: dict[str, Any] = {}
    broken = None
    for case in cases:
        name = case["name"]
        if broken:
            results[name] = {"error": f"not run: case {broken!r} broke the process group"}
            continue
        try:
            res: Any = fn(case)
            status = None
        except Exception as e:  # noqa: BLE001 - reported to pytest per case
            res = None
            status = f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"
        try:
            statuses: list[Any] = [None] * world_size
            dist.all_gather_object(statuses, status)
        except Exception as e:  # noqa: BLE001
            statuses = [status or f"rank {rank}: process group broken: {e}"]
            broken = name
        errors = [s for s in statuses if s]
        results[name] = {"error": errors[0]} if errors else res
        if rank == 0:
            Path(out).write_text(json.dumps(results, indent=1, default=str))
    if broken:
        return False
    dist.barrier()
    return True


def _worker(
    rank: int,
    world_size: int,
    port: int,
    jobs: Any,
    done: Any,
    sys_path: list[str],
    backend: str,
    parent: int,
) -> None:
    """Join the group, then run the jobs sent to this rank until told to stop (None), the
    process group breaks, or the parent process is gone."""
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    import torch.distributed as dist

    from uniap._dist import init_local_worker

    init_local_worker(rank, world_size, port, backend=backend, timeout_s=PG_TIMEOUT_S)
    ok = True
    while ok:
        try:
            job = jobs.get(timeout=5)
        except queue.Empty:
            if os.getppid() != parent:  # the test session died: no one will stop us
                break
            continue
        if job is None:
            break
        ok = _run_job(rank, world_size, *job)
        done.put((rank, ok))
    dist.destroy_process_group()


class _Group:
    """``world_size`` spawned processes in one process group, waiting for jobs."""

    def __init__(self, world_size: int, device: str) -> None:
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        self.jobs = [ctx.Queue() for _ in range(world_size)]
        self.done = ctx.Queue()
        backend = "nccl" if device == "cuda" else "gloo"
        port, parent = free_port(), os.getpid()
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        if device == "cpu":  # children inherit it: torch.cuda.is_available() is False there
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        try:
            self.procs = []
            for rank in range(world_size):
                args = (rank, world_size, port, self.jobs[rank], self.done, list(sys.path))
                proc = ctx.Process(target=_worker, args=(*args, backend, parent))
                proc.start()
                self.procs.append(proc)
        finally:
            if device == "cpu":
                if saved is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = saved

    def run(self, target: str, cases: list[dict], out: str) -> str | None:
        """Send the cases to every rank and wait until all ranks finish them. Returns None,
        or why the group cannot take more cases (a rank died, the process group broke)."""
        for q in self.jobs:
            q.put((target, cases, out))
        acks: dict[int, bool] = {}
        while len(acks) < self.world_size:
            try:
                rank, ok = self.done.get(timeout=1)
                acks[rank] = ok
                continue
            except queue.Empty:
                pass
            dead = [
                f"rank {r} exited with code {p.exitcode}"
                for r, p in enumerate(self.procs)
                if r not in acks and not p.is_alive()
            ]
            if dead:
                return "spawned group crashed: " + ", ".join(dead)
        return None if all(acks.values()) else "the process group broke"

    def close(self, wait_s: float = 30.0) -> None:
        """Stop the processes: asked first, then terminated."""
        for q, p in zip(self.jobs, self.procs, strict=True):
            if p.is_alive():
                q.put(None)
        deadline = time.monotonic() + wait_s
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(5)


_GROUPS: dict[tuple[int, str], _Group] = {}


def close_groups() -> None:
    """Stop every kept group (at the end of the test session)."""
    while _GROUPS:
        _GROUPS.popitem()[1].close()


atexit.register(close_groups)


def run_cases(
    world_size: int, target: str, cases: list[dict], *, device: str = "cpu"
) -> dict[str, Any]:
    """Run ``target`` ("module:function") on every case in the kept group of ``world_size``
    processes on ``device`` (started on first use)."""
    names = [c["name"] for c in cases]
    assert len(set(names)) == len(names), "case names must be unique"
    key = (world_size, device)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        group = _GROUPS.get(key)
        if group is None:
            group = _GROUPS[key] = _Group(world_size, device)
        try:
            failure = group.run(target, cases, out)
        except BaseException:  # interrupted (e.g. the test timeout): the ranks are mid-case
            _GROUPS.pop(key).close(wait_s=0)
            raise
        if failure is not None:
            _GROUPS.pop(key).close()
        results = json.loads(Path(out).read_text()) if os.path.exists(out) else {}
    missing = {"error": failure or "case did not run"}
    return {n: results.get(n, missing) for n in names}
