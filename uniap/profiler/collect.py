"""Measuring a :class:`~uniap.profiler.measured.MeasuredProfile` on the launched ranks.

:func:`collect_profile` is collective over the default process group (run it under
``torchrun``, every rank with the same model and inputs) and, in order:

1. collectives: alpha-beta per op and planner group shape (:mod:`uniap.profiler.comm`);
2. per TP degree (1, then every ``tp`` the planner may use, on real TP groups of consecutive
   ranks), per distinct layer shape (``cost_key``), per local batch: forward / backward
   seconds (:mod:`uniap.profiler.compute`, averaged over the ranks, which all run at once as
   in a real step), bytes saved for backward and state bytes (:mod:`uniap.profiler.memory`);
3. the overlap coefficient (:mod:`uniap.profiler.overlap`) with the largest layer's backward
   and an all-reduce of its gradients;
4. the optimizer: AdamW step seconds over each distinct layer's parameters, fitted as
   ``a + s_per_param * n``.

Every rank returns the same profile (numbers are reduced over the ranks).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from uniap.cluster import Cluster
from uniap.graph import ModelGraph
from uniap.profiler.comm import measure_collectives
from uniap.profiler.compute import (
    capture_layer_inputs,
    fit_line,
    layer_copy,
    resize_batch,
    time_layer,
    time_median_s,
)
from uniap.profiler.measured import LayerProfile, MeasuredProfile, hardware_info, library_versions
from uniap.profiler.memory import saved_activation_bytes, state_bytes
from uniap.profiler.overlap import measure_overlap
from uniap.strategies import divisors

__all__ = ["collect_profile", "planner_batches"]

logger = logging.getLogger(__name__)


def planner_batches(global_batch_size: int, max_count: int = 6) -> list[int]:
    """Local batch sizes the planner may use (every divisor of the global batch: ``B / c /
    dp``), thinned to at most ``max_count`` spread over the range (always the smallest and
    the largest); the rest are interpolated."""
    ds = divisors(global_batch_size)
    if len(ds) <= max_count:
        return ds
    picks = {ds[round(i * (len(ds) - 1) / (max_count - 1))] for i in range(max_count)}
    return sorted(picks)


def _mean_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def _tp_mesh(tp: int, device: torch.device) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    n = dist.get_world_size()
    return init_device_mesh(device.type, (n // tp, tp), mesh_dim_names=("dp", "tp"))["tp"]


def _executor_overhead_s(
    model: nn.Module,
    graph: ModelGraph,
    inputs: dict[str, tuple],
    device: torch.device,
    warmup: int,
    repeats: int,
) -> float:
    """Seconds the executor's data-parallel wrapping adds to one forward + backward of a layer
    (FSDP2 / replicate hooks, gradient sync off as on every micro-batch but the last), measured
    on the layer with the fewest parameters over the whole world, mean of DDP and FSDP."""
    from torch.distributed.device_mesh import init_device_mesh

    from uniap.executor.data_parallel import GradSync, apply_dp

    world = dist.get_world_size()
    if world == 1:
        return 0.0
    small = min((layer for layer in graph.layers if layer.num_params), key=lambda la: la.num_params)
    plain = layer_copy(model, small.fqn, device)
    base = sum(time_layer(plain, inputs[small.fqn], device, warmup=warmup, repeats=repeats))
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    extra = []
    for kind in ("DDP", "FSDP"):
        wrapped = apply_dp(layer_copy(model, small.fqn, device), kind, mesh, num_microbatches=2)
        GradSync([wrapped]).before_backward(last=False)
        extra.append(
            sum(time_layer(wrapped, inputs[small.fqn], device, warmup=warmup, repeats=repeats))
            - base
        )
        GradSync([wrapped]).finish()
    return max(_mean_over_ranks([statistics.mean(extra)])[0], 0.0)


def collect_profile(
    model: nn.Module,
    example_inputs: Any,
    *,
    graph: ModelGraph,
    cluster: Cluster,
    global_batch_size: int,
    device: torch.device,
    batches: Sequence[int] | None = None,
    tp_degrees: Sequence[int] | None = None,
    warmup: int = 2,
    repeats: int = 5,
    progress: Callable[[str], None] | None = None,
) -> MeasuredProfile:
    """Measure ``model`` (real weights, identical on every rank) on the launched ranks.

    ``batches``: local batch sizes to time (default :func:`planner_batches`); ``tp_degrees``:
    TP degrees (default every divisor of the world up to ``cluster.devices_per_node``).
    Collective."""
    t_start = time.perf_counter()
    world = dist.get_world_size()
    if world != cluster.world_size:
        raise ValueError(
            f"cluster {cluster.name!r} has {cluster.world_size} devices but {world} ranks were "
            "launched; launch one process per device or pass the matching cluster"
        )
    say = progress or (lambda s: None)
    batches = sorted(batches or planner_batches(global_batch_size))
    if tp_degrees is None:
        tp_degrees = [d for d in divisors(world) if d <= cluster.devices_per_node]
    tp_degrees = sorted(set(tp_degrees) | {1})
    model = model.to(device)

    say(f"collectives on {world} ranks")
    collectives = measure_collectives(
        cluster.devices_per_node, device, warmup=warmup, repeats=repeats, progress=say
    )
    skeleton = MeasuredProfile(
        model={},
        hardware={"devices_per_node": cluster.devices_per_node},
        versions={},
        layers={},
        collectives=collectives,
    )

    by_key: dict[str, list[str]] = {}
    for layer in graph.layers:
        by_key.setdefault(layer.cost_key, []).append(layer.fqn)
    layer_of = {layer.fqn: layer for layer in graph.layers}
    inputs_at = {
        b: capture_layer_inputs(model, graph.fqns, resize_batch(example_inputs, b)) for b in batches
    }
    profiles = {key: LayerProfile(fqns=fqns, batches=list(batches)) for key, fqns in by_key.items()}
    for tp in tp_degrees:
        mesh = _tp_mesh(tp, device) if tp > 1 else None
        for key, fqns in by_key.items():
            layer = layer_of[fqns[0]]
            if not layer.supports_tp(tp):
                continue
            module = layer_copy(model, fqns[0], device)
            if mesh is not None:
                from uniap.executor.tensor_parallel import apply_tp

                apply_tp(module, layer, mesh)
            fwd, bwd, act = [], [], []
            for b in batches:
                f, g = time_layer(
                    module, inputs_at[b][fqns[0]], device, warmup=warmup, repeats=repeats
                )
                fwd.append(f)
                bwd.append(g)
                act.append(float(saved_activation_bytes(module, inputs_at[b][fqns[0]])))
            fwd, bwd = _mean_over_ranks(fwd), _mean_over_ranks(bwd)
            if tp > 1:
                ranks = list(range(tp))
                for i, b in enumerate(batches):
                    comm = sum(
                        skeleton.collective_s("all_reduce", p.allreduce_bytes_per_sample * b, ranks)
                        for p in layer.tp_pairs
                    )
                    fwd[i] = max(fwd[i] - comm, fwd[i] / 5)
                    bwd[i] = max(bwd[i] - comm, bwd[i] / 5)
            lp = profiles[key]
            lp.fwd_s[tp], lp.bwd_s[tp], lp.activation_bytes[tp] = fwd, bwd, act
            lp.state_bytes[tp] = state_bytes(module)
            _, fs, fe = fit_line(batches, fwd)
            _, bs, be = fit_line(batches, bwd)
            say(
                f"{fqns[0]} (x{len(fqns)}) tp{tp}: fwd {fs * 1e3:.3f} ms/sample (fit err {fe:.0%}), "
                f"bwd {bs * 1e3:.3f} ms/sample (fit err {be:.0%}), saved {act[-1] / batches[-1] / 1e3:.1f} kB/sample"
            )
            del module

    overhead = _executor_overhead_s(model, graph, inputs_at[batches[0]], device, warmup, repeats)
    say(f"executor overhead per layer per micro-batch: {overhead * 1e6:.0f} us")

    # overlap: the heaviest layer's backward against an all-reduce of its gradients
    heavy_key = max(by_key, key=lambda k: profiles[k].bwd_s[1][-1])
    heavy = layer_copy(model, by_key[heavy_key][0], device)
    heavy_in = inputs_at[batches[-1]][by_key[heavy_key][0]]

    def backward_pass() -> None:
        time_layer(heavy, heavy_in, device, warmup=0, repeats=1)

    numel = sum(p.numel() for p in heavy.parameters())
    overlap = measure_overlap(backward_pass, numel, device, warmup=warmup, repeats=repeats)
    say(f"overlap coefficient {overlap['rho']:.2f} (raw {overlap['raw']:.2f})")

    # optimizer: AdamW per distinct layer, a + s * n
    sizes, times = [], []
    for fqns in by_key.values():
        params = [p for p in layer_copy(model, fqns[0], device).parameters() if p.requires_grad]
        if not params:
            continue
        for p in params:
            p.grad = torch.zeros_like(p)
        opt = torch.optim.AdamW(params, lr=1e-3)
        sizes.append(float(sum(p.numel() for p in params)))
        times.append(time_median_s(opt.step, device, warmup=warmup, repeats=repeats))
    times = _mean_over_ranks(times)
    opt_a, opt_slope, opt_err = (
        fit_line(sizes, times) if len(sizes) > 1 else (0.0, times[0] / sizes[0], 0.0)
    )
    if opt_slope <= 0:
        opt_a, opt_slope = 0.0, max(times) / max(sizes)
    say(
        f"optimizer: {max(opt_a, 0) * 1e6:.0f} us + {opt_slope * 1e9:.2f} ns/param (fit err {opt_err:.0%})"
    )

    wall = time.perf_counter() - t_start
    return MeasuredProfile(
        model={
            "name": graph.name,
            "signature": graph.signature,
            "dtype": graph.dtype,
            "sample_shape": list(graph.sample_shape),
            "layers": list(graph.fqns),
        },
        hardware=hardware_info(
            world_size=world,
            devices_per_node=cluster.devices_per_node,
            backend=dist.get_backend(),
            device_type=device.type,
        ),
        versions=library_versions(),
        layers=profiles,
        collectives=collectives,
        overlap_coefficient=overlap["rho"],
        overlap={k: v for k, v in overlap.items() if k != "rho"},
        executor_overhead_s=overhead,
        optimizer_a_s=max(opt_a, 0.0),
        optimizer_s_per_param=opt_slope,
        settings={
            "warmup": warmup,
            "repeats": repeats,
            "batches": list(batches),
            "tp_degrees": list(tp_degrees),
            "global_batch_size": global_batch_size,
            "cluster": cluster.name,
            "wall_s": round(wall, 2),
        },
    )
