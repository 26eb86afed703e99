"""Data parallelism of the layers of one stage over their DP groups: ``DDP``, ``FSDP``,
``ZeRO2``, ``HSDP`` or ``FSDP-offload``.

* ``DDP`` on a layer with ``tp == 1`` (so ``dp`` is the whole stage): classic
  ``torch.nn.parallel.DistributedDataParallel`` around the stage module, over the parameters
  of all such layers of the stage at once (:func:`wrap_ddp`; every other parameter and buffer
  is left to its own layer's wrapping). Parameters stay plain tensors; gradients are
  all-reduced by DDP's C++ reducer in **buckets** (``bucket_cap_mb``, 25 MiB; the first
  1 MiB), launched as the buckets fill during the last micro-batch's backward, with
  ``gradient_as_bucket_view`` (no second copy of the gradients). The wrapper is kept outside
  the module tree, so the FQNs do not change.
* ``DDP`` on a layer with ``tp > 1`` (its DP group is a strided subset of the stage):
  ``replicate`` (torch's FSDP2-based DDP, ``torch.distributed._composable.
  replicate_with_fsdp``) on the layer's own DP mesh, one state per layer: **one all-reduce
  of the layer's gradients** per iteration, during the last micro-batch's backward.
* ``FSDP``: ``fully_shard`` over the DP group (with TP, the ``dp`` dim of the 2-D mesh: the
  TP shards are sharded again on dim 0). Per iteration, when ``c == 1``
  (``reshard_after_forward=True``): all-gather of the parameters in forward, all-gather again
  in backward, one reduce-scatter of the gradients. When ``c > 1``
  (``reshard_after_forward=False``, and no resharding after backward until the last
  micro-batch): **one all-gather** (first forward) **and one reduce-scatter** (last backward)
  per iteration; the unsharded parameters and gradients stay resident meanwhile.
* ``ZeRO2``: ``fully_shard`` over the DP group with ``reshard_after_forward=False`` for every
  ``c``: **one all-gather** per iteration (first forward; none in backward, the parameters
  stay whole until the last micro-batch's backward reshards them) and **one reduce-scatter
  per micro-batch** (every backward reduces into the sharded gradients, so no whole gradient
  outlives its layer's backward). Gradients and optimizer state are sharded, parameters are
  not (ZeRO stage 2).
* ``HSDP``: ``fully_shard`` on the 2-D ``(dp_replicate, dp_shard)`` mesh of the layer's DP
  group (``tp == 1``; shard groups of ``shard_degree`` consecutive ranks): as FSDP inside each
  shard group, and the reduce-scattered gradient shard all-reduced across the replicas.
* ``FSDP-offload``: ``fully_shard`` over the DP group (``tp == 1``) with
  ``offload_policy=CPUOffloadPolicy()`` (pinned host memory on CUDA): the sharded parameters,
  their gradients and so the optimizer state live on the host, and the optimizer steps there.
  In **every micro-batch** the shard is copied to the device and all-gathered in forward and
  again in backward (``reshard_after_forward=True``, resharded after every backward), and the
  gradient is reduce-scattered and its shard copied to the host, where the micro-batches'
  shards accumulate: nothing of the layer stays on the device between micro-batches. Works on
  CPU devices with gloo too (the copies are then no-ops).

**One FSDP root per stage** (:func:`apply_fsdp_root`, the torchtitan order: every layer
first, the stage module last). The stage module gets ``fully_shard`` too, managing none of
the layers' parameters (``ignored_params``: everything not already under a layer's FSDP2 /
``replicate`` state, e.g. classic DDP layers and TP-only layers). It becomes the root of all
the stage's FSDP2 states, which then share one stream context and one record of the forward
order: while layer ``u`` computes, the all-gather of layer ``u + 1`` is already issued on
the all-gather stream (implicit forward prefetch), and in backward the all-gather of layer
``u - 1`` is issued before layer ``u``'s backward computes (explicit backward prefetch, set
per layer); each layer's reduce-scatter runs on its own stream during the
backward of the layers before it. With one root per layer (no stage root) every all-gather
waited in its own layer's pre-forward, exposed. The root issues no collectives itself.

Gradients are **summed** over the DP group (divide factor 1, SUM reductions): every rank
scales its micro-batch loss by ``local_samples / global_batch`` so the sum is the global-batch
mean. Gloo in torch 2.13 supports what FSDP2 needs on CPU (all-gather, reduce-scatter,
all-reduce, checked); with a divide factor of 1 FSDP2 would reduce with ``PREMUL_SUM(1)``, which
gloo refuses ("Cannot use ReduceOp.PREMUL_SUM with Gloo"), so ``force_sum_reduction_for_comms``
makes it issue plain ``SUM`` collectives (on NCCL too: a division by 1 is skipped). Classic
DDP averages by default; its communication hook here all-reduces with ``SUM`` instead.

:class:`GradSync` toggles the per-micro-batch flags: gradient reduction and resharding after
backward only on the last micro-batch.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Collection, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.nn.parallel import DistributedDataParallel

from uniap.contract import DDP_BUCKET_BYTES, OFFLOAD
from uniap.precision import Precision

__all__ = ["GradSync", "apply_dp", "apply_fsdp_root", "fsdp_roots", "wrap_ddp"]

logger = logging.getLogger(__name__)

_ZERO2: weakref.WeakSet[nn.Module] = weakref.WeakSet()
"""Modules :func:`apply_dp` sharded as ``ZeRO2`` (they reduce after every micro-batch)."""
_OFFLOADED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
"""Modules :func:`apply_dp` sharded as ``FSDP-offload`` (they gather, reduce and reshard in
every micro-batch)."""


def mp_policy_for(precision: Precision) -> MixedPrecisionPolicy:
    """FSDP2's ``MixedPrecisionPolicy`` for FSDP / ``replicate`` layers under ``precision``:
    parameters gathered in ``param_dtype``, gradients reduced in ``reduce_dtype``."""
    if not precision.mixed:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(
        param_dtype=precision.torch_dtype(), reduce_dtype=precision.torch_dtype("reduce_dtype")
    )


def apply_dp(
    module: nn.Module,
    kind: str,
    dp_mesh: DeviceMesh,
    *,
    num_microbatches: int,
    mp_policy: MixedPrecisionPolicy | None = None,
    ignored_params: set[nn.Parameter] | None = None,
) -> nn.Module:
    """Apply ``kind`` (``DDP``/``FSDP``/``ZeRO2``/``HSDP``/``FSDP-offload``) to ``module`` over
    ``dp_mesh``
    (1-D; for HSDP the 2-D ``(replicate, shard)`` mesh), in place.

    A layer without parameters, or with ``dp == 1`` (but FSDP-offload, whose host copies FSDP2
    makes over the one rank), is left alone (nothing to synchronise).
    Layers whose strategy :attr:`~uniap.contract.Strategy.uses_classic_ddp` are synchronised by
    :func:`wrap_ddp` instead; this function is not called for them. ``mp_policy``: FSDP2's mixed
    precision (:func:`mp_policy_for`), default full precision. ``ignored_params`` (parameters of
    ``module`` synchronised elsewhere, e.g. tied weights) are left alone.
    """
    mp_policy = mp_policy or MixedPrecisionPolicy()
    ignored = set(ignored_params or ())
    if (dp_mesh.size() == 1 and kind != OFFLOAD) or all(p in ignored for p in module.parameters()):
        return module
    if kind in ("FSDP", "ZeRO2", "HSDP", OFFLOAD):  # HSDP: dp_mesh is 2-D (replicate, shard)
        offload = kind == OFFLOAD
        fully_shard(
            module,
            mesh=dp_mesh,
            reshard_after_forward=offload or (kind != "ZeRO2" and num_microbatches == 1),
            mp_policy=mp_policy,
            ignored_params=ignored or None,
            # pinned host memory makes the copies asynchronous; CUDA only
            offload_policy=(
                CPUOffloadPolicy(pin_memory=dp_mesh.device_type == "cuda")
                if offload
                else OffloadPolicy()
            ),
        )
        if kind == "ZeRO2":
            _ZERO2.add(module)
        if offload:
            _OFFLOADED.add(module)
    elif kind == "DDP":
        replicate(module, mesh=dp_mesh, mp_policy=mp_policy, ignored_params=ignored or None)
    else:
        raise ValueError(
            f"unknown data-parallel kind {kind!r}; use 'DDP', 'FSDP', 'ZeRO2', 'HSDP' or "
            f"'{OFFLOAD}'"
        )
    assert isinstance(module, FSDPModule)
    module.set_gradient_divide_factor(1.0)
    module.set_force_sum_reduction_for_comms(True)
    return module


def apply_fsdp_root(
    module: nn.Module,
    mesh: DeviceMesh,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    ignored_params: set[nn.Parameter] | None = None,
) -> bool:
    """Make ``module`` (a stage) the FSDP2 root of the FSDP2 / ``replicate`` states below it,
    managing no parameter of its own; False (nothing done) when there is none. Call it after
    every layer's :func:`apply_dp` and before :func:`wrap_ddp`. ``mesh``: one of the layers'
    DP meshes (the root holds no shards and issues no collective on it). ``ignored_params``:
    parameters synchronised elsewhere (the free parameters), which an FSDP layer holding them
    also ignores: they stay plain tensors."""
    managed: set[int] = set()
    for sub in module.modules():
        if sub is not module and isinstance(sub, FSDPModule):
            managed.update(id(p) for p in sub.parameters())
    if not managed:
        return False
    free = set(ignored_params or ())  # synchronised elsewhere (tied / free parameters)
    ignored = {p for p in module.parameters() if id(p) not in managed or p in free}
    policy = mp_policy or MixedPrecisionPolicy()
    # the stage's inputs are left as they are: autocast decides per op (see uniap.precision)
    policy = MixedPrecisionPolicy(
        param_dtype=policy.param_dtype,
        reduce_dtype=policy.reduce_dtype,
        output_dtype=policy.output_dtype,
        cast_forward_inputs=False,
    )
    fully_shard(
        module,
        mesh=mesh,
        reshard_after_forward=False,
        ignored_params=ignored,
        mp_policy=policy,
    )
    assert isinstance(module, FSDPModule)
    module.set_gradient_divide_factor(1.0)
    module.set_force_sum_reduction_for_comms(True)
    # Explicit backward prefetch: each layer prefetches the one before it. FSDP2's default
    # walks back through the root's record of every forward since the last backward, which
    # with several micro-batches (forward m+1 after backward m, or a pipeline schedule)
    # names a layer of the *previous* micro-batch: in the last backward the first layer
    # would re-gather the last one, already resharded. The first layer names itself (a
    # no-op: it is unsharded when its backward starts), since an empty list means default.
    layers = [m for m in module.modules() if m is not module and isinstance(m, FSDPModule)]
    for prev, layer in zip([layers[0], *layers[:-1]], layers):
        layer.set_modules_to_backward_prefetch([prev])
    logger.info("FSDP root over the stage (%d parameter(s) left to other wrappers)", len(ignored))
    return True


def fsdp_roots(module: nn.Module) -> list[nn.Module]:
    """The modules under ``module`` (itself included) whose FSDP2 state is a root, after the
    first forward (FSDP2 decides roots lazily)."""
    from torch.distributed.fsdp._fully_shard._fsdp_state import _get_module_fsdp_state

    roots = []
    for sub in module.modules():
        state = _get_module_fsdp_state(sub)
        if state is not None and state._is_root:
            roots.append(sub)
    return roots


def _sum_allreduce_hook(group, bucket):  # noqa: ANN001 - DDP rejects string annotations here
    """DDP communication hook: all-reduce the bucket with ``SUM`` (no division by the group
    size: the losses are already scaled to the global-batch mean)."""
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap_ddp(
    module: nn.Module,
    layer_fqns: Sequence[str] | None,
    group: dist.ProcessGroup,
    *,
    exclude: Collection[str] = (),
) -> DistributedDataParallel | None:
    """Classic DDP over the parameters of the layers ``layer_fqns`` of ``module`` (all of its
    parameters when None; every other parameter and buffer is ignored by it), with ``SUM``
    all-reduce over ``group``; None when those layers have no trainable parameters or the
    group has one rank. ``module`` itself is not changed (the wrapper holds it as ``.module``).
    Parameters named in ``exclude`` (synchronised elsewhere, e.g. tied weights) are ignored."""
    if dist.get_world_size(group) == 1:
        return None
    prefixes = tuple(f"{f}." for f in layer_fqns) if layer_fqns is not None else ("",)
    excluded = {id(p) for n, p in module.named_parameters() if n in exclude}
    synced = [
        n
        for n, p in module.named_parameters()
        if p.requires_grad and n.startswith(prefixes) and id(p) not in excluded
    ]
    if not synced:
        return None
    named = dict(module.named_parameters())
    keep = {id(named[n]) for n in synced}
    # every name of an ignored tensor (a tied parameter has several), and DDP's spelling of a
    # root-level one (it joins module and parameter names: ".pos" for the root's "pos")
    ignored = [n for n, p in module.named_parameters(remove_duplicate=False) if id(p) not in keep]
    ignored += [n for n, _ in module.named_buffers(remove_duplicate=False)]
    ignored += [f".{n}" for n in ignored if "." not in n]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)
    ddp = DistributedDataParallel(
        module,
        process_group=group,
        forward_sync_buffers=False,  # buffers are ignored by the wrapper anyway
        init_sync=False,  # every rank holds the same model (same seed)
        bucket_cap_mb=DDP_BUCKET_BYTES / 2**20,
        gradient_as_bucket_view=True,
    )
    ddp.register_comm_hook(group, _sum_allreduce_hook)
    logger.info(
        "classic DDP over %d parameter(s) of %d layer(s), group of %d",
        len(synced),
        len(layer_fqns) if layer_fqns is not None else 1,
        dist.get_world_size(group),
    )
    return ddp


class GradSync:
    """Per-micro-batch switches of the stage's DP layers (FSDP2 / replicate states, and the
    classic DDP wrapper when the stage has one)."""

    def __init__(
        self, modules: list[nn.Module], ddp: DistributedDataParallel | None = None
    ) -> None:
        self.modules: list[FSDPModule] = [m for m in modules if isinstance(m, FSDPModule)]
        self.ddp = ddp

    def microbatch(self, *, last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward *and* backward outside a pipeline schedule:
        DDP's ``no_sync`` except on the last one (the schedule does this itself for a stage
        whose module is the DDP wrapper)."""
        if self.ddp is None or last:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def before_backward(self, *, last: bool) -> None:
        """Reduce gradients (and free unsharded parameters) only in the last backward; ZeRO2
        layers reduce in every backward and keep their parameters whole until the last;
        FSDP-offload layers reduce and reshard in every backward."""
        for m in self.modules:
            m.set_is_last_backward(last)
            offloaded = m in _OFFLOADED
            m.set_requires_gradient_sync(last or offloaded or m in _ZERO2, recurse=False)
            m.set_reshard_after_backward(last or offloaded, recurse=False)

    def finish(self) -> None:
        """Leave the layers in the plain state (sync on), e.g. for a lone ``forward``."""
        self.before_backward(last=True)

    @torch.no_grad()
    def reshard(self) -> None:
        """Free unsharded FSDP parameters kept after a forward without backward."""
        for m in self.modules:
            m.reshard()


class GradSyncs(GradSync):
    """The :class:`GradSync` of each of a rank's stages (interleaved schedules), switched
    together outside a pipeline schedule; inside one, each stage switches its own."""

    def __init__(self, syncs: list[GradSync]) -> None:
        self.syncs = syncs
        self.modules = [m for s in syncs for m in s.modules]
        self.ddp = None

    def microbatch(self, *, last: bool) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        for s in self.syncs:
            stack.enter_context(s.microbatch(last=last))
        return stack
