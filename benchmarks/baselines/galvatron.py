"""Galvatron-style search (Miao et al., "Galvatron: Efficient Transformer Training over Multiple
GPUs Using Automatic Parallelism", VLDB 2022), on uniap's cost tables.

Galvatron decides the pipeline first and the layers' strategies second:

1. for every pipeline degree ``pp`` and micro-batch count ``c``, split the layers into ``pp``
   stages by a fixed rule: Galvatron's ``pp_division_even`` (``galvatron/core/search_engine``:
   ``L // pp`` transformer layers on each of the first ``pp - 1`` stages, the remainder on the
   last; the layers before the first and after the last repeated block, embeddings and head,
   go to the first and the last stage), or by parameter count;
2. for every stage independently, a dynamic program over its layers chooses each layer's
   strategy under the stage's memory budget, memory counted in Galvatron's units of 1 MiB
   (:func:`memory_unit`; each layer's memory rounded up, so the plan always fits):

   ``C(u, m, k) = c_u(k) + min_{k'} C(u - 1, m - O_u(k), k') + c * R[u - 1, k', k]``

   with ``c_u(k) = c * A[u, k] + G[u, k]`` the layer's time per iteration on this stage and
   ``O_u(k) = M[u, k, i]`` its memory. The stage's objective is the sum of its layers' times,
   Galvatron's own: the DP does not see the pipeline's bottleneck or the boundary transfers.
3. every resulting plan is scored by uniap's evaluation and the best that fits is kept.
"""

from __future__ import annotations

import math
import time

import numpy as np

from uniap.cost_model import CostModel, CostTables
from uniap.graph import ModelGraph

from .common import BaselineResult, candidate_tables, param_split, score

__all__ = ["galvatron", "galvatron_split", "stage_dp", "MEMORY_UNIT_BYTES", "memory_unit"]


MEMORY_UNIT_BYTES = 2**20
"""Galvatron's memory unit (its DP counts memory in MB)."""

MAX_UNITS = 40960
"""On devices with less than this many MiB (the tiny test clusters) the unit shrinks to keep
this many units, 1 MiB's share of a 40 GiB A100, so that rounding costs what it costs there."""


def memory_unit(t: CostTables) -> float:
    """Bytes per memory unit of the stage DP on these tables."""
    return min(float(MEMORY_UNIT_BYTES), t.memory_limit_bytes / MAX_UNITS)


def galvatron_split(graph: ModelGraph, pp: int) -> list[int]:
    """``stage_of`` by Galvatron's ``pp_division_even``: the repeated blocks (from the first to
    the last layer whose type occurs more than once) divided ``n // pp`` per stage with the
    remainder on the last stage; layers before them on the first stage, after them on the
    last. Falls back to the same rule over every layer when there are fewer blocks than stages."""
    layers = graph.layers
    num_layers = len(layers)
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer.type_name] = counts.get(layer.type_name, 0) + 1
    rep = [u for u, layer in enumerate(layers) if counts[layer.type_name] > 1]
    lo, hi = (rep[0], rep[-1]) if rep else (0, num_layers - 1)
    if hi - lo + 1 < pp:
        lo, hi = 0, num_layers - 1
    n = hi - lo + 1
    sizes = [n // pp] * (pp - 1) + [n - (n // pp) * (pp - 1)]
    sizes[0] += lo
    sizes[-1] += num_layers - 1 - hi
    return [i for i, size in enumerate(sizes) for _ in range(size)]


def stage_dp(
    t: CostTables, layers: list[int], stage: int, unit_bytes: float | None = None
) -> list[int] | None:
    """Galvatron's per-stage DP: strategies for ``layers`` (consecutive) on stage ``stage``
    minimising the stage's summed time within the memory limit (in units of ``unit_bytes``,
    default :func:`memory_unit`, each layer rounded up), or None if nothing fits."""
    K, c = t.num_strategies, t.num_microbatches
    unit_bytes = unit_bytes or memory_unit(t)
    Q = int(math.floor(t.memory_limit_bytes / unit_bytes + 1e-9))
    lay = t.layout
    C = int(lay.max()) + 1

    def units(u: int, k: int) -> int:
        return int(math.ceil(float(t.M[u, k, stage]) / unit_bytes - 1e-9))

    # F[k, m]: least time of the layers so far, the last one with strategy k, memory <= m units.
    F = None
    back: list[np.ndarray] = []
    for j, u in enumerate(layers):
        cost = np.full(K, np.inf)
        w = np.zeros(K, dtype=np.int64)
        for k in t.allowed[u]:
            cost[k] = c * float(t.A[u, k]) + float(t.G[u, k])
            w[k] = units(u, k)
        cost[w > Q] = np.inf
        if j == 0:
            T = np.zeros((K, Q + 1))
            arg = np.zeros((K, Q + 1), dtype=np.int64)
        else:
            prev = layers[j - 1]
            # the resharding depends on layouts only: best previous strategy per layout first
            Fl = np.full((C, Q + 1), np.inf)
            Al = np.zeros((C, Q + 1), dtype=np.int64)
            for a in range(C):
                ks = np.flatnonzero(lay[prev] == a)
                if len(ks):
                    i = np.argmin(F[ks], axis=0)
                    Fl[a] = F[ks][i, np.arange(Q + 1)]
                    Al[a] = ks[i]
            R = t.R[prev][:, lay[u]] * c  # (C, K)
            tot = Fl[:, None, :] + R[:, :, None]  # (C, K, Q+1)
            la = np.argmin(tot, axis=0)  # (K, Q+1)
            T = np.take_along_axis(tot, la[None], axis=0)[0]
            arg = np.take_along_axis(Al, la, axis=0)
        Fn = np.full((K, Q + 1), np.inf)
        argn = np.zeros((K, Q + 1), dtype=np.int64)
        for k in range(K):
            if not np.isfinite(cost[k]):
                continue
            wk = int(w[k])
            Fn[k, wk:] = T[k, : Q + 1 - wk] + cost[k]
            argn[k, wk:] = arg[k, : Q + 1 - wk]
        F = Fn
        back.append(argn)
    k = int(np.argmin(F[:, Q]))
    if not np.isfinite(F[k, Q]):
        return None
    out = [0] * len(layers)
    m = Q
    for j in range(len(layers) - 1, -1, -1):
        u = layers[j]
        out[j] = k
        kp = int(back[j][k, m])
        m -= units(u, k)
        k = kp
    return out


def galvatron(
    cm: CostModel, global_batch_size: int, *, unit_bytes: float | None = None
) -> BaselineResult:
    """Galvatron's search on every ``(pp, c)`` and both stage splits; the best plan that fits."""
    t0 = time.perf_counter()
    graph = cm.graph
    num_layers = graph.num_layers
    weights = [max(layer.num_params, 1) for layer in graph.layers]
    best = BaselineResult("galvatron")
    visited = 0
    for t in candidate_tables(cm, global_batch_size):
        splits = {"galvatron": galvatron_split(graph, t.pp), "params": param_split(weights, t.pp)}
        seen: set[tuple[int, ...]] = set()
        for split_name, stage_of in splits.items():
            if tuple(stage_of) in seen:
                continue
            seen.add(tuple(stage_of))
            visited += 1
            strategy_of: list[int] = []
            for i in range(t.pp):
                layers = [u for u in range(num_layers) if stage_of[u] == i]
                got = stage_dp(t, layers, i, unit_bytes)
                if got is None:
                    strategy_of = []
                    break
                strategy_of += got
            if not strategy_of:
                continue
            tpi, fits = score(t, stage_of, strategy_of)
            if fits and tpi < best.time_per_iteration_s:
                best = BaselineResult(
                    "galvatron",
                    tpi,
                    fits,
                    0.0,
                    t.pp,
                    t.num_microbatches,
                    stage_of,
                    strategy_of,
                    detail=f"split by {split_name}",
                )
    best.wall_s = time.perf_counter() - t0
    best.detail = (best.detail + "; " if best.detail else "") + f"{visited} (pp, c, split) searched"
    return best
