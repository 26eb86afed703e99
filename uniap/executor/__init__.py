"""The executor: a model and a :class:`~uniap.contract.Plan` -> this rank's :class:`ParallelModel`.

Principles:

- The Plan and the model are the only inputs. Every rule shared with the cost model is a
  property of a contract value (e.g. :attr:`~uniap.contract.Strategy.uses_classic_ddp`) or a
  schedule spec (:mod:`uniap.schedules`), never a second copy here.
- Planned == executed: the rank layout (:mod:`.mesh`), what each rank holds in memory, what
  overlaps with what and the pipeline schedule are the ones the cost model charges, and tests
  pin each (parity with single-process training on losses and gradients).
- The real thing, in torchtitan's order per stage: meshes -> this rank's stage of the model
  (layers at their FQNs) -> TP per layer (DTensor ``parallelize_module``; with ``sp`` the
  layer's residual stream sharded along the sequence inside a replicated boundary,
  :mod:`.sequence_parallel`, which checkpoints an SP layer itself) -> activation
  checkpointing -> DDP/FSDP/ZeRO2/HSDP/FSDP-offload per layer (FSDP2 ``fully_shard``, for
  ZeRO2 with ``reshard_after_forward=False``, for FSDP-offload with ``CPUOffloadPolicy``;
  DDP with ``tp == 1`` is one classic
  ``DistributedDataParallel`` around the stage, with ``tp > 1`` FSDP2 ``replicate``)
  -> ``torch.distributed.pipelining`` stage and schedule. Consecutive layers with different
  ``(dp, tp)`` are joined by an autograd-correct reshard of the batch dimension.
- Device-agnostic: CPU/gloo and CUDA/NCCL run the same code; bad plans are refused before
  any collective, naming what differs.

**It runs the model's own forward.** At ``pp == 1`` the whole model is copied to the device,
the plan's per-layer strategies (TP, recompute, DDP/FSDP/ZeRO2) are applied to its submodules in
place, by FQN, and ``model.forward(*args, **kwargs)`` runs unchanged on each micro-batch, so
the function trained is the model's whatever its structure (skip connections, scaled
embeddings, masks, its own loss). Code outside the layers runs in the first layer's batch
layout; a layer planned in another layout has its forward wrapped to reshard its batch-first
inputs in and outputs back; parameters outside every layer and tied weights form one extra
data-parallel unit (:mod:`.model_forward`). At ``pp > 1`` the model's own forward is
split into stages by tracing it (:mod:`.traced_stages`: ``torch.distributed.pipelining``'s
``pipeline`` front end, ``torch.export`` underneath, split in front of each stage's first
layer); every value crossing a boundary is sent on, tied weights are one copy per stage with
gradients summed between the copies, and the stages run at ``tp == 1``. A *declared* chain
(``nn.Sequential``, ``uniap_layer_fqns()``), whose forward is by declaration its layers run in
order, is split by FQN instead (any TP). A model that cannot be traced, or whose layers do not
run in chain order, is refused at ``pp > 1`` before training (and the planner does not offer
it). Both run under a ``torch.distributed.pipelining`` schedule.

One parallelism per module: :mod:`.mesh` (rank arithmetic, meshes, groups), :mod:`.reshard`
(batch layouts), :mod:`.model_forward` (the model's own forward), :mod:`.traced_stages`
(pipeline split of the traced forward), :mod:`.stage_module` (pipeline split of a chain by
FQN), :mod:`.tensor_parallel` (with :mod:`.vocab_loss`, the loss on vocabulary-sharded
logits), :mod:`.sequence_parallel`, :mod:`.activation_checkpoint`,
:mod:`.data_parallel`, :mod:`.pipeline_parallel`, :mod:`.memory` (measured peak memory of a
step); :mod:`.parallel_model` applies them in order. The public entry point is
:func:`uniap.api.parallelize`.
"""

from __future__ import annotations

from uniap.executor.activation_checkpoint import apply_ac
from uniap.executor.memory import StepMemory
from uniap.executor.mesh import ProcessGroups, RankLayout, default_device, reshard_steps
from uniap.executor.parallel_model import ParallelModel, apply_plan
from uniap.executor.stage_module import StageModule, chain_fqns

__all__ = [
    "ParallelModel",
    "ProcessGroups",
    "RankLayout",
    "StageModule",
    "StepMemory",
    "apply_ac",
    "apply_plan",
    "chain_fqns",
    "default_device",
    "reshard_steps",
]
