"""Does the cost model predict real runs? Profile, run plans, compare (the harness of
``cost_model_accuracy.py`` and ``tests/dist/test_profile.py``).

:func:`spawn` runs a job on ``world_size`` local processes (gloo on CPU, NCCL with one GPU per
rank when CUDA is available) and returns rank 0's result. Jobs:

- ``profile``: :func:`~uniap.profiler.collect.collect_profile` of the model (its YAML dict);
- ``probe``: the time of one fixed piece of work on every rank at once (see
  :func:`_job_probe`), to show drift of the machine's speed between profile and runs;
- ``run``: every plan through :func:`uniap.parallelize` (all built first), ``warmup``
  iterations each, then ``steps`` rounds of one iteration of every plan in turn (so a burst
  of load on a shared machine hits all plans alike); a plan's time is its median (an
  iteration: ``train_step`` + ``AdamW.step`` + ``zero_grad``, barrier before, slowest rank;
  ``set_to_none``: ``zero_grad``'s argument, default False);
  then one more iteration under :class:`~uniap.profiler.memory.PeakMemory` for each rank's
  peak of live tensor bytes (``rank_peak_bytes``), and one under
  :class:`~uniap.executor.memory.StepMemory` (around ``train_step``: the tensors the cost
  model charges, ``rank_counted_bytes``) inside
  :class:`~uniap.executor.memory.AllocatorPeak` (around the whole iteration: what the
  allocator handed out, ``rank_allocator_bytes``).

:func:`compare` turns predictions and measurements into rows and summary statistics:
relative errors ``(predicted - measured) / measured`` (median and worst of the absolute
values), Spearman's rank correlation of predicted vs measured time, and the measured time of
the plan the planner chose against the measured-fastest.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["build_job_model", "compare", "spawn", "spearman"]

logger = logging.getLogger(__name__)


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(v: Sequence[float]) -> np.ndarray:
        a = np.asarray(v, dtype=float)
        order = a.argsort(kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(len(a), dtype=float)
        for val in np.unique(a):  # ties share their mean rank
            idx = a == val
            r[idx] = r[idx].mean()
        return r

    rx, ry = ranks(xs), ranks(ys)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def compare(predicted_s: Sequence[float], measured_s: Sequence[float]) -> dict[str, float]:
    """``errors``, ``median_abs_error``, ``worst_abs_error``, ``spearman``."""
    errs = [p / m - 1.0 for p, m in zip(predicted_s, measured_s)]
    return {
        "errors": errs,
        "median_abs_error": statistics.median(abs(e) for e in errs),
        "worst_abs_error": max(abs(e) for e in errs),
        "spearman": spearman(predicted_s, measured_s),
    }


# ------------------------------------------------------------------ spawning
def spawn(world_size: int, job: dict[str, Any], *, timeout_s: float = 600.0) -> Any:
    """Run ``job`` on ``world_size`` spawned local ranks; rank 0's (JSON-able) result."""
    import torch
    import torch.multiprocessing as mp

    from uniap._dist import free_port

    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world_size
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            mp.start_processes(
                _worker,
                args=(world_size, free_port(), job, out, timeout_s, cuda),
                nprocs=world_size,
                join=True,
                start_method="spawn",
            )
            return json.loads(Path(out).read_text())["result"]
    finally:
        if not cuda:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved


def _worker(
    rank: int, world: int, port: int, job: dict, out: str, timeout_s: float, cuda: bool
) -> None:
    import torch.distributed as dist

    from uniap._dist import init_local_worker

    init_local_worker(rank, world, port, backend="nccl" if cuda else "gloo", timeout_s=timeout_s)
    try:
        result = _JOBS[job["kind"]](job)
        if rank == 0:
            Path(out).write_text(json.dumps({"result": result}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def build_job_model(job: dict, device: str = "cpu") -> tuple[Any, Any, Any, Any]:
    """The job's model (``hf``: a Hugging Face model of ``{"family", "overrides", "seq_len"}``
    built from its config by :func:`uniap.models.hf.tiny_hf_model`, random weights, adapted by
    ``from_hf``; ``model``: a preset of :mod:`uniap.models` with ``model_overrides``; else a GPT
    of ``model_config``), its global batch and loss. ``device="meta"``: the model without
    weights (presets; a Hugging Face model is built on the CPU)."""
    from uniap.models import GPTConfig, build_model, cross_entropy_loss, example_batch, loss_fn_for

    if "hf" in job:
        from uniap.models.hf import from_hf, hf_example_batch, tiny_hf_model

        hf = job["hf"]
        model = from_hf(tiny_hf_model(hf["family"], seed=0, **hf.get("overrides", {})))
        x, y = hf_example_batch(model, job["global_batch_size"], seq_len=hf.get("seq_len", 32))
        return model, x, y, cross_entropy_loss
    if "model" in job:
        spec: Any = job["model"]
        overrides = job.get("model_overrides", {})
    else:
        spec, overrides = GPTConfig(**job["model_config"]), {}
    model = build_model(spec, device=device, seed=0, **overrides)
    x, y = example_batch(model, job["global_batch_size"], device=device)
    return model, x, y, loss_fn_for(model)


def _model_and_batch(job: dict) -> tuple[Any, Any, Any, Any]:
    return build_job_model(job)


def _device() -> Any:
    from uniap.executor import default_device

    return default_device()


def _job_profile(job: dict) -> dict:
    from uniap.cluster import load_cluster
    from uniap.graph import build_graph
    from uniap.profiler.collect import collect_profile

    model, x, y, loss_fn = _model_and_batch(job)
    graph = build_graph(model, x, name=model.uniap_name)
    profile = collect_profile(
        model,
        x,
        graph=graph,
        cluster=load_cluster(job["cluster"]),
        global_batch_size=job["global_batch_size"],
        device=_device(),
        warmup=job.get("warmup", 2),
        repeats=job.get("repeats", 5),
        batches=job.get("batches"),
        targets=y,
        loss_fn=loss_fn,
    )
    return profile.to_dict()


def _job_run(job: dict) -> list[dict]:
    import torch
    import torch.distributed as dist

    from uniap.api import parallelize
    from uniap.contract import Plan
    from uniap.executor.memory import AllocatorPeak, StepMemory
    from uniap.profiler.memory import PeakMemory

    model, x, y, loss_fn = _model_and_batch(job)
    device = _device()
    warmup, steps, timed = job.get("warmup", 2), job.get("steps", 5), job.get("time", True)
    # False: gradients stay allocated between iterations (zeroed in place); True: torch's
    # default, freed by zero_grad and allocated again in backward
    set_to_none = job.get("set_to_none", False)
    runs = []
    for d in job["plans"]:
        plan = Plan.from_dict(d)
        pm = parallelize(
            model,
            plan=plan,
            global_batch_size=job["global_batch_size"],
            example_inputs=x,
            loss_fn=loss_fn,
        )
        opt = torch.optim.AdamW(pm.parameters(), lr=1e-4)
        runs.append((plan, pm, opt, {"step": [], "train": [], "opt": []}))

    def step(pm: Any, opt: Any, rec: dict | None) -> None:
        dist.barrier()
        t0 = time.perf_counter()
        pm.train_step(x, y)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)
        t = torch.tensor([t1 - t0, time.perf_counter() - t1], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if rec is not None:
            rec["train"].append(float(t[0]))
            rec["opt"].append(float(t[1]))
            rec["step"].append(float(t[0] + t[1]))

    for _, pm, opt, _ in runs:
        for _ in range(warmup if timed else 1):
            step(pm, opt, None)
    # rounds over all plans: a burst of load on the machine hits every plan alike
    for _ in range(steps if timed else 0):
        for _, pm, opt, rec in runs:
            step(pm, opt, rec)

    def gathered(value: Any) -> list[Any]:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out

    results = []
    for plan, pm, opt, rec in runs:
        with PeakMemory(device, [pm.module], opt) as mem:
            step(pm, opt, None)
        peaks = gathered(mem.peak_bytes)
        counted = StepMemory(pm.module, device)
        dist.barrier()
        with AllocatorPeak(device, [pm.module], [opt]) as alloc:
            with counted:
                pm.train_step(x, y)
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)
        counts = gathered({**counted.breakdown, "total": counted.peak_memory_bytes})
        allocs = gathered(alloc.peak_bytes)
        med = {k: statistics.median(v) if v else float("nan") for k, v in rec.items()}
        results.append(
            {
                "tpi_s": med["step"],
                "train_step_s": med["train"],
                "optimizer_s": med["opt"],
                "step_times_s": rec["step"],
                "rank_peak_bytes": peaks,
                "stage_peak_bytes": [max(peaks[r] for r in st.ranks) for st in plan.stages],
                "rank_counted": counts,
                "stage_counted_bytes": [
                    max(counts[r]["total"] for r in st.ranks) for st in plan.stages
                ],
                "rank_allocator_bytes": allocs,
                "stage_allocator_bytes": [max(allocs[r] for r in st.ranks) for st in plan.stages],
            }
        )
    return results


def _job_probe(job: dict) -> float:
    """Median seconds of one fixed piece of work (the model's first block, forward and
    backward at the local batch of a ``dp = world`` plan) on every rank at once, slowest rank:
    taken before profiling and around the runs, it shows whether the machine's speed drifted
    between the profile and the measurements (other load on a shared machine)."""
    import torch
    import torch.distributed as dist

    from uniap.graph import build_graph
    from uniap.profiler.compute import capture_layer_inputs, layer_copy, time_layer

    model, x, _, _ = _model_and_batch(job)
    device = _device()
    model = model.to(device)
    graph = build_graph(model, x, name=model.uniap_name)
    # the first transformer block (a layer with a TP plan), else the first layer
    fqn = next((la.fqn for la in graph.layers if la.tp_pairs and la.supports_tp(2)), graph.fqns[0])
    local = max(job["global_batch_size"] // dist.get_world_size(), 1)
    inputs = capture_layer_inputs(model, graph.fqns, x[:local].to(device))[fqn]
    dist.barrier()
    fwd, bwd = time_layer(layer_copy(model, fqn, device), inputs, device, warmup=3, repeats=15)
    t = torch.tensor([fwd + bwd], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


_JOBS = {"profile": _job_profile, "run": _job_run, "probe": _job_probe}
