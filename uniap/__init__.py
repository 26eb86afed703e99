"""uniap: PyTorch-native automatic parallelism (UniAP, solved exactly).

import uniap
plan = uniap.plan("llama-7b", "a100-2x8", global_batch_size=64)      # no GPU needed
model = uniap.parallelize(model, cluster, global_batch_size=..., example_inputs=..., loss_fn=...)
"""

from __future__ import annotations

from uniap._version import __version__
from uniap.calibration import calibrate
from uniap.cluster import Cluster, list_presets, load_cluster
from uniap.contract import LayerStrategy, Plan, Stage, Strategy
from uniap.cost_model import CostModel
from uniap.errors import ConfigError, InfeasibleError, PlanMismatchError, UniapError
from uniap.graph import Layer, ModelGraph, build_graph, layer_chain
from uniap.planner import plan, plan_graph
from uniap.precision import Precision
from uniap.profiles import MeasuredProfile

__all__ = [
    "__version__",
    "Cluster",
    "ConfigError",
    "CostModel",
    "InfeasibleError",
    "Layer",
    "LayerStrategy",
    "MeasuredProfile",
    "ModelGraph",
    "Plan",
    "PlanMismatchError",
    "Precision",
    "Stage",
    "Strategy",
    "UniapError",
    "build_graph",
    "calibrate",
    "layer_chain",
    "list_presets",
    "load_cluster",
    "parallelize",
    "plan",
    "plan_graph",
]


def __getattr__(name: str):
    # The executor needs torch.distributed at run time; the planner side must import without it.
    if name in ("parallelize", "ParallelModel"):
        from uniap import api

        return getattr(api, name)
    raise AttributeError(f"module 'uniap' has no attribute {name!r}")
