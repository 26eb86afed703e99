"""The executor: a model and a :class:`~uniap.contract.Plan` -> this rank's :class:`ParallelModel`.

Principles:

- The Plan and the model are the only inputs. Every rule shared with the cost model is a
  property of a contract value (e.g. :attr:`~uniap.contract.Strategy.uses_classic_ddp`) or a
  schedule spec (:mod:`uniap.schedules`), never a second copy here.
- Planned == executed: the rank layout (:mod:`.mesh`), what each rank holds in memory, what
  overlaps with what and the pipeline schedule are the ones the cost model charges, and tests
  pin each (parity with single-process training on losses and gradients).
- The real thing, in torchtitan's order per stage: meshes -> this rank's stage of the model
  (layers at their FQNs) -> TP per layer (DTensor ``parallelize_module``) -> activation
  checkpointing -> DDP/FSDP per layer (FSDP2 ``fully_shard``; DDP with ``tp == 1`` is one
  classic ``DistributedDataParallel`` around the stage, with ``tp > 1`` FSDP2 ``replicate``)
  -> ``torch.distributed.pipelining`` stage and schedule. Consecutive layers with different
  ``(dp, tp)`` are joined by an autograd-correct reshard of the batch dimension.
- Device-agnostic: CPU/gloo and CUDA/NCCL run the same code; bad plans are refused before
  any collective, naming what differs.

One parallelism per module: :mod:`.mesh` (rank arithmetic, meshes, groups), :mod:`.reshard`
(batch layouts), :mod:`.stage_module` (pipeline split by FQN), :mod:`.tensor_parallel`,
:mod:`.activation_checkpoint`, :mod:`.data_parallel`, :mod:`.pipeline_parallel`,
:mod:`.memory` (measured peak memory of a step); :mod:`.parallel_model` applies them in order.
The public entry point is :func:`uniap.api.parallelize`.
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
