"""Hand-set plans a user would write, each tuned over what a user would try by hand.

- ``ddp``: no pipeline, every layer data-parallel over all devices with replicated parameters
  (PyTorch DDP, gradient accumulation over ``c`` micro-batches).
- ``fsdp``: no pipeline, every layer fully sharded over all devices (ZeRO-3 / FSDP).
- ``megatron``: Megatron-LM / torchtitan 3D: tensor parallelism inside a node (TP = devices per
  node, or the largest degree the layer supports), pipeline stages across nodes (layers split
  evenly by count; ``pp`` a divisor of the node count), data parallelism for the rest (DDP, or
  FSDP as torchtitan does), 1F1B.

Each is tried with every micro-batch count, with and without activation checkpointing of every
layer (where it saves memory); Megatron also over its ``pp`` and DDP/FSDP. The best plan that
fits (by uniap's TPI) is kept; when none fits, the fastest is reported as OOM.
"""

from __future__ import annotations

import math
import time

from uniap.cost_model import CostModel, CostTables
from uniap.strategies import divisors

from .common import BaselineResult, candidate_tables, even_split, score

__all__ = ["handset", "HANDSET_METHODS"]

HANDSET_METHODS = ("ddp", "fsdp", "megatron")


def _index(t: CostTables) -> dict[tuple[int, int, str, bool], int]:
    return {(s.dp, s.tp, s.kind, s.recompute): k for k, s in enumerate(t.strategies)}


def _pick(t: CostTables, u: int, dp: int, tp: int, kind: str, recompute: bool) -> int | None:
    """Strategy index for layer ``u``; recompute falls back to none where it is not offered."""
    idx = _index(t)
    if dp == 1:
        kind = "DDP"  # FSDP over one rank is DDP
    for rc in ((True, False) if recompute else (False,)):
        k = idx.get((dp, tp, kind, rc))
        if k is not None and k in t.allowed[u]:
            return k
    return None


def _uniform(t: CostTables, g: int, kind: str, recompute: bool) -> list[int] | None:
    """Every layer data-parallel over the whole stage (``dp = g``, ``tp = 1``)."""
    out = []
    for u in range(t.num_layers):
        k = _pick(t, u, g, 1, kind, recompute)
        if k is None:
            return None
        out.append(k)
    return out


def _megatron(t: CostTables, g: int, tp_max: int, kind: str, recompute: bool) -> list[int] | None:
    """TP = the largest degree <= devices per node the layer supports, DP for the rest."""
    out = []
    for u in range(t.num_layers):
        k = None
        for tp in sorted((d for d in divisors(min(tp_max, g))), reverse=True):
            k = _pick(t, u, g // tp, tp, kind, recompute)
            if k is not None:
                break
        if k is None:
            return None
        out.append(k)
    return out


def handset(cm: CostModel, global_batch_size: int, method: str) -> BaselineResult:
    """The best hand-set plan of one family (``ddp``, ``fsdp`` or ``megatron``)."""
    if method not in HANDSET_METHODS:
        raise ValueError(f"unknown hand-set method {method!r}; choose from {HANDSET_METHODS}")
    t0 = time.perf_counter()
    cluster = cm.cluster
    n, num_layers = cluster.world_size, cm.graph.num_layers
    if method == "megatron":
        pps = [p for p in divisors(cluster.num_nodes) if p <= num_layers]
        kinds = ("DDP", "FSDP")
    else:
        pps = [1]
        kinds = ("DDP",) if method == "ddp" else ("FSDP",)
    best = BaselineResult(method)
    fallback = BaselineResult(method)  # fastest plan regardless of memory, reported as OOM
    tried = 0
    for t in candidate_tables(cm, global_batch_size, pp_degrees=pps):
        g = n // t.pp
        stage_of = even_split(num_layers, t.pp)
        for kind in kinds:
            for rc in (False, True):
                if method == "megatron":
                    strat = _megatron(t, g, cluster.devices_per_node, kind, rc)
                else:
                    strat = _uniform(t, g, kind, rc)
                if strat is None:
                    continue
                tried += 1
                tpi, fits = score(t, stage_of, strat)
                cand = BaselineResult(method, tpi, fits, 0.0, t.pp, t.num_microbatches, stage_of,
                                      strat, detail=f"{kind}{' +ckpt' if rc else ''}")
                if fits and tpi < best.time_per_iteration_s:
                    best = cand
                if tpi < fallback.time_per_iteration_s:
                    fallback = cand
    out = best if best.found else fallback
    if not out.found:
        out = BaselineResult(method, math.inf, False, detail="no plan in this family")
    out.wall_s = time.perf_counter() - t0
    out.detail += f"; {tried} plans scored"
    return out
