"""The executor: a model and a :class:`~uniap.contract.Plan` -> this rank's :class:`ParallelModel`.

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
