"""Galvatron-style search (Miao et al., "Galvatron: Efficient Transformer Training over Multiple
GPUs Using Automatic Parallelism", VLDB 2022), on uniap's cost tables.

Galvatron decides the pipeline first and the layers' strategies second:

1. for every pipeline degree ``pp`` and micro-batch count ``c``, split the layers into ``pp``
   stages by a fixed rule: evenly by layer count (Galvatron's default), or by parameter count;
2. for every stage independently, a dynamic program over its layers chooses each layer's
   strategy under the stage's memory budget, memory discretised into ``memory_buckets`` units
   (rounded up, so the plan always fits):

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

from .common import BaselineResult, candidate_tables, even_split, param_split, score

__all__ = ["galvatron", "stage_dp"]


def stage_dp(t: CostTables, layers: list[int], stage: int, memory_buckets: int = 1024) -> list[int] | None:
    """Galvatron's per-stage DP: strategies for ``layers`` (consecutive) on stage ``stage``
    minimising the stage's summed time within the memory limit, or None if nothing fits."""
    K, c = t.num_strategies, t.num_microbatches
    Q = memory_buckets
    unit = t.memory_limit_bytes / Q
    lay = t.layout
    # F[k, m]: least time of the layers so far, the last one with strategy k, memory <= m units.
    F = None
    back: list[np.ndarray] = []
    for j, u in enumerate(layers):
        cost = np.full(K, np.inf)
        w = np.zeros(K, dtype=np.int64)
        for k in t.allowed[u]:
            cost[k] = c * float(t.A[u, k]) + float(t.G[u, k])
            w[k] = int(math.ceil(float(t.M[u, k, stage]) / unit - 1e-9))
        cost[w > Q] = np.inf
        w = np.minimum(w, Q + 1)
        if j == 0:
            T = np.zeros((K, Q + 1))
            arg = np.zeros((K, Q + 1), dtype=np.int64)
        else:
            prev = layers[j - 1]
            R = t.R[prev][np.ix_(lay[prev], lay[u])] * c  # (K_prev, K_next)
            tot = F[:, None, :] + R[:, :, None]  # (K_prev, K, Q+1)
            arg = np.argmin(tot, axis=0)
            T = np.take_along_axis(tot, arg[None], axis=0)[0]
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
        m -= int(math.ceil(float(t.M[u, k, stage]) / unit - 1e-9))
        k = kp
    return out


def galvatron(cm: CostModel, global_batch_size: int, *, memory_buckets: int = 1024) -> BaselineResult:
    """Galvatron's search on every ``(pp, c)`` and both stage splits; the best plan that fits."""
    t0 = time.perf_counter()
    graph = cm.graph
    num_layers = graph.num_layers
    weights = [max(layer.num_params, 1) for layer in graph.layers]
    best = BaselineResult("galvatron")
    visited = 0
    for t in candidate_tables(cm, global_batch_size):
        splits = {"even": even_split(num_layers, t.pp), "params": param_split(weights, t.pp)}
        seen: set[tuple[int, ...]] = set()
        for split_name, stage_of in splits.items():
            if tuple(stage_of) in seen:
                continue
            seen.add(tuple(stage_of))
            visited += 1
            strategy_of: list[int] = []
            for i in range(t.pp):
                layers = [u for u in range(num_layers) if stage_of[u] == i]
                got = stage_dp(t, layers, i, memory_buckets)
                if got is None:
                    strategy_of = []
                    break
                strategy_of += got
            if not strategy_of:
                continue
            tpi, fits = score(t, stage_of, strategy_of)
            if fits and tpi < best.time_per_iteration_s:
                best = BaselineResult("galvatron", tpi, fits, 0.0, t.pp, t.num_microbatches,
                                      stage_of, strategy_of, detail=f"split by {split_name}")
    best.wall_s = time.perf_counter() - t0
    best.detail = (best.detail + "; " if best.detail else "") + f"{visited} (pp, c, split) searched"
    return best
