"""Applying a Plan: model + Plan -> :class:`ParallelModel` on this rank.

Order of operations (the torchtitan order), in :func:`apply_plan`:

1. build the plan's meshes and groups (collective, same order on every rank);
2. ``pp == 1``: deep-copy the whole model to the device; the plan is applied to its layers in
   place, by FQN, and the model's own ``forward(*args, **kwargs)`` runs unchanged
   (:mod:`.model_forward`: base layout, layout adapters, free parameters).
   ``pp > 1`` for any other model: trace its forward and keep this rank's stage
   (:mod:`.traced_stages`; tp = 1, values between stages routed from the trace);
   ``pp > 1``, or ``pp == 1`` for a declared chain (``nn.Sequential``, ``uniap_layer_fqns()``)
   whose layers change layout (:func:`runs_own_forward`): deep-copy this rank's stage layers
   by FQN into a ``StageModule`` (with reshards) that runs them as a chain, faithful by
   declaration; a chain only *discovered* by ``layer_chain`` is never run as one;
3. TP per layer (``parallelize_module`` on the layer's TP mesh);
4. activation checkpointing of the layers with ``recompute`` (composable ``checkpoint``: the
   FQNs do not change);
5. DDP / FSDP per layer (FSDP2 ``fully_shard`` or ``replicate`` on the layer's DP mesh), the
   module as the one FSDP2 root of them (root last, so prefetching spans the stage), then
   classic DDP around the module for its ``tp == 1`` DDP layers; free parameters (outside
   every layer, or tied) are left to :class:`~.model_forward.FreeParamSync`;
6. a model on the meta device: only this rank's shards are materialised and initialised;
7. ``pp > 1``: ``PipelineStage`` + schedule on the rank's lane; ``pp == 1``: a plain loop over
   the micro-batches.

Interleaved schedules (``v`` stages per rank, :mod:`uniap.schedules`): a declared chain only
(a traced model is refused, naming the fix). The rank builds a ``StageModule`` for each of its
stages ``i, i + pp, ...`` and applies steps 3-6 to their layers, each stage being its own FSDP2
root and classic-DDP wrapper with its own gradient switches; one module holding all of its
layers (the same module objects, at their FQNs) is what parameters, state dicts and
optimizers see; one ``ScheduleInterleaved1F1B`` runs the ``v`` pipeline stages.

Gradient accumulation: without ``zero_grad`` between two ``train_step`` calls the gradients
add up as they would on one device. FSDP2 and ``replicate`` add the reduced gradient to the
sharded one; classic DDP would all-reduce the accumulated ``.grad`` bucket again, so its
gradients (and those of the free parameters) are set aside before a step and added back after
its reduction; classic-DDP gradients that are all zero (``zero_grad(set_to_none=False)``) are
left in place, not copied.

Precision (``plan.precision``, see :mod:`uniap.precision`): the stage is cast to the master
dtype before sharding, its forward and the loss run under ``torch.autocast(param_dtype)``,
and FSDP / ``replicate`` layers (and the stage root) get FSDP2's ``MixedPrecisionPolicy``.

Loss semantics: ``train_step`` computes exactly the single-device loss of the global batch
(``loss_fn`` is a mean over its batch). Each micro-batch's local loss is scaled by
``local_samples / global_batch``, gradients are summed over DP groups, and the returned value
is the sum over micro-batches and DP shards (counted once per TP group), all-reduced so every
rank returns the same float. A head at ``tp > 1`` keeps its logits sharded on the vocabulary;
the step then runs under ``loss_parallel()`` and the first loss is checked to be one it
computes without gathering them (:mod:`.vocab_loss`).

One module: :func:`apply_plan` and the :class:`ParallelModel` it returns are one concept (a
plan applied on this rank); the parallelisms themselves live one per module beside it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from uniap._torch_utils import attach_module, call_args, parent_of
from uniap.contract import Plan, Stage
from uniap.errors import PlanMismatchError, UniapError
from uniap.executor.activation_checkpoint import apply_ac
from uniap.executor.data_parallel import (
    GradSync,
    GradSyncs,
    apply_dp,
    apply_fsdp_root,
    mp_policy_for,
    wrap_ddp,
)
from uniap.executor.full_state import stream_full_state
from uniap.executor.grad_norm import clip_grad_norm_
from uniap.executor.materialize import init_units, is_meta, materialize_stage
from uniap.executor.memory import StepMemory
from uniap.executor.mesh import ProcessGroups
from uniap.executor.model_forward import (
    BatchContext,
    FreeParamSync,
    check_free_layouts,
    free_parameters,
    install_layout_adapters,
    map_batch,
)
from uniap.executor.pipeline_parallel import build_schedule
from uniap.executor.reshard import BatchReshard, map_tensors, microbatches, slice_global_batch
from uniap.executor.sequence_parallel import check_sp_supported
from uniap.executor.stage_module import StageModule, build_stage_module
from uniap.executor.tensor_parallel import apply_tp, check_tp_supported
from uniap.executor.traced_stages import RoutedForward, TracedStage, build_traced_stage
from uniap.executor.vocab_loss import VocabParallelLoss, check_head_layout, vocab_heads
from uniap.graph import Layer, is_declared_chain
from uniap.precision import install_autocast
from uniap.schedules import get_schedule
from uniap.training_log import TrainingLog

__all__ = ["ParallelModel", "apply_plan"]

logger = logging.getLogger(__name__)


def runs_own_forward(model: nn.Module, plan: Plan) -> bool:
    """True when the executor runs ``model``'s own forward under ``plan``: at ``pp == 1``,
    except for a declared chain whose layers change layout (it runs as a chain, with one
    reshard per change, what the cost model charges; its own forward would reshard in and
    out of every layer in another layout than the first's)."""
    if plan.pp_degree > 1:
        return False
    layouts = {(ls.dp, ls.tp) for ls in plan.layer_strategies}
    return not (is_declared_chain(model) and len(layouts) > 1)


def apply_plan(
    model: nn.Module,
    plan: Plan,
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    layers: Mapping[str, Layer] | None = None,
    device: torch.device,
    init_weights: Callable[[nn.Module], None] | None = None,
    seed: int = 0,
    example_inputs: Any = None,
    compile: bool | str = False,
) -> ParallelModel:
    """Build this rank's part of ``plan`` from ``model`` (a template, left untouched: the
    parallel model trains a copy). Collective.

    ``layers`` maps layer FQNs to their :class:`~uniap.graph.Layer` (for the TP plans); it is
    only needed when some layer has ``tp > 1``. ``loss_fn(output, targets)`` is a mean over
    its batch; None uses the model's own loss (``output.loss``, e.g. a Hugging Face model
    given ``labels``). A ``model`` on the meta device is sharded on meta and then only this
    rank's shards are materialised and initialised (:mod:`.materialize`:
    ``init_weights(layer)`` per layer, else ``reset_parameters()``, under ``seed + layer
    index``). ``example_inputs`` (a batch as the forward takes it) is traced to split a model
    that is not a declared chain into ``pp > 1`` stages (:mod:`.traced_stages`).
    ``compile``: ``torch.compile`` each layer in place (``True``: the default backend, or a
    backend name such as ``"aot_eager"``), after TP and recompute and before DDP/FSDP, as
    torchtitan does; FQNs and state dicts are unchanged.
    """
    meta = is_meta(model)
    layers = dict(layers or {})
    if dist.get_world_size() != plan.world_size:  # refuse before any collective
        raise PlanMismatchError(
            f"the plan is for {plan.world_size} devices, the process group has "
            f"{dist.get_world_size()}; launch {plan.world_size} processes or re-plan"
        )
    for ls in plan.layer_strategies:
        check_tp_supported(layers.get(ls.fqn), ls.fqn, ls.tp)
        if ls.sp:
            check_sp_supported(layers.get(ls.fqn), ls.fqn, ls.tp)
    spec = get_schedule(plan.schedule)
    wrapped = [
        ls for ls in plan.layer_strategies if not spec.runs_data_parallel(ls.dp, ls.tp, ls.kind)
    ]
    if plan.pp_degree > 1 and wrapped:
        raise UniapError(
            f"{plan.schedule} computes weight gradients outside autograd's backward hooks, where "
            f"DDP and FSDP reduce them (pytorch/pytorch#144530); layer {wrapped[0].fqn!r} has "
            f"dp={wrapped[0].dp}, tp={wrapped[0].tp} {wrapped[0].kind}: re-plan with schedule "
            "Interleaved1F1B, or give it dp=1 with kind DDP, or tp=1 with kind DDP (plain "
            "replicas, their gradients summed after the step) or FSDP (reduce-scattered after "
            "the last weight gradient)"
        )
    ckpt = [ls for ls in plan.layer_strategies if ls.recompute]
    if plan.pp_degree > 1 and not spec.recompute and ckpt:
        raise UniapError(
            f"{plan.schedule} cannot run activation checkpointing (layer {ckpt[0].fqn!r}): "
            "re-plan without recompute, or with schedule Interleaved1F1B"
        )
    precision = plan.precision
    if precision is not None and precision.mixed and precision.param_dtype == "float16":
        raise UniapError(
            f"precision {precision.name}: fp16 compute needs a loss scaler, which the executor "
            "does not provide yet; use 'bf16-mixed' (or 'fp32')"
        )
    all_fqns = [ls.fqn for ls in plan.layer_strategies]
    free: dict[str, tuple[str, ...]] = {}
    own_forward = runs_own_forward(model, plan)
    traced_split = not own_forward and not is_declared_chain(model)  # pp > 1, own forward
    if traced_split and plan.virtual_stages > 1:
        raise UniapError(
            f"{type(model).__name__} is split by tracing its forward, which runs one stage per "
            f"rank; {plan.schedule} needs {plan.virtual_stages} stages per rank: make the model a "
            "declared chain (nn.Sequential, or uniap_layer_fqns()), or re-plan with schedule 1F1B"
        )
    if own_forward or traced_split:
        free = free_parameters(model, all_fqns)
        base = check_free_layouts(free, plan)
        check_head_layout(plan, layers, base)
    if loss_fn is None and not (own_forward or traced_split):
        raise UniapError(
            f"loss_fn=None (the model's own loss) needs a model that computes one; "
            f"{type(model).__name__} is run as a chain of its layers: pass loss_fn=..."
        )
    if meta:  # every tensor must belong to a module that can initialise it
        try:
            init_units(model, all_fqns)
        except ValueError as e:
            raise UniapError(str(e)) from None
    groups = ProcessGroups(plan, device)
    stage_index = groups.stage_index
    stage = plan.stages[stage_index]
    # interleaved schedules: this rank's stages i, i + pp, ... (one StageModule each, sharing
    # their layer modules with `module`, the rank's layers at their FQNs)
    my_stages = plan.stages_of_rank(groups.rank)
    chunks: list[StageModule] = []
    if len(my_stages) > 1:
        stage = Stage(stage.ranks, tuple(ls for j in my_stages for ls in plan.stages[j].layers))
    traced: TracedStage | None = None
    if len(my_stages) > 1:
        chunks = [build_stage_module(model, plan, j, groups, device) for j in my_stages]
        module = _rank_module(chunks)
    elif traced_split:
        traced = build_traced_stage(model, plan, stage_index, example_inputs, groups, device)
        module = traced.module
    elif own_forward:
        module = copy.deepcopy(model)
        if not meta:
            module = module.to(device)
    else:
        module = build_stage_module(model, plan, stage_index, groups, device)
    mp_policy = None
    if precision is not None:  # master copy in master_dtype, compute under autocast
        module.to(precision.torch_dtype("master_dtype"))
        for m in chunks or [module]:
            install_autocast(m, precision, device.type)
        mp_policy = mp_policy_for(precision)
    if traced is not None:
        free_params = [p for copies, _ in traced.units() for p in copies]
        free_names = set(traced.free_names)
    else:
        free_params = [module.get_parameter(n) for n in sorted(free)]
        free_names = set(free)

    # each layer's module in the stage: at its FQN (a traced stage may call it under another
    # name of the same module, or hold none: see traced_stages.layer_paths)
    path = {ls.fqn: ls.fqn for ls in stage.layers}
    if traced is not None:
        path = {f: p for f, p in traced.layer_paths.items() if p is not None}
    placed = [ls for ls in stage.layers if ls.fqn in path]
    vocab_loss = None
    for ls in placed:
        if ls.tp > 1:
            layer_module = module.get_submodule(ls.fqn)
            apply_tp(
                layer_module,
                layers[ls.fqn],
                groups.layer_mesh(ls.dp, ls.tp)["tp"],
                sp=ls.sp,
                recompute=ls.recompute,
            )
            vocab = layers[ls.fqn].tp_vocab
            if vocab is not None and vocab.kind == "head":  # logits sharded: loss_parallel
                head = layer_module.get_submodule(vocab.module) if vocab.module else layer_module
                vocab_loss = VocabParallelLoss(head, ls.fqn, ls.tp)
    for ls in placed:
        # a sequence-parallel layer checkpoints inside its boundary (apply_tp), keeping the
        # sequence chunk of its input only
        if ls.recompute and not ls.sp:
            apply_ac(module.get_submodule(path[ls.fqn]))
    if compile:
        backend = compile if isinstance(compile, str) else "inductor"
        # vocabulary-parallel layers stay eager: dynamo (torch 2.13) cannot trace the masked
        # partial lookup of a row-sharded embedding
        eager = [ls.fqn for ls in placed if ls.tp > 1 and layers[ls.fqn].tp_vocab is not None]
        for ls in placed:
            if ls.fqn not in eager:
                module.get_submodule(path[ls.fqn]).compile(backend=backend)
        logger.info(
            "%d layer(s) compiled (backend %s)%s",
            len(placed) - len(eager),
            backend,
            f"; vocabulary-parallel {', '.join(eager)} eager" if eager else "",
        )
    # zero bubble: dp > 1 DDP layers are plain replicas, their gradients summed after the step;
    # FSDP layers (c > 1: parameters kept gathered) are reduce-scattered by torch's schedule
    # after the stage's last weight gradient (pipeline_parallel.build_schedule)
    after_step = (
        [ls for ls in placed if ls.dp > 1 and ls.kind == "DDP"] if not spec.data_parallel else []
    )
    classic = [ls for ls in placed if ls.strategy.uses_classic_ddp and ls not in after_step]
    root_mesh = None
    for ls in placed:
        if ls.strategy.fsdp2_wrapped and ls not in after_step:
            dp_mesh = groups.dp_mesh(ls.strategy)  # 2-D for HSDP
            apply_dp(
                module.get_submodule(path[ls.fqn]),
                ls.kind,
                dp_mesh,
                num_microbatches=plan.num_microbatches,
                mp_policy=mp_policy,
                ignored_params=set(free_params),
            )
            root_mesh = root_mesh or groups.layer_mesh(ls.dp, ls.tp)["dp"]
    if root_mesh is not None and chunks:  # each of the rank's stages as its own FSDP root
        for ch, j in zip(chunks, my_stages):
            mine = [ls for ls in plan.stages[j].layers if ls.strategy.fsdp2_wrapped]
            if mine:
                mesh = groups.layer_mesh(mine[0].dp, mine[0].tp)["dp"]
                apply_fsdp_root(ch, mesh, mp_policy=mp_policy, ignored_params=set(free_params))
    elif root_mesh is not None:  # the stage as FSDP root (prefetch across its layers)
        apply_fsdp_root(module, root_mesh, mp_policy=mp_policy, ignored_params=set(free_params))
    if meta:  # this rank's shards only, initialised layer by layer
        materialize_stage(
            module,
            model,
            [ls.fqn for ls in plan.layer_strategies],
            device=device,
            seed=seed,
            init_weights=init_weights,
        )
    ddp = None
    chunk_ddps: list[DistributedDataParallel | None] = []
    for ch in chunks:  # interleaved: a DDP wrapper per stage over its tp == 1 DDP layers
        mine = [ls for ls in classic if ls.fqn in ch.layer_fqns]
        chunk_ddps.append(
            wrap_ddp(
                ch,
                [ls.fqn for ls in mine],
                groups.layer_mesh(mine[0].dp, 1)["dp"].get_group(),
                exclude=free_names,
            )
            if mine
            else None
        )
    if classic and not chunks:  # one DDP wrapper over the stage's tp == 1 DDP layers
        dp = classic[0].dp
        ddp = wrap_ddp(
            module,
            [path[ls.fqn] for ls in classic],
            groups.layer_mesh(dp, 1)["dp"].get_group(),
            exclude=free_names,
        )
    free_sync = None
    context = BatchContext()
    if after_step:
        held_free = {id(q) for q in free_params}
        free_sync = FreeParamSync(
            [
                ([p], groups.layer_mesh(ls.dp, ls.tp)["dp"].get_group())
                for ls in after_step
                for p in module.get_submodule(path[ls.fqn]).parameters()
                if id(p) not in held_free
            ]
        )
        logger.info(
            "%d layer(s) as plain replicas under %s, gradients summed after the step",
            len(after_step),
            plan.schedule,
        )
    if traced is not None:
        module.forward = RoutedForward(module.forward, traced.split.routing, stage_index)
        free_sync = FreeParamSync(traced.units(), spans_stages=traced.spans)
        if free_names:
            logger.info(
                "%d free parameter copies on stage %d (tied or outside the stage's layers: %s) "
                "synchronised over every rank holding a copy",
                len(free_names),
                stage_index,
                ", ".join(sorted(free_names)[:4]),
            )
    elif own_forward:
        install_layout_adapters(module, plan, groups, base, context)
        dp_group = groups.layer_mesh(*base)["dp"].get_group()
        free_sync = FreeParamSync([([module.get_parameter(n)], dp_group) for n in sorted(free)])
        if free:
            logger.info(
                "%d free parameter(s) (outside every layer or tied: %s) synchronised over the "
                "base layout dp=%d",
                len(free),
                ", ".join(sorted(free)[:4]),
                base[0],
            )
    logger.info(
        "rank %d: stage %d/%d with %d layers (%s .. %s) applied (%s)",
        groups.rank,
        stage_index,
        plan.pp_degree,
        len(stage.layers),
        stage.layers[0].fqn,
        stage.layers[-1].fqn,
        "the model's own forward"
        if own_forward
        else ("the model's own forward, traced" if traced is not None else "a chain"),
    )
    return ParallelModel(
        module,
        plan,
        groups,
        loss_fn=loss_fn,
        ddp=ddp,
        layer_modules=[module.get_submodule(path[ls.fqn]) for ls in placed],
        free_sync=free_sync,
        batch_context=context,
        own_forward=own_forward,
        traced=traced,
        stages=list(zip(chunks, chunk_ddps)) or None,
        vocab_loss=vocab_loss,
        pipelined_vocab_loss=plan.pp_degree > 1 and bool(vocab_heads(plan, layers)),
    )


def _rank_module(chunks: list[StageModule]) -> StageModule:
    """The rank's stages as one module (their layers, the same module objects, at their model
    FQNs, plus what stage 0 keeps outside every layer): what parameters, state dicts and the
    optimizer see. Never called: each stage runs as its own pipeline stage."""
    fqns = [f for ch in chunks for f in ch.layer_fqns]
    rank = StageModule(fqns)
    for ch in chunks:
        for f in ch.layer_fqns:
            attach_module(rank, f, ch.get_submodule(f))
    layer_names = tuple(fqns)
    for ch in chunks:
        for name, t in [*ch.named_parameters(), *ch.named_buffers()]:
            if not any(name == f or name.startswith(f + ".") for f in layer_names):
                parent, leaf = parent_of(rank, name)
                if isinstance(t, nn.Parameter):
                    parent.register_parameter(leaf, t)
                else:
                    parent.register_buffer(leaf, t)
    return rank


class ParallelModel:
    """This rank's share of a model parallelised by a :class:`~uniap.plan.Plan`; behaves like
    the module it wraps for what training scripts call (``parameters``, ``named_parameters``,
    ``zero_grad``, ``train``/``eval``, ``state_dict``, calling it for inference).

    ``train_step(inputs, targets)`` runs one iteration's forward and backward over the global
    batch (every rank may be given the same global batch; each takes its part) and leaves the
    gradients of this rank's parameter shards in ``.grad``, ready for any optimizer built on
    :meth:`parameters`. Without ``zero_grad`` between two calls the gradients accumulate, as
    two ``backward`` calls of the plain model would (for every strategy kind).

    ``inputs`` are what the model's forward takes: a tensor, a tuple of positional inputs or a
    dict of keyword inputs (a Hugging Face batch: ``input_ids``, ``attention_mask``, ``labels``,
    ``pixel_values``...). Every tensor whose dim 0 is the global batch size is split per
    data-parallel rank and micro-batch; every other value is passed to each micro-batch as is.

    **Optimizers.** Build them on :meth:`param_groups`, not :meth:`parameters`::

        opt = torch.optim.AdamW(pm.param_groups(), lr=3e-4, foreach=True)   # or fused=True

    A stage may hold plain tensors (layers under classic DDP, and the non-TP parameters of a
    TP layer without data parallelism) next to DTensors (FSDP / ``replicate`` / TP layers).
    torch's multi-tensor (``foreach``, CUDA's default) and ``fused`` optimizer kernels refuse a
    list that mixes the two (``got mixed torch.Tensor and DTensor``), while DTensors of
    different meshes may share a call. :meth:`param_groups` therefore returns one group of
    plain tensors and one of DTensors (each present only when non-empty); the optimizer runs
    one kernel launch per group. Classic DDP keeps plain tensors because its bucketed
    all-reduce (what the cost model charges for ``DDP`` at ``tp == 1``) works on them.
    Gradients are clipped with :meth:`clip_grad_norm_` (the global norm over every stage,
    mesh and kind).
    """

    def __init__(
        self,
        module: nn.Module,
        plan: Plan,
        groups: ProcessGroups,
        *,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None,
        ddp: DistributedDataParallel | None = None,
        layer_modules: list[nn.Module] | None = None,
        free_sync: FreeParamSync | None = None,
        batch_context: BatchContext | None = None,
        own_forward: bool = False,
        traced: TracedStage | None = None,
        stages: list[tuple[StageModule, DistributedDataParallel | None]] | None = None,
        vocab_loss: VocabParallelLoss | None = None,
        pipelined_vocab_loss: bool = False,
    ) -> None:
        self.module = module
        """This rank's module: at ``pp == 1`` a copy of the whole model with the plan applied
        to its layers in place; at ``pp > 1`` the stage's :class:`StageModule` (layers at
        their model FQNs)."""
        # what runs the stage: the classic DDP wrapper when the stage has one (kept out of
        # the module tree: parameters and state dicts are the module's, at model FQNs)
        self._runner: nn.Module = ddp if ddp is not None else module
        self._ddp = ddp
        self._free_sync = free_sync
        self._batch_context = batch_context or BatchContext()
        self._traced = traced
        self.plan = plan
        """The plan being run."""
        self.groups = groups
        self.device = groups.device
        """Device of this rank's parameters."""
        self.stage_index = groups.stage_index
        """Pipeline stage of this rank."""
        self.last_step_time_s: float = float("nan")
        """Wall time of the last ``train_step``, in seconds."""
        self.measure_memory: bool = groups.device.type == "cuda"
        """Measure each ``train_step``'s peak memory. On by default on CUDA (the allocator's
        statistics cost nothing); off by default on CPU, where counting the saved activations
        takes a Python hook per saved tensor (a few per cent of a small step): set it to True
        to measure there."""
        self.peak_memory_bytes: int = 0
        """Peak memory of the last measured ``train_step`` on this rank, in bytes (0 before
        one): measured by the CUDA allocator, or on CPU the live parameter, gradient,
        optimizer-state and saved-activation bytes (see :mod:`uniap.executor.memory`)."""
        self.memory_breakdown: dict[str, int] = {}
        """The terms of ``peak_memory_bytes`` (``parameters_bytes``, ``gradients_bytes``,
        ``optimizer_state_bytes``, and on CPU ``activations_peak_bytes``)."""
        self._memory = StepMemory(module, groups.device)
        self.training_log: TrainingLog | None = TrainingLog(plan)
        """Logs step time, throughput, MFU and memory against the plan on rank 0 every
        ``training_log.every`` steps (logger ``uniap.training``, INFO); None: off."""
        self._loss_fn = loss_fn
        self._vocab_loss = vocab_loss
        # pp > 1 with a vocabulary-parallel head: its loss is checked on the last stage inside
        # the schedule; every rank learns the verdict after the first step (see _loss_verdict)
        self._vocab_verdict_pending = pipelined_vocab_loss
        self._vocab_refusal: UniapError | None = None
        if layer_modules is None:
            assert isinstance(module, StageModule)
            layer_modules = module.layers()
        self.layer_modules: list[nn.Module] = list(layer_modules)
        """This rank's layer modules, in chain order."""
        # the module itself too: it is the stage's FSDP root when some layer is FSDP / replicate
        self._grad_sync = GradSync([module, *self.layer_modules], ddp)
        runners: list[nn.Module] = [self._runner]
        syncs = [self._grad_sync]
        if stages:  # interleaved: each of the rank's stages runs and switches its own
            runners = [d if d is not None else m for m, d in stages]
            syncs = [GradSync([m, *m.layers()], d) for m, d in stages]
            self._grad_sync = GradSyncs(syncs)
            ddps = [d for _, d in stages if d is not None]
            self._ddp = nn.ModuleList(ddps) if ddps else None
        layout = groups.layout
        rank = groups.rank
        first = plan.stages[0].layers[0]
        # the layout the loss is computed in: the last layer's for a chain, the base layout
        # (the first layer's) for the model's own forward
        last = first if own_forward else plan.stages[-1].layers[-1]
        self._first_dp, self._first_dp_index = first.dp, layout.dp_index(rank, first.tp)
        self._last_dp, self._last_dp_index = last.dp, layout.dp_index(rank, last.tp)
        self._counts_loss = self.is_last_stage and layout.local(rank) % last.tp == 0
        c, big_b = plan.num_microbatches, plan.global_batch_size
        # local micro-batch mean -> its share of the global-batch mean
        self._loss_scale = (big_b // c // last.dp) / big_b
        self._schedule = None
        if plan.pp_degree > 1:
            assert groups.lane_group is not None
            self._schedule = build_schedule(
                runners if stages else self._runner,
                stage_index=plan.stages_of_rank(groups.rank) if stages else self.stage_index,
                num_stages=len(plan.stages),
                device=self.device,
                lane_group=groups.lane_group,
                grad_sync=syncs if stages else self._grad_sync,
                schedule=plan.schedule,
                num_microbatches=c,
                loss_fn=self._scaled_loss,
            )
        self._to_replicated: BatchReshard | None = None
        if self.is_last_stage:  # forward(): the output gathered to every rank of the stage
            r = BatchReshard(groups, (last.dp, last.tp), (1, layout.stage_size))
            self._to_replicated = None if r.is_identity else r

    # ---------------------------------------------------------------- nn.Module-like
    @property
    def is_first_stage(self) -> bool:
        """True on the ranks of stage 0."""
        return self.stage_index == 0

    @property
    def is_last_stage(self) -> bool:
        """True on the ranks of the last stage."""
        return self.stage_index == self.plan.pp_degree - 1

    @property
    def training(self) -> bool:
        """The module's training flag."""
        return self.module.training

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's parameters (shards as DTensors where sharded)."""
        return self.module.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters under the model's original FQNs."""
        return self.module.named_parameters()

    def param_groups(
        self, groups: Iterable[nn.Parameter] | Iterable[dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups in which no group mixes plain tensors and DTensors (see
        the class docstring): ``torch.optim.AdamW(pm.param_groups(), foreach=True)``.

        ``groups``: this rank's parameters, or parameter groups (dicts with ``params`` and
        per-group options such as ``weight_decay``) to split the same way, each option
        carried to both halves; default: every parameter of :meth:`parameters`. Plain tensors
        come first. The groups carry no extra keys, so optimizer checkpoints keyed by FQN
        (:mod:`uniap.checkpoint`) load under any other plan."""
        if groups is None:
            groups = [{"params": list(self.parameters())}]
        groups = list(groups)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        out: list[dict[str, Any]] = []
        for group in groups:
            params = group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            options = {k: v for k, v in group.items() if k != "params"}
            plain = [p for p in params if not isinstance(p, DTensor)]
            dtensors = [p for p in params if isinstance(p, DTensor)]
            for members in (plain, dtensors):
                if members:
                    out.append({"params": members, **options})
        return out

    def clip_grad_norm_(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        *,
        error_if_nonfinite: bool = False,
        foreach: bool | None = None,
    ) -> torch.Tensor:
        """Clip the gradients of the whole model (every stage, mesh and kind) by their global
        ``norm_type``-norm, as ``torch.nn.utils.clip_grad_norm_`` does on one process; returns
        that norm (a 0-dim tensor, the same on every rank). Collective: every rank calls it,
        after ``train_step`` and before the optimizer step (see :mod:`.grad_norm`)."""
        skip = self._traced.not_counted() if self._traced is not None else set()
        return clip_grad_norm_(
            self.parameters(),
            max_norm,
            norm_type,
            counted=[p for p in self.parameters() if id(p) not in skip],
            pp_group=self.groups.lane_group,
            device=self.device,
            foreach=foreach,
            error_if_nonfinite=error_if_nonfinite,
        )

    def train(self, mode: bool = True) -> ParallelModel:
        """Training mode (dropout on...) for the module, as ``nn.Module.train``."""
        self.module.train(mode)
        return self

    def eval(self) -> ParallelModel:
        """Evaluation mode, as ``nn.Module.eval``."""
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of this rank's parameters, as ``nn.Module.zero_grad``."""
        self.module.zero_grad(set_to_none=set_to_none)

    # ---------------------------------------------------------------- running
    def _loss(self, output: Any, target: Any) -> torch.Tensor:
        if self._traced is not None:  # the last traced stage returns the flat outputs
            output = self._traced.split.output(output)
        if self._loss_fn is not None and self._vocab_loss is None:
            return self._loss_fn(output, target)
        if self._loss_fn is not None:
            try:
                loss = self._loss_fn(output, target)
            except RuntimeError as e:  # an op DTensor cannot run on the sharded logits
                if self._vocab_loss.checked:
                    raise
                return self._refuse(self._vocab_loss.refusal(f"fails on ({e})"), output, e)
            return self._checked_vocab_loss(loss, output)
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, Mapping):
            loss = output.get("loss")
        if not isinstance(loss, torch.Tensor):
            raise UniapError(
                f"loss_fn=None uses the model's own loss, but {type(self.module).__name__} "
                "returned none (no `loss` in its output): pass the labels in the batch "
                "(e.g. labels=...) or give parallelize a loss_fn"
            )
        return loss if self._vocab_loss is None else self._checked_vocab_loss(loss, output)

    def _checked_vocab_loss(self, loss: torch.Tensor, output: Any) -> torch.Tensor:
        try:
            return self._vocab_loss.finish(loss)
        except UniapError as e:
            return self._refuse(e, output)

    def _refuse(
        self, error: UniapError, output: Any, cause: BaseException | None = None
    ) -> torch.Tensor:
        """A refused loss on vocabulary-sharded logits. At pp = 1 raised at once (every rank
        runs the loss). At pp > 1 only the last stage does, inside the schedule, while the
        other stages wait on it: raising there would leave them waiting until the process
        group's timeout. So the refusal is kept, the schedule finishes on a zero loss
        (connected to the outputs, so its backward runs through every stage and sends what
        the others wait for), and :meth:`_loss_verdict` raises it on every rank after the
        step, before ``train_step`` returns: no optimizer step has used those gradients."""
        if self._schedule is None:
            raise error from cause
        self._vocab_refusal = error
        zero = torch.zeros((), device=self.device)
        for x in pytree.tree_leaves(output):
            if isinstance(x, torch.Tensor) and x.requires_grad:
                term = (x * 0).sum()
                zero = zero + (term.full_tensor() if isinstance(term, DTensor) else term)
        return zero

    def _loss_verdict(self) -> None:
        """pp > 1 with a vocabulary-parallel head, after the first step: the last stage's
        check of the loss (:meth:`_refuse`) reaches every rank (one gather of a message, once);
        a refusal raises on all of them."""
        refusal, self._vocab_refusal = self._vocab_refusal, None
        said: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(said, str(refusal) if refusal is not None else None)
        message = next((m for m in said if m is not None), None)
        if message is None:
            self._vocab_verdict_pending = False
            return
        if refusal is not None:
            raise refusal
        raise UniapError(message)

    def _scaled_loss(self, output: Any, target: Any) -> torch.Tensor:
        with self._autocast():
            return self._loss(output, target) * self._loss_scale

    def _autocast(self) -> Any:
        """The loss runs under the plan's autocast, like the stage's forward."""
        p = self.plan.precision
        return p.autocast(self.device.type) if p is not None else contextlib.nullcontext()

    def _to_device(self, value: Any) -> Any:
        return map_tensors(lambda t: t.to(self.device, non_blocking=True), value)

    def _check_batch(self, value: Any, what: str, *, exact: bool = True) -> None:
        sizes = set()
        map_tensors(lambda t: sizes.add(t.shape[0] if t.dim() else None), value)
        big_b = self.plan.global_batch_size
        if (exact and sizes != {big_b}) or (not exact and big_b not in sizes):
            raise UniapError(
                f"train_step {what}: batch dim {sorted(sizes, key=str)} but the plan is for a "
                f"global batch of {big_b}; pass the whole global batch on every rank"
            )

    def train_step(self, inputs: Any, targets: Any = None) -> float:
        """Forward and backward of one iteration over the global batch; returns its loss
        (the single-device mean over the global batch, the same float on every rank).

        ``inputs`` (a tensor, a tuple of positional inputs or a dict of keyword inputs) and
        ``targets`` (for ``loss_fn``; None when the model computes its own loss) are the whole
        global batch, batch-first; with ``pp > 1`` only the first stage reads ``inputs`` and
        only the last stage reads ``targets`` (other ranks may pass ``None``)."""
        t0 = time.perf_counter()
        if self.measure_memory:
            with self._memory:
                total = self._run_step(inputs, targets)
            self.peak_memory_bytes = self._memory.peak_memory_bytes
            self.memory_breakdown = dict(self._memory.breakdown)
        else:
            total = self._run_step(inputs, targets)
        if self._vocab_verdict_pending:
            self._loss_verdict()
        if not self._counts_loss:
            total.zero_()
        dist.all_reduce(total)
        loss = float(total.item())
        self.last_step_time_s = time.perf_counter() - t0
        if self.training_log is not None:
            self.training_log.record(self, inputs, loss)
        logger.debug(
            "train_step: loss %.6g in %.4f s, peak %d bytes",
            loss,
            self.last_step_time_s,
            self.peak_memory_bytes,
        )
        return loss

    def _ddp_grads_aside(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Set aside the gradients classic DDP would sum again (its reducer all-reduces the
        whole ``.grad`` bucket, accumulated gradients included): ``(grad, copy)`` pairs,
        the grads zeroed; :meth:`_ddp_grads_back` adds the copies back after the step."""
        if self._ddp is None:
            return []
        params = [p for p in self._ddp.parameters() if p.grad is not None and p.requires_grad]
        if not params:
            return []
        # Gradients zeroed in place (``zero_grad(set_to_none=False)``) hold nothing to add
        # back: copying them would hold a second copy of the stage's DDP gradients through
        # the step, which the cost model does not charge. One host sync for all of them.
        local = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params]
        nonzero = torch.stack([g.any() for g in local]).tolist()
        kept = []
        for p, has_values in zip(params, nonzero):
            if has_values:
                kept.append((p, p.grad.clone()))
                p.grad.zero_()
        return kept

    @staticmethod
    def _ddp_grads_back(kept: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for p, g in kept:
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)

    def _run_step(self, inputs: Any, targets: Any) -> torch.Tensor:
        """Forward and backward of every micro-batch; this rank's share of the loss."""
        kept = self._ddp_grads_aside()
        if self._free_sync is not None:
            self._free_sync.begin()
        # a vocabulary-parallel head: the loss's forward and backward under loss_parallel()
        vocab = self._vocab_loss.context() if self._vocab_loss else contextlib.nullcontext()
        with vocab:
            if self._schedule is None:
                total = self._run_own_forward(inputs, targets)
            else:
                total = self._run_schedule(inputs, targets)
        if self._free_sync is not None:
            self._free_sync.finish()
        self._ddp_grads_back(kept)
        return total

    def _run_own_forward(self, inputs: Any, targets: Any) -> torch.Tensor:
        """``pp == 1``: the model's own forward (or a declared chain's stage module) on each
        micro-batch, then its backward."""
        c, big_b = self.plan.num_microbatches, self.plan.global_batch_size
        args, kwargs = call_args(inputs)
        self._check_batch((args, kwargs), "inputs", exact=False)
        if targets is not None:
            self._check_batch(targets, "targets")
        elif self._loss_fn is not None:
            raise UniapError("train_step: targets are None but a loss_fn was given; pass targets")
        split = dict(
            batch_size=big_b, num_microbatches=c, dp=self._first_dp, dp_index=self._first_dp_index
        )
        in_mbs = microbatches(self._to_device((args, kwargs)), **split)
        split.update(dp=self._last_dp, dp_index=self._last_dp_index)  # a chain's last layout
        tgt_mbs = microbatches(self._to_device(targets), **split)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        self._batch_context.microbatch_size = big_b // c
        for m in range(c):
            last = m == c - 1
            mb_args, mb_kwargs = in_mbs[m]
            with self._grad_sync.microbatch(last=last):
                out = self._runner(*mb_args, **mb_kwargs)
                loss = self._scaled_loss(out, tgt_mbs[m])
                # what backward needs of the output, the loss saved; holding it here would
                # keep the logits through backward (and into the next micro-batch's forward)
                del out
                self._grad_sync.before_backward(last=last)
                loss.backward()
            total += loss.detach().double()
        return total

    def _traced_inputs(self, inputs: Any) -> None:
        """Stage 0 of a traced model: this rank's part of every micro-batch, as the root
        inputs the traced stage reads, handed to the schedule already split."""
        assert self._traced is not None and self._schedule is not None
        self._schedule.presplit = None
        if not self.is_first_stage:
            return
        args, kwargs = call_args(inputs)
        self._check_batch((args, kwargs), "inputs", exact=False)
        mbs = microbatches(
            self._to_device((args, kwargs)),
            batch_size=self.plan.global_batch_size,
            num_microbatches=self.plan.num_microbatches,
            dp=self._first_dp,
            dp_index=self._first_dp_index,
        )
        self._schedule.presplit = [self._traced.split.root_values(a, k) for a, k in mbs]

    def _run_schedule(self, inputs: Any, targets: Any) -> torch.Tensor:
        """``pp > 1``: the pipeline schedule over the stages (a declared chain's, or the
        traced stages of the model's own forward)."""
        c = self.plan.num_microbatches
        if self._traced is not None:
            return self._run_traced_schedule(inputs, targets)
        if not isinstance(inputs, tuple):
            inputs = (inputs,)
        local_in = local_tgt = None
        if self.is_first_stage:
            self._check_batch(inputs, "inputs")
            local_in = self._to_device(
                slice_global_batch(
                    inputs, num_microbatches=c, dp=self._first_dp, dp_index=self._first_dp_index
                )
            )
        if self.is_last_stage:
            self._check_batch(targets, "targets")
            local_tgt = self._to_device(
                slice_global_batch(
                    targets, num_microbatches=c, dp=self._last_dp, dp_index=self._last_dp_index
                )
            )
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        losses: list[torch.Tensor] = []
        kwargs: dict[str, Any] = {}
        if self.is_last_stage:
            kwargs = {"target": local_tgt, "losses": losses}
        args = local_in if self.is_first_stage else ()
        # the losses are all that is needed: the last stage keeps no micro-batch outputs
        assert self._schedule is not None
        self._schedule.step(*args, return_outputs=False, **kwargs)
        for loss in losses:
            total += loss.detach().double()
        return total

    def _run_traced_schedule(self, inputs: Any, targets: Any) -> torch.Tensor:
        c = self.plan.num_microbatches
        self._traced_inputs(inputs)
        kwargs: dict[str, Any] = {}
        losses: list[torch.Tensor] = []
        if self.is_last_stage:
            if targets is None:
                if self._loss_fn is not None:
                    raise UniapError(
                        "train_step: targets are None but a loss_fn was given; pass targets"
                    )
                local_tgt: Any = torch.zeros(c, device=self.device)  # the model's own loss
            else:
                self._check_batch(targets, "targets")
                local_tgt = self._to_device(
                    slice_global_batch(
                        targets, num_microbatches=c, dp=self._last_dp, dp_index=self._last_dp_index
                    )
                )
            kwargs = {"target": local_tgt, "losses": losses}
        assert self._schedule is not None
        self._schedule.step(return_outputs=False, **kwargs)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for loss in losses:
            total += loss.detach().double()
        return total

    def forward(self, inputs: Any) -> Any:
        """Output of the model on a batch: every rank gets the whole batch's output
        (batch-first tensors gathered; a loss in it is this rank's part's). Meant for
        evaluation (``pm.eval(); out = pm(batch)``; gradients of a backward through it are not
        synchronised over data-parallel ranks); train with :meth:`train_step`.

        With ``pp > 1`` the pipeline runs forward only (the schedule's ``eval``) on a batch of
        the plan's global batch size, and the last stage's output (a tensor) is sent to every
        stage over the lanes."""
        if self._traced is not None:
            return self._forward_traced(inputs)
        if self.plan.pp_degree > 1:
            return self._forward_pipeline(inputs)
        args, kwargs = call_args(inputs)
        big_b = _batch_size_of((args, kwargs))
        if big_b is None or big_b % self._first_dp:
            raise UniapError(
                f"forward: no input with a batch dim divisible by dp={self._first_dp} "
                f"(batch dims {big_b}); pass a batch of a multiple of {self._first_dp} samples"
            )
        ((mb_args, mb_kwargs),) = microbatches(
            self._to_device((args, kwargs)),
            batch_size=big_b,
            num_microbatches=1,
            dp=self._first_dp,
            dp_index=self._first_dp_index,
        )
        self._batch_context.microbatch_size = big_b
        # under no_sync: a forward that no backward follows must not arm DDP's reducer
        vocab = self._vocab_loss.context() if self._vocab_loss else contextlib.nullcontext()
        with self._grad_sync.microbatch(last=False), vocab:
            out = self._runner(*mb_args, **mb_kwargs)
        out = _full_tensors(out)  # vocabulary-sharded logits gathered for the caller
        if self._to_replicated is not None:
            out = map_batch(self._to_replicated, out, big_b // self._last_dp)
        if not torch.is_grad_enabled():
            self._grad_sync.reshard()  # no backward will free FSDP's unsharded parameters
        return out

    def _forward_pipeline(self, inputs: Any) -> torch.Tensor:
        c = self.plan.num_microbatches
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        local_in: Any = ()
        if self.is_first_stage:
            self._check_batch(args, "inputs")
            local_in = self._to_device(
                slice_global_batch(
                    args, num_microbatches=c, dp=self._first_dp, dp_index=self._first_dp_index
                )
            )
        schedule = self._schedule
        assert schedule is not None
        loss_fn, schedule._loss_fn = schedule._loss_fn, None  # forward only: no loss
        try:
            with torch.no_grad():
                out = schedule.eval(*local_in)
        finally:
            schedule._loss_fn = loss_fn
        self._grad_sync.reshard()  # no backward will free FSDP's unsharded parameters
        full = None
        if self.is_last_stage:
            out = _full_tensors(out)
            if not isinstance(out, torch.Tensor):
                raise UniapError(
                    f"forward() with pp={self.plan.pp_degree} returns a tensor output only; the "
                    f"last stage returned {type(out).__name__}"
                )
            # the local output is this rank's shard of each micro-batch, in order: gather
            # each micro-batch, then concatenate
            chunks = list(out.tensor_split(c))
            if self._to_replicated is not None:
                chunks = [self._to_replicated(ch) for ch in chunks]
            full = torch.cat(chunks).cpu()
        layout = self.groups.layout
        src = layout.stage_start(self.plan.pp_degree - 1) + layout.local(self.groups.rank)
        payload = [full]
        dist.broadcast_object_list(payload, src=src, group=self.groups.lane_group)
        return payload[0].to(self.device)

    def _forward_traced(self, inputs: Any) -> Any:
        """Forward-only pipeline of a traced model on a batch of the plan's global batch size:
        the model's output (its structure, batch-first tensors whole, a scalar such as the loss
        the mean over the micro-batches) on every rank."""
        self._traced_inputs(inputs)
        schedule = self._schedule
        assert schedule is not None
        loss_fn, schedule._loss_fn = schedule._loss_fn, None  # forward only: no loss
        schedule.raw_outputs = True
        try:
            with torch.no_grad():
                chunks = schedule.eval()
        finally:
            schedule._loss_fn = loss_fn
            schedule.raw_outputs = False
        self._grad_sync.reshard()  # no backward will free FSDP's unsharded parameters
        out = None
        if self.is_last_stage:
            rows = self._traced.rows
            flat = []
            for leaves in zip(*chunks):
                if all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in leaves):
                    flat.append(torch.stack(leaves).float().mean().to(leaves[0].dtype))
                elif all(_batch_first(v, rows) for v in leaves):
                    # this rank's shard of each micro-batch: gather each, then concatenate
                    gather = self._to_replicated
                    flat.append(torch.cat([gather(v) if gather else v for v in leaves]))
                else:
                    flat.append(leaves[0])
            out = map_tensors(lambda t: t.cpu(), self._traced.split.output(flat))
        layout = self.groups.layout
        src = layout.stage_start(self.plan.pp_degree - 1) + layout.local(self.groups.rank)
        payload = [out]
        dist.broadcast_object_list(payload, src=src, group=self.groups.lane_group)
        return self._to_device(payload[0])

    __call__ = forward

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """This rank's sharded state dict (DTensors where sharded) under the model's FQNs, for
        ``torch.distributed.checkpoint`` (``dcp.save(pm.state_dict(), ...)``)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.module)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict shaped like :meth:`state_dict` (e.g. after ``dcp.load``)."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.module, dict(state_dict))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every full, unsharded tensor on rank 0 (CPU), loadable into the original model with
        ``load_state_dict``; other ranks get ``{}``. Collective over the world; streamed one
        tensor at a time (:mod:`.full_state`)."""
        full = stream_full_state(self.groups, self.module.state_dict, self.device)
        if self._traced is not None and full:  # every name of a tied weight, as the model has
            for names in self._traced.aliases:
                have = next((n for n in names if n in full), None)
                for n in names:
                    if have is not None and n not in full:
                        full[n] = full[have]
        return full


def _full_tensors(value: Any) -> Any:
    """``value`` with every DTensor (the logits of a vocabulary-parallel head) made whole."""
    return map_tensors(lambda t: t.full_tensor() if isinstance(t, DTensor) else t, value)


def _batch_first(value: Any, rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and len(value) == rows


def _batch_size_of(value: Any) -> int | None:
    """The batch of an inference call: dim 0 of the first tensor of ``value`` that has one
    (``input_ids``, ``pixel_values``: the inputs a forward takes first)."""
    sizes: list[int] = []
    map_tensors(lambda t: sizes.append(t.shape[0]) if t.dim() else None, value)
    return sizes[0] if sizes else None
