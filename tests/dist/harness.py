"""Spawn harness: run MANY cases inside ONE spawned process group.

``run_cases(world_size, "module:function", cases)`` spawns ``world_size`` processes (the
torchrun environment variables are set; on ``device="cpu"`` the GPUs are hidden and the group
is gloo, on ``device="cuda"`` it is NCCL with one GPU per rank), calls ``function(case)`` on every rank for every case in order, and returns
``{case["name"]: result}``: rank 0's return value (a JSON-able dict), or ``{"error": ...}`` if
any rank raised (``error`` names the rank). Each case is followed by a small all-gather of
the ranks' status, so a failure on one rank is reported for that case and not misattributed.
A rank stuck in a collective is released by the process group timeout (``UNIAP_TEST_PG_TIMEOUT_S``).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from uniap._dist import free_port

PG_TIMEOUT_S = float(os.environ.get("UNIAP_TEST_PG_TIMEOUT_S", "90"))


def _worker(
    rank: int,
    world_size: int,
    port: int,
    target: str,
    cases: list[dict],
    out: str,
    sys_path: list[str],
    backend: str,
) -> None:
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    import torch.distributed as dist

    from uniap._dist import init_local_worker

    init_local_worker(rank, world_size, port, backend=backend, timeout_s=PG_TIMEOUT_S)
    mod_name, fn_name = target.split(":")
    fn = getattr(importlib.import_module(mod_name), fn_name)
    results: dict[str, Any] = {}
    broken = False
    for case in cases:
        name = case["name"]
        if broken:
            results[name] = {"error": "not run: an earlier case broke the process group"}
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
            broken = True
        errors = [s for s in statuses if s]
        results[name] = {"error": errors[0]} if errors else res
        if rank == 0:
            Path(out).write_text(json.dumps(results, indent=1, default=str))
    if not broken:
        dist.barrier()
    dist.destroy_process_group()


def run_cases(
    world_size: int, target: str, cases: list[dict], *, device: str = "cpu"
) -> dict[str, Any]:
    """Run ``target`` ("module:function") on every case in one spawned group of ``world_size``."""
    names = [c["name"] for c in cases]
    assert len(set(names)) == len(names), "case names must be unique"
    backend = "nccl" if device == "cuda" else "gloo"
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device == "cpu":  # children inherit it: torch.cuda.is_available() is False there
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        try:
            mp.start_processes(
                _worker,
                args=(world_size, free_port(), target, cases, out, list(sys.path), backend),
                nprocs=world_size,
                join=True,
                start_method="spawn",
            )
        except Exception as e:  # noqa: BLE001 - a crashed rank: report what finished
            crash = f"spawned group crashed: {type(e).__name__}: {e}"
        else:
            crash = "case did not run"
        finally:
            if device == "cpu":
                if saved is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = saved
        results = json.loads(Path(out).read_text()) if os.path.exists(out) else {}
    return {n: results.get(n, {"error": crash}) for n in names}
