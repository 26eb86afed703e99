"""Hand-set plans: the recipe a user copies, and the best plan a user could find by hand.

- ``torchtitan``: torchtitan's default Llama 3 recipes (``torchtitan/models/llama3/train_configs``):
  models under ``TITAN_TP_PARAMS`` parameters as ``llama3_8b.toml`` (FSDP over every device,
  TP 1, PP 1, selective activation checkpointing), larger ones as ``llama3_70b.toml`` (TP 8
  inside the node, FSDP over the rest, PP 1, full activation checkpointing). Selective
  (per-op) checkpointing is not in uniap's strategy space; the 8B recipe is scored with no
  and with full checkpointing of every layer, the better one that fits kept. The micro-batch
  count (gradient accumulation) is the one free knob, set to the best that fits.
- ``handtuned``: the best **uniform** plan of a grid search a user could run on the same cost
  model: every ``(pp, c)`` uniap visits, both usual stage splits (even by layer count, even by
  parameters), every TP degree inside the node, DDP or FSDP, with or without activation
  checkpointing, the same strategy for every layer (a layer that does not support that TP
  degree takes the largest it supports; checkpointing falls back to none where it is not
  offered, as it saves nothing there). Pure DDP, pure FSDP, FSDP + TP and Megatron-style
  TP + PP plans are all points of this grid.

The best plan that fits (by uniap's TPI) is kept; when none fits, the fastest is reported as OOM.
"""

from __future__ import annotations

import math
import time

from uniap.cost_model import CostModel, CostTables
from uniap.strategies import divisors

from .common import BaselineResult, candidate_tables, even_split, param_split, score

__all__ = ["handset", "HANDSET_METHODS", "TITAN_TP_PARAMS"]

HANDSET_METHODS = ("torchtitan", "handtuned")

TITAN_TP_PARAMS = 30e9
"""Models with at least this many parameters get torchtitan's 70B recipe (TP 8 + FSDP, full
checkpointing); smaller ones its 8B recipe (FSDP only)."""


def _uniform(t: CostTables, g: int, tp: int, kind: str, recompute: bool) -> list[int] | None:
    """Every layer ``(g / tp, tp, kind, recompute)``; a layer without that TP degree takes the
    largest it supports, one without checkpointing goes without."""
    index = {(s.dp, s.tp, s.kind, s.recompute): k for k, s in enumerate(t.strategies)}
    out = []
    for u in range(t.num_layers):
        k = None
        for tp_u in sorted((d for d in divisors(tp)), reverse=True):
            dp = g // tp_u
            kind_u = "DDP" if dp == 1 else kind  # FSDP over one rank is DDP
            for rc in (recompute, False) if recompute else (False,):
                k = index.get((dp, tp_u, kind_u, rc))
                if k is not None and k in t.allowed[u]:
                    break
                k = None
            if k is not None:
                break
        if k is None:
            return None
        out.append(k)
    return out


def _grid(cm: CostModel, method: str, t: CostTables) -> list[tuple[str, list[int], int, str, bool]]:
    """``(split name, stage_of, tp, kind, recompute)`` a method tries on these tables."""
    n, L = cm.cluster.world_size, cm.graph.num_layers
    g = n // t.pp
    if method == "torchtitan":
        if t.pp != 1:
            return []
        if sum(layer.num_params for layer in cm.graph.layers) >= TITAN_TP_PARAMS:
            return [("", [0] * L, min(8, cm.cluster.devices_per_node, g), "FSDP", True)]
        return [("", [0] * L, 1, "FSDP", rc) for rc in (False, True)]
    splits = {"even": even_split(L, t.pp)}
    split_p = param_split([max(layer.num_params, 1) for layer in cm.graph.layers], t.pp)
    if split_p != splits["even"]:
        splits["params"] = split_p
    tps = [d for d in divisors(g) if d <= cm.max_tp]
    return [
        (name, so, tp, kind, rc)
        for name, so in splits.items()
        for tp in tps
        for kind in ("DDP", "FSDP")
        for rc in (False, True)
    ]


def handset(cm: CostModel, global_batch_size: int, method: str) -> BaselineResult:
    """The best plan of one hand-set family (``torchtitan`` or ``handtuned``)."""
    if method not in HANDSET_METHODS:
        raise ValueError(f"unknown hand-set method {method!r}; choose from {HANDSET_METHODS}")
    t0 = time.perf_counter()
    n = cm.cluster.world_size
    best = BaselineResult(method)
    fallback = BaselineResult(method)  # fastest plan regardless of memory, reported as OOM
    tried = 0
    pps = [1] if method == "torchtitan" else None
    for t in candidate_tables(cm, global_batch_size, pp_degrees=pps):
        g = n // t.pp
        seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
        for split, stage_of, tp, kind, rc in _grid(cm, method, t):
            strat = _uniform(t, g, tp, kind, rc)
            if strat is None or (tuple(stage_of), tuple(strat)) in seen:
                continue
            seen.add((tuple(stage_of), tuple(strat)))
            tried += 1
            tpi, fits = score(t, stage_of, strat)
            what = f"tp{tp} {kind}{' +ckpt' if rc else ''}" + (
                f", {split} split" if t.pp > 1 else ""
            )
            cand = BaselineResult(
                method, tpi, fits, 0.0, t.pp, t.num_microbatches, stage_of, strat, detail=what
            )
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
