"""Measuring a :class:`~uniap.profiles.measured.MeasuredProfile` on the launched ranks.

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

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from uniap.cluster import Cluster
from uniap.graph import ModelGraph
from uniap.profiler.comm import collective_sizes, free_memory_bytes, measure_collectives
from uniap.profiler.compute import (
    LayerCall,
    resize_batch,
    time_input_grad,
    time_layer,
    time_median_s,
)
from uniap.profiler.layers import LayerSource
from uniap.profiler.memory import saved_activation_bytes, state_bytes
from uniap.profiler.overlap import measure_overlap
from uniap.profiler.pipeline import measure_pipeline_overhead
from uniap.profiles.fits import fit_line
from uniap.profiles.marks import NOISE_FIT_ERROR, measured_rate, overlap_line, profile_legend
from uniap.profiles.measured import LayerProfile, MeasuredProfile, hardware_info, library_versions
from uniap.strategies import divisors
from uniap.units import fmt_bytes

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


def _dp_costs(
    source: LayerSource,
    graph: ModelGraph,
    by_key: dict[str, list[str]],
    inputs: dict[str, LayerCall],
    device: torch.device,
    collective_s: Callable[[str, float, list[int]], float],
    rho: float,
    warmup: int,
    repeats: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """Per layer shape, per data-parallel kind: what the executor's own wrapping (classic DDP,
    :func:`uniap.executor.data_parallel.wrap_ddp`, and FSDP2,
    :func:`uniap.executor.data_parallel.apply_dp`, over the whole world) costs beyond the
    layer's plain forward + backward, as residuals over the cost model's collective terms
    (see :class:`~uniap.profiles.measured.LayerProfile.dp_residual_s`). Collective."""
    from torch.distributed.device_mesh import init_device_mesh

    from uniap.executor.data_parallel import GradSync, apply_dp, wrap_ddp

    world = dist.get_world_size()
    if world == 1:
        return {}
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    ranks = list(range(world))
    layer_of = {layer.fqn: layer for layer in graph.layers}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key, fqns in by_key.items():
        layer = layer_of[fqns[0]]
        if not layer.num_params:
            continue
        x = inputs[fqns[0]]

        def fb(m: nn.Module, x: LayerCall = x) -> float:
            return sum(time_layer(m, x, device, warmup=warmup, repeats=repeats))

        base_s = fb(source.copy(fqns[0]))
        p = float(layer.param_bytes)
        ar, ag, rs = (
            collective_s(op, p, ranks) for op in ("all_reduce", "all_gather", "reduce_scatter")
        )
        res: dict[str, dict[str, float]] = {}
        for kind in ("DDP", "FSDP"):
            if kind == "DDP":  # classic DDP, as the executor runs tp == 1 DDP layers
                many = wrap_ddp(source.copy(fqns[0]), None, mesh.get_group())
                sync = GradSync([], many)
            else:
                many = apply_dp(source.copy(fqns[0]), kind, mesh, num_microbatches=2)
                sync = GradSync([many])
            sync.before_backward(last=False)
            with sync.microbatch(last=False):
                t_microbatch_s = fb(many)
            sync.before_backward(last=True)
            t_sync_s = fb(many)
            if kind == "DDP":
                res[kind] = {
                    "microbatch": t_microbatch_s - base_s,
                    # a lone layer: no backward after it hides its sync (uniap.cost_model)
                    "sync": t_sync_s - t_microbatch_s - ar,
                }
            else:
                one = apply_dp(source.copy(fqns[0]), kind, mesh, num_microbatches=1)
                t_single_s = fb(one)
                res[kind] = {
                    "microbatch": t_microbatch_s - base_s,
                    "sync": t_sync_s - t_microbatch_s - ag - rs,
                    "single": t_single_s - base_s - (1 - rho) * 2 * ag - rs,
                }
        names = [(k, ph) for k in sorted(res) for ph in sorted(res[k])]
        vals = _mean_over_ranks([res[k][ph] for k, ph in names])
        out[key] = {}
        for (k, ph), v in zip(names, vals):
            out[key].setdefault(k, {})[ph] = v
    return out


def _optimizer_costs(
    source: LayerSource,
    by_key: dict[str, list[str]],
    device: torch.device,
    warmup: int,
    repeats: int,
) -> dict[str, dict[str, float]]:
    """Per layer shape: seconds of an AdamW step over the layer's parameters as plain tensors
    (``plain``) and as the DTensor shards FSDP2 holds over the whole world (``dtensor``, which
    pays DTensor dispatch per tensor). Collective."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",)) if world > 1 else None
    keys, times = [], []
    for key, fqns in by_key.items():
        for variant in ("plain", "dtensor"):
            module = source.copy(fqns[0])
            if variant == "dtensor":
                if mesh is None or not any(True for _ in module.parameters()):
                    continue
                fully_shard(module, mesh=mesh)
            params = [p for p in module.parameters() if p.requires_grad]
            if not params:
                continue
            for p in params:
                p.grad = torch.zeros_like(p)
            opt = torch.optim.AdamW(params, lr=1e-3)
            keys.append((key, variant))
            times.append(time_median_s(opt.step, device, warmup=warmup, repeats=repeats))
    out: dict[str, dict[str, float]] = {}
    for (key, variant), t in zip(keys, _mean_over_ranks(times) if times else []):
        out.setdefault(key, {})[variant] = t
    return out


def _loss_costs(
    source: LayerSource,
    fqn: str,
    inputs: dict[int, dict[str, LayerCall]],
    targets: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    device: torch.device,
    warmup: int,
    repeats: int,
    tp: tuple[Any, Any] | None = None,
) -> tuple[list[float], list[float]]:
    """Per measured batch: seconds of the loss's forward + backward on the last layer's
    output, and the peak bytes, beyond the last layer's parameters, gradients, input and
    saved activations, while its output goes through ``loss_fn`` and back (the output, the
    loss's own saved tensors and the backward's gradient buffers). ``tp``: ``(layer, TP
    mesh)`` of a vocabulary-parallel head, sharded as the executor shards it, the loss run
    under ``loss_parallel()`` on the sharded logits."""
    from torch.distributed.tensor.parallel import loss_parallel

    from uniap.executor.tensor_parallel import apply_tp
    from uniap.profiler.memory import PeakMemory

    vocab = loss_parallel if tp is not None else contextlib.nullcontext
    times, working = [], []
    for b, ins in sorted(inputs.items()):
        module = source.copy(fqn)
        if tp is not None:
            apply_tp(module, *tp)
        for p in module.parameters():
            p.grad = torch.zeros_like(p)
        x = ins[fqn].prepared()
        tgt = resize_batch(targets, b)
        with torch.no_grad():
            out = x(module)

        def loss_pass(out: Any = out, tgt: Any = tgt, vocab: Any = vocab) -> None:
            o = out.detach().requires_grad_(True)
            with torch.enable_grad(), vocab():
                loss_fn(o, tgt).backward()

        times.append(time_median_s(loss_pass, device, warmup=warmup, repeats=repeats))
        del out
        saved_bytes = saved_activation_bytes(module, x)
        if device.type == "cuda":  # the allocator's peak counts everything already there
            torch.cuda.synchronize(device)
            base_bytes = float(torch.cuda.memory_allocated(device))
        else:  # the tracker counts the registered parameters and gradients
            st = state_bytes(module)
            base_bytes = float(st["param_bytes"] + st["grad_bytes"])
        with PeakMemory(device, [module]) as pm, torch.enable_grad(), vocab():
            loss = loss_fn(x(module), tgt)
            loss.backward()
            del loss
        working.append(max(pm.peak_bytes - base_bytes - saved_bytes, 0.0))
    return _mean_over_ranks(times), working


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
    targets: Any = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    seed: int = 0,
    init_weights: Callable[[nn.Module], None] | None = None,
) -> MeasuredProfile:
    """Measure ``model`` (identical on every rank) on the launched ranks.

    The model stays where it is, on the meta device, the host or the device: layers go to
    ``device`` one at a time (:class:`~uniap.profiler.layers.LayerSource`), so a model that
    fits no single device can be profiled. Layers of a meta model are initialised as the
    executor does (``seed``, ``init_weights``); the weights' values do not change what is
    measured, only data-dependent control flow would see them.

    ``batches``: local batch sizes to time (default :func:`planner_batches`); ``tp_degrees``:
    TP degrees (default every divisor of the world up to ``cluster.devices_per_node``);
    ``targets`` and ``loss_fn`` (both or neither): the loss's working memory at the last layer
    is measured (else the cost model's analytic term is used). Collective.

    One step per measured quantity, in this order: collectives, layer compute and memory per
    TP degree (:func:`_measure_layers`), the overlap coefficient (:func:`_measure_overlap`),
    the data-parallel wrapping (:func:`_measure_dp_wrapping`), the optimizer step
    (:func:`_measure_optimizer`), the pipeline schedule's overhead and the loss
    (:func:`_measure_loss`)."""
    t_start = time.perf_counter()
    world = dist.get_world_size()
    if world != cluster.world_size:
        raise ValueError(
            f"cluster {cluster.name!r} has {cluster.world_size} devices but {world} ranks were "
            "launched; launch one process per device or pass the matching cluster"
        )
    if (targets is None) != (loss_fn is None):
        raise ValueError("pass both targets and loss_fn to measure the loss's memory, or neither")
    say = progress or (lambda s: None)
    batches = sorted(batches or planner_batches(global_batch_size))
    if tp_degrees is None:
        tp_degrees = [d for d in divisors(world) if d <= cluster.devices_per_node]
    tp_degrees = sorted(set(tp_degrees) | {1})
    source = LayerSource(model, graph.fqns, device, seed=seed, init_weights=init_weights)
    ctx = _Context(source, graph, device, batches, warmup, repeats, say)
    # the inputs of one layer per distinct shape (the one every step measures) and the last
    # layer (where the loss is measured)
    wanted = [fqns[0] for fqns in ctx.by_key.values()]
    wanted += [graph.layers[-1].fqn] if graph.layers[-1].fqn not in wanted else []
    ctx.inputs_at = {
        b: source.capture_inputs(wanted, resize_batch(example_inputs, b)) for b in batches
    }

    say(f"collectives on {world} ranks")
    largest = max(
        max(layer.param_bytes for layer in graph.layers),
        global_batch_size * max(layer.output_bytes_per_sample for layer in graph.layers),
    )
    sizes = collective_sizes(largest, free_memory_bytes(device))
    say(f"collectives up to {fmt_bytes(sizes[-1])} (largest planned message {fmt_bytes(largest)})")
    collectives = measure_collectives(
        cluster.devices_per_node,
        device,
        sizes_bytes=sizes,
        warmup=warmup,
        repeats=repeats,
        progress=say,
    )
    profiles = _measure_layers(ctx, tp_degrees)
    overlap = _measure_overlap(ctx, profiles)
    _measure_dp_wrapping(ctx, profiles, collectives, cluster, overlap["rho"])
    opt_a, opt_slope = _measure_optimizer(ctx, profiles)
    for line in profile_legend(ctx.marks):
        say(line)
    pipeline_s = _measure_pipeline(ctx)
    if loss_fn is not None:
        _measure_loss(ctx, profiles, targets, loss_fn, tp_degrees)

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
        pipeline_overhead_s=pipeline_s,
        overlap={k: v for k, v in overlap.items() if k != "rho"},
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


class _Context:
    """What every measuring step of :func:`collect_profile` shares: where its layers come
    from (``source``), its distinct layers (``by_key``: cost key -> FQNs), the captured inputs
    of one layer per distinct shape and of the last layer per batch, the settings and the
    noise / clamp marks the output used (explained at the end)."""

    def __init__(
        self,
        source: LayerSource,
        graph: ModelGraph,
        device: torch.device,
        batches: list[int],
        warmup: int,
        repeats: int,
        say: Callable[[str], None],
    ) -> None:
        self.source, self.graph, self.device = source, graph, device
        self.batches, self.warmup, self.repeats, self.say = batches, warmup, repeats, say
        self.by_key: dict[str, list[str]] = {}
        for layer in graph.layers:
            self.by_key.setdefault(layer.cost_key, []).append(layer.fqn)
        self.layer_of = {layer.fqn: layer for layer in graph.layers}
        self.inputs_at: dict[int, dict[str, LayerCall]] = {}
        self.marks: set[str] = set()


def _measure_layers(ctx: _Context, tp_degrees: Sequence[int]) -> dict[str, LayerProfile]:
    """Forward and backward time, saved activations and state bytes of every distinct layer at
    every batch and TP degree."""
    batches = ctx.batches
    profiles = {
        key: LayerProfile(fqns=fqns, batches=list(batches)) for key, fqns in ctx.by_key.items()
    }
    for tp in tp_degrees:
        mesh = _tp_mesh(tp, ctx.device) if tp > 1 else None
        for key, fqns in ctx.by_key.items():
            layer = ctx.layer_of[fqns[0]]
            if not layer.supports_tp(tp):
                continue
            module = ctx.source.copy(fqns[0])
            if mesh is not None:
                from uniap.executor.tensor_parallel import apply_tp

                apply_tp(module, layer, mesh)
            fwd, bwd, act, wgrad = [], [], [], []
            for b in batches:
                f, g = time_layer(
                    module,
                    ctx.inputs_at[b][fqns[0]],
                    ctx.device,
                    warmup=ctx.warmup,
                    repeats=ctx.repeats,
                )
                fwd.append(f)
                bwd.append(g)
                # the weight gradients' part (zero-bubble schedules): the backward less one
                # that computes the input gradients only
                i = time_input_grad(
                    module,
                    ctx.inputs_at[b][fqns[0]],
                    ctx.device,
                    warmup=ctx.warmup,
                    repeats=ctx.repeats,
                )
                wgrad.append(max(g - i, 0.0) if layer.num_params else 0.0)
                act.append(float(saved_activation_bytes(module, ctx.inputs_at[b][fqns[0]])))
            # at tp > 1 the times include the layer's own TP collectives, as they run on a
            # real TP group (profile.tp_comm_in_compute): subtracting a modelled estimate of
            # them would only add the collectives' noise to the compute
            fwd, bwd = _mean_over_ranks(fwd), _mean_over_ranks(bwd)
            lp = profiles[key]
            lp.fwd_s[tp], lp.bwd_s[tp], lp.activation_bytes[tp] = fwd, bwd, act
            lp.wgrad_s[tp] = _mean_over_ranks(wgrad)
            if mesh is not None and layer.supports_sp(tp):
                # the same layer run sequence parallel: what it saves (its times are the TP
                # ones plus the cost model's modelled SP collectives)
                from uniap.executor.tensor_parallel import apply_tp

                sp_module = ctx.source.copy(fqns[0])
                apply_tp(sp_module, layer, mesh, sp=True)
                lp.sp_activation_bytes[tp] = [
                    float(saved_activation_bytes(sp_module, ctx.inputs_at[b][fqns[0]]))
                    for b in batches
                ]
                del sp_module
            lp.state_bytes[tp] = state_bytes(module)
            _, fs, fe = fit_line(batches, fwd)
            _, bs, be = fit_line(batches, bwd)
            ctx.say(
                f"{fqns[0]} (x{len(fqns)}) tp{tp}: {measured_rate('fwd', fs, fe, ctx.marks)}, "
                f"{measured_rate('bwd', bs, be, ctx.marks)}, "
                f"saved {act[-1] / batches[-1] / 1e3:.1f} kB/sample"
            )
            del module
    return profiles


def _measure_overlap(ctx: _Context, profiles: dict[str, LayerProfile]) -> dict[str, float]:
    """The overlap coefficient: the heaviest layer's backward against an all-reduce of its
    gradients."""
    heavy_key = max(ctx.by_key, key=lambda k: profiles[k].bwd_s[1][-1])
    heavy = ctx.source.copy(ctx.by_key[heavy_key][0])
    heavy_in = ctx.inputs_at[ctx.batches[-1]][ctx.by_key[heavy_key][0]]

    def backward_pass() -> None:
        time_layer(heavy, heavy_in, ctx.device, warmup=0, repeats=1)

    numel = sum(p.numel() for p in heavy.parameters())
    overlap = measure_overlap(
        backward_pass, numel, ctx.device, warmup=ctx.warmup, repeats=ctx.repeats
    )
    ctx.say(overlap_line(overlap["rho"], overlap["raw"]))
    return overlap


def _measure_dp_wrapping(
    ctx: _Context, profiles: dict[str, LayerProfile], collectives: Any, cluster: Cluster, rho: float
) -> None:
    """What DDP and FSDP wrapping adds per layer beyond the modelled collectives."""
    ctx.say("data-parallel wrapping (DDP, FSDP) per layer")
    skeleton = MeasuredProfile(
        model={},
        hardware={"devices_per_node": cluster.devices_per_node},
        versions={},
        layers={},
        collectives=collectives,
    )
    mid = ctx.batches[len(ctx.batches) // 2]
    dp = _dp_costs(
        ctx.source,
        ctx.graph,
        ctx.by_key,
        ctx.inputs_at[mid],
        ctx.device,
        skeleton.collective_s,
        rho,
        ctx.warmup,
        ctx.repeats,
    )
    for key, res in dp.items():
        profiles[key].dp_residual_s = res
        ctx.say(
            f"{ctx.by_key[key][0]}: "
            + ", ".join(
                f"{k} {ph} {v * 1e3:+.2f} ms" + (" [negative]" if v < 0 else "")
                for k, r in res.items()
                for ph, v in r.items()
            )
        )
        if any(v < 0 for r in res.values() for v in r.values()):
            ctx.marks.add("residual")


def _measure_optimizer(ctx: _Context, profiles: dict[str, LayerProfile]) -> tuple[float, float]:
    """AdamW per distinct layer, plain and as DTensor shards; ``(a, s)`` of ``a + s * n`` fitted
    over the plain ones."""
    opt_times = _optimizer_costs(ctx.source, ctx.by_key, ctx.device, ctx.warmup, ctx.repeats)
    sizes, times = [], []
    for key, fqns in ctx.by_key.items():
        if "plain" not in opt_times.get(key, {}):
            continue
        profiles[key].optimizer_s = dict(opt_times[key])
        sizes.append(float(ctx.layer_of[fqns[0]].num_params))
        times.append(opt_times[key]["plain"])
    opt_a, opt_slope, opt_err = (
        fit_line(sizes, times) if len(sizes) > 1 else (0.0, times[0] / sizes[0], 0.0)
    )
    clamped = opt_slope <= 0
    if clamped:
        opt_a, opt_slope = 0.0, max(times) / max(sizes)
        ctx.marks.add("optimizer")
    if opt_err > NOISE_FIT_ERROR:
        ctx.marks.add("noise")
    ctx.say(
        f"optimizer: {max(opt_a, 0) * 1e6:.0f} us + {opt_slope * 1e9:.2f} ns/param (fit err "
        f"{opt_err:.0%})"
        + (" [slope <= 0, clamped]" if clamped else "")
        + (" [noise]" if opt_err > NOISE_FIT_ERROR else "")
    )
    return opt_a, opt_slope


def _measure_pipeline(ctx: _Context) -> float:
    """The pipeline schedule's own time per stage and micro-batch, with an activation of the
    model's largest stage-boundary size."""
    ctx.say("pipeline schedule overhead")
    boundary = max((la.output_bytes_per_sample for la in ctx.graph.layers[:-1]), default=4.0)
    pipeline_s = measure_pipeline_overhead(
        ctx.device, activation_numel=int(boundary // 4), warmup=ctx.warmup, repeats=ctx.repeats
    )
    ctx.say(f"pipeline overhead per stage per micro-batch: {pipeline_s * 1e6:.0f} us")
    return pipeline_s


def _measure_loss(
    ctx: _Context,
    profiles: dict[str, LayerProfile],
    targets: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    tp_degrees: Sequence[int] = (1,),
) -> None:
    """The loss's time and working memory at the last layer, per batch (and, for a
    vocabulary-parallel head, per TP degree > 1 it supports, under ``loss_parallel()``)."""
    last = ctx.graph.layers[-1]
    lp = profiles[last.cost_key]
    args = (ctx.source, last.fqn, ctx.inputs_at, targets, loss_fn, ctx.device)
    lp.loss_s, lp.loss_working_bytes = _loss_costs(*args, ctx.warmup, ctx.repeats)
    ctx.say(
        f"loss at {last.fqn}, batch {ctx.batches[-1]}: {lp.loss_s[-1] * 1e3:.2f} ms, "
        f"{lp.loss_working_bytes[-1] / 2**20:.2f} MiB working memory"
    )
    if last.tp_vocab is None or last.tp_vocab.kind != "head":
        return
    for tp in tp_degrees:
        if tp > 1 and last.supports_tp(tp):
            mesh = _tp_mesh(tp, ctx.device)
            times, working = _loss_costs(*args, ctx.warmup, ctx.repeats, tp=(last, mesh))
            lp.loss_tp[tp] = {"loss_s": times, "loss_working_bytes": working}
            ctx.say(
                f"loss at {last.fqn} tp{tp} (loss parallel), batch {ctx.batches[-1]}: "
                f"{times[-1] * 1e3:.2f} ms, {working[-1] / 2**20:.2f} MiB working memory"
            )
