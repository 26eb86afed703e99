"""Applying a Plan: model + Plan -> :class:`ParallelModel` on this rank.

Order of operations (the torchtitan order), in :func:`apply_plan`:

1. build the plan's meshes and groups (collective, same order on every rank);
2. split: deep-copy this rank's stage layers by FQN into a ``StageModule`` (with reshards);
3. TP per layer (``parallelize_module`` on the layer's TP mesh);
4. activation checkpointing of the layers with ``recompute`` (composable ``checkpoint``: the
   FQNs do not change);
5. DDP / FSDP per layer (FSDP2 ``fully_shard`` or ``replicate`` on the layer's DP mesh), the
   stage module as the one FSDP2 root of them (root last, so prefetching spans the stage),
   then classic DDP around the stage for its ``tp == 1`` DDP layers;
6. ``pp > 1``: ``PipelineStage`` + schedule on the rank's lane; ``pp == 1``: a plain loop.

Precision (``plan.precision``, see :mod:`uniap.precision`): the stage is cast to the master
dtype before sharding, its forward and the loss run under ``torch.autocast(param_dtype)``,
and FSDP / ``replicate`` layers (and the stage root) get FSDP2's ``MixedPrecisionPolicy``.

Loss semantics: ``train_step`` computes exactly the single-device loss of the global batch
(``loss_fn`` is a mean over its batch). Each micro-batch's local loss is scaled by
``local_samples / global_batch``, gradients are summed over DP groups, and the returned value
is the sum over micro-batches and DP shards (counted once per TP group), all-reduced so every
rank returns the same float.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from uniap.errors import PlanMismatchError, UniapError
from uniap.executor.activation_checkpoint import apply_ac
from uniap.executor.data_parallel import (
    GradSync,
    apply_dp,
    apply_fsdp_root,
    uses_classic_ddp,
    wrap_ddp,
)
from uniap.executor.full_state import stream_full_state
from uniap.executor.grad_norm import clip_grad_norm_
from uniap.executor.materialize import is_meta, materialize_stage
from uniap.executor.memory import StepMemory
from uniap.executor.mesh import ProcessGroups
from uniap.executor.pipeline_parallel import build_schedule
from uniap.executor.reshard import BatchReshard, map_tensors, slice_global_batch
from uniap.executor.stage_module import StageModule, build_stage_module
from uniap.executor.tensor_parallel import apply_tp, check_tp_supported
from uniap.graph import Layer
from uniap.plan import Plan
from uniap.precision import install_autocast

__all__ = ["ParallelModel", "apply_plan"]

logger = logging.getLogger(__name__)


def apply_plan(
    model: nn.Module,
    plan: Plan,
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    layers: Mapping[str, Layer] | None = None,
    device: torch.device,
    init_weights: Callable[[nn.Module], None] | None = None,
    seed: int = 0,
) -> ParallelModel:
    """Build this rank's part of ``plan`` from ``model`` (left untouched). Collective.

    ``layers`` maps layer FQNs to their :class:`~uniap.graph.Layer` (for the TP plans); it is
    only needed when some layer has ``tp > 1``. A ``model`` on the meta device is sharded on
    meta and then only this rank's shards are materialised and initialised
    (:mod:`.materialize`: ``init_weights(layer)`` per layer, else ``reset_parameters()``,
    under ``seed + layer index``).
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
    precision = plan.precision
    if precision is not None and precision.mixed and precision.param_dtype == "float16":
        raise UniapError(
            f"precision {precision.name}: fp16 compute needs a loss scaler, which the executor "
            "does not provide yet; use 'bf16-mixed' (or 'fp32')"
        )
    groups = ProcessGroups(plan, device)
    stage_index = groups.stage_index
    stage = plan.stages[stage_index]
    module = build_stage_module(model, plan, stage_index, groups, device)
    mp_policy = None
    if precision is not None:  # master copy in master_dtype, compute under autocast
        module.to(precision.torch_dtype("master_dtype"))
        install_autocast(module, precision, device.type)
        mp_policy = precision.mp_policy()
    for ls in stage.layers:
        if ls.tp > 1:
            apply_tp(
                module.get_submodule(ls.fqn), layers[ls.fqn], groups.layer_mesh(ls.dp, ls.tp)["tp"]
            )
    for ls in stage.layers:
        if ls.recompute:
            apply_ac(module.get_submodule(ls.fqn))
    classic = [ls for ls in stage.layers if uses_classic_ddp(ls.kind, ls.dp, ls.tp)]
    root_mesh = None
    for ls in stage.layers:
        if ls.dp > 1 and ls not in classic:
            dp_mesh = groups.layer_mesh(ls.dp, ls.tp)["dp"]
            apply_dp(
                module.get_submodule(ls.fqn),
                ls.kind,
                dp_mesh,
                num_microbatches=plan.num_microbatches,
                mp_policy=mp_policy,
            )
            root_mesh = root_mesh or dp_mesh
    if root_mesh is not None:  # the stage as FSDP root (prefetch across its layers)
        apply_fsdp_root(module, root_mesh, mp_policy=mp_policy)
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
    if classic:  # one DDP wrapper over the stage's tp == 1 DDP layers
        dp = classic[0].dp
        ddp = wrap_ddp(
            module, [ls.fqn for ls in classic], groups.layer_mesh(dp, 1)["dp"].get_group()
        )
    logger.info(
        "rank %d: stage %d/%d with %d layers (%s .. %s) applied",
        groups.rank,
        stage_index,
        plan.pp_degree,
        len(stage.layers),
        stage.layers[0].fqn,
        stage.layers[-1].fqn,
    )
    return ParallelModel(module, plan, groups, loss_fn=loss_fn, ddp=ddp)


class ParallelModel:
    """This rank's share of a model parallelised by a :class:`~uniap.plan.Plan`.

    ``train_step(inputs, targets)`` runs one iteration's forward and backward over the global
    batch (every rank may be given the same global batch; each takes its part) and leaves the
    gradients of this rank's parameter shards in ``.grad``.

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
        module: StageModule,
        plan: Plan,
        groups: ProcessGroups,
        *,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        ddp: DistributedDataParallel | None = None,
    ) -> None:
        self.module = module
        """This rank's :class:`StageModule` (layers at their model FQNs)."""
        # what runs the stage: the classic DDP wrapper when the stage has one (kept out of
        # the module tree: parameters and state dicts are the StageModule's, at model FQNs)
        self._runner: nn.Module = ddp if ddp is not None else module
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
        self._loss_fn = loss_fn
        self._grad_sync = GradSync([module, *module.layers()], ddp)
        layout = groups.layout
        rank = groups.rank
        first = plan.stages[0].layers[0]
        last = plan.stages[-1].layers[-1]
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
                self._runner,
                stage_index=self.stage_index,
                num_stages=plan.pp_degree,
                device=self.device,
                lane_group=groups.lane_group,
                grad_sync=self._grad_sync,
                schedule=plan.schedule,
                num_microbatches=c,
                loss_fn=self._scaled_loss,
            )
        self._to_replicated: BatchReshard | None = None
        if plan.pp_degree == 1:
            r = BatchReshard(groups, (last.dp, last.tp), (1, layout.stage_size))
            self._to_replicated = None if r.is_identity else r

    # ---------------------------------------------------------------- properties
    @property
    def is_first_stage(self) -> bool:
        """True on the ranks of stage 0."""
        return self.stage_index == 0

    @property
    def is_last_stage(self) -> bool:
        """True on the ranks of the last stage."""
        return self.stage_index == self.plan.pp_degree - 1

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
        return clip_grad_norm_(
            self.parameters(),
            max_norm,
            norm_type,
            pp_group=self.groups.lane_group,
            device=self.device,
            foreach=foreach,
            error_if_nonfinite=error_if_nonfinite,
        )

    # ---------------------------------------------------------------- running
    def _scaled_loss(self, output: Any, target: Any) -> torch.Tensor:
        with self._autocast():
            return self._loss_fn(output, target) * self._loss_scale

    def _autocast(self) -> Any:
        """The loss runs under the plan's autocast, like the stage's forward."""
        p = self.plan.precision
        return p.autocast(self.device.type) if p is not None else contextlib.nullcontext()

    def _to_device(self, value: Any) -> Any:
        return map_tensors(lambda t: t.to(self.device, non_blocking=True), value)

    def _check_batch(self, value: Any, what: str) -> None:
        sizes = set()
        map_tensors(lambda t: sizes.add(t.shape[0]), value)
        if sizes != {self.plan.global_batch_size}:
            raise UniapError(
                f"train_step {what}: batch dim {sorted(sizes)} but the plan is for a global batch of "
                f"{self.plan.global_batch_size}; pass the whole global batch on every rank"
            )

    def train_step(self, inputs: Any, targets: Any) -> float:
        """Forward and backward of one iteration over the global batch; returns its loss
        (the single-device mean over the global batch, the same float on every rank).

        ``inputs`` (a tensor or a tuple of positional inputs) and ``targets`` are the whole
        global batch, batch-first; only the first stage reads ``inputs`` and only the last
        stage reads ``targets`` (other ranks may pass ``None``)."""
        t0 = time.perf_counter()
        if self.measure_memory:
            with self._memory:
                total = self._run_step(inputs, targets)
            self.peak_memory_bytes = self._memory.peak_memory_bytes
            self.memory_breakdown = dict(self._memory.breakdown)
        else:
            total = self._run_step(inputs, targets)
        if not self._counts_loss:
            total.zero_()
        dist.all_reduce(total)
        loss = float(total.item())
        self.last_step_time_s = time.perf_counter() - t0
        logger.debug(
            "train_step: loss %.6g in %.4f s, peak %d bytes",
            loss,
            self.last_step_time_s,
            self.peak_memory_bytes,
        )
        return loss

    def _run_step(self, inputs: Any, targets: Any) -> torch.Tensor:
        """Forward and backward of every micro-batch; this rank's share of the loss."""
        c = self.plan.num_microbatches
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
        if self._schedule is None:
            in_mbs = _split(local_in, c)
            tgt_mbs = _split(local_tgt, c)
            for m in range(c):
                last = m == c - 1
                with self._grad_sync.microbatch(last=last):
                    out = self._runner(*in_mbs[m])
                    loss = self._scaled_loss(out, tgt_mbs[m])
                    self._grad_sync.before_backward(last=last)
                    loss.backward()
                total += loss.detach().double()
        else:
            losses: list[torch.Tensor] = []
            kwargs: dict[str, Any] = {}
            if self.is_last_stage:
                kwargs = {"target": local_tgt, "losses": losses}
            args = local_in if self.is_first_stage else ()
            # the losses are all that is needed: the last stage keeps no micro-batch outputs
            self._schedule.step(*args, return_outputs=False, **kwargs)
            for loss in losses:
                total += loss.detach().double()
        return total

    def forward(self, inputs: Any) -> Any:
        """Output of the model on a batch (``pp == 1`` plans only): every rank gets the whole
        batch's output. Meant for evaluation (gradients of a backward through it are not
        synchronised over data-parallel ranks); train with :meth:`train_step`."""
        if self.plan.pp_degree > 1:
            raise NotImplementedError(
                f"forward() runs pp == 1 plans only (this plan has pp={self.plan.pp_degree}); "
                "use train_step, or a pp=1 plan for inference"
            )
        if not isinstance(inputs, tuple):
            inputs = (inputs,)
        local_in = self._to_device(
            slice_global_batch(
                inputs, num_microbatches=1, dp=self._first_dp, dp_index=self._first_dp_index
            )
        )
        # under no_sync: a forward that no backward follows must not arm DDP's reducer
        with self._grad_sync.microbatch(last=False):
            out = self._runner(*local_in)
        if self._to_replicated is not None:
            out = self._to_replicated(out)
        if not torch.is_grad_enabled():
            self._grad_sync.reshard()  # no backward will free FSDP's unsharded parameters
        return out

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
        return stream_full_state(self.groups, self.module.state_dict, self.device)


def _split(value: Any, num_chunks: int) -> list[Any]:
    """Split every batch-first tensor of ``value`` (a tuple of args, a tensor...) into chunks."""
    if value is None:
        return [None] * num_chunks
    if isinstance(value, torch.Tensor):
        return list(value.tensor_split(num_chunks))
    if isinstance(value, tuple | list):
        parts = [_split(v, num_chunks) for v in value]
        return [type(value)(p[m] for p in parts) for m in range(num_chunks)]
    if isinstance(value, dict):
        parts_d = {k: _split(v, num_chunks) for k, v in value.items()}
        return [{k: v[m] for k, v in parts_d.items()} for m in range(num_chunks)]
    return [value] * num_chunks
