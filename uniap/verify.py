"""An independent optimality check: a dynamic program over layers that shares no code with the
MILP (:mod:`uniap.milp`) or the heuristics (:mod:`uniap.search`), exact on the same cost tables.

It minimises the same objective (:mod:`uniap.cost_model`, with ``p_i`` the stage time per
micro-batch, ``o_i`` the edge leaving stage ``i`` and ``s_i`` its gradient synchronisation)

``TPI = sum_i p_i + sum_i o_i + (c - 1) * max(max_i p_i, max_i o_i) + max_i s_i + step``

subject to every stage's memory ``sum_u M[u, k_u, i] <= limit`` (the tolerance of
:func:`uniap.cost_model.evaluate_assignment`), for ``pp = 1``, for a fixed stage split, or
over every split (:func:`compositions`; small instances only), in three steps:

1. **Stage fronts.** Inside one stage the DP walks the layers keeping labels
   ``(p, s, m)`` (time per micro-batch with the same-stage resharding ``R``, synchronisation,
   memory) keyed by the layout of the stage's first layer and of the current last one (the
   resharding and the edges depend on nothing else) and by the largest ``F`` so far (the
   stage's once-exposed sync, added to ``s`` when the stage ends). A label is dropped only
   when another with the same key is no worse in all three (Pareto dominance), or when its
   memory plus the least memory the rest of the stage needs exceeds the limit: both keep
   every label an optimum may extend, so the memory constraint is exact, not discretised. At
   the stage's end memory is dropped and the ``(p, s)`` front per ``(first, last)`` layout
   remains. With
   ``pp = 1`` the objective is linear (``c * p + s``) and the labels are ``(c p + s, m)``.
2. **Sync threshold.** For a threshold ``S`` on ``max_i s_i``, each stage and layout pair
   keeps its least ``p`` with ``s <= S``; ``TPI = min_S [F(S) + S]`` over the finite set of
   ``s`` values on the fronts (at the optimum's own ``max s`` the constrained minimum is at
   most the optimum, and every ``F(S) + S`` is the TPI of a real assignment or more), stopping
   once ``S + F(inf)`` cannot beat the best so far.
3. **Chain.** For one ``S``, a DP over the stages in order with labels ``(sum, max)`` of the
   stage times and edges per layout of the last layer, Pareto-pruned; the best label gives
   ``sum + (c - 1) max``.

The result carries the assignment it found (back-pointers), and :func:`optimum` checks that
:func:`uniap.cost_model.evaluate_assignment` gives it the DP's value. Cost: the fronts grow
roughly with the square of a stage's layer count (thousands of labels per key for 17 layers
of 16 strategies), so fixed splits of LLM-size tables take seconds to minutes; every split
(``stage_of=None`` with ``pp > 1``) multiplies that by the number of compositions.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from uniap.cost_model import CostTables, evaluate_assignment

__all__ = ["Optimum", "optimum", "compositions", "stage_front"]

log = logging.getLogger(__name__)

_MEM_TOL = 1e-9
"""Relative memory tolerance, the one :func:`uniap.cost_model.evaluate_assignment` applies."""


@dataclass
class Optimum:
    """The DP's answer for one table (``inf`` and empty lists when nothing fits)."""

    time_per_iteration_s: float
    stage_of: list[int] = field(default_factory=list)
    strategy_of: list[int] = field(default_factory=list)
    max_labels: int = 0
    """The largest label set one layer kept (a measure of the work)."""
    splits_searched: int = 0
    wall_s: float = 0.0


def compositions(num_layers: int, pp: int) -> Iterator[list[int]]:
    """Every ``stage_of`` with ``pp`` contiguous, non-empty stages in order."""
    for cuts in itertools.combinations(range(1, num_layers), pp - 1):
        bounds = [0, *cuts, num_layers]
        yield [i for i in range(pp) for _ in range(bounds[i], bounds[i + 1])]


# ---------------------------------------------------------------------- Pareto filters
def _pareto2(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points not dominated in ``(x, y)`` (minimise both), sorted by ``x``
    ascending (so ``y`` strictly descending); of equal points the first is kept."""
    if len(x) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((y, x))
    ys = y[order]
    prev_min = np.minimum.accumulate(np.concatenate(([np.inf], ys[:-1])))
    return order[ys < prev_min]


def _pareto3(v: np.ndarray, block: int = 1024) -> np.ndarray:
    """Indices of the rows of ``v`` (n, 3) not dominated in all three columns (minimise);
    of equal rows the first is kept.

    Rows are visited by the first column ascending; a row is dominated iff an earlier row is
    no worse in the other two. It is enough to test against the kept rows (whoever dominates
    a dropped row is dominated by, or is, a kept one): they are held as a staircase (second
    column ascending, running minimum of the third), queried a block at a time."""
    n = len(v)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((v[:, 2], v[:, 1], v[:, 0]))
    w = v[order]
    keep = np.zeros(n, dtype=bool)
    st_s = np.zeros(0)
    st_m = np.zeros(0)
    kept_s: list[np.ndarray] = []
    kept_m: list[np.ndarray] = []
    for lo in range(0, n, block):
        s, m = w[lo : lo + block, 1], w[lo : lo + block, 2]
        dom = np.zeros(len(s), dtype=bool)
        if len(st_s):
            j = np.searchsorted(st_s, s, side="right") - 1
            dom = (j >= 0) & (st_m[np.maximum(j, 0)] <= m)
        # earlier rows of the same block
        tri = np.tril(np.ones((len(s), len(s)), dtype=bool), -1)
        dom |= ((s[None, :] <= s[:, None]) & (m[None, :] <= m[:, None]) & tri).any(axis=1)
        keep[lo : lo + len(s)] = ~dom
        if (~dom).any():
            kept_s.append(s[~dom])
            kept_m.append(m[~dom])
            all_s, all_m = np.concatenate(kept_s), np.concatenate(kept_m)
            o = np.lexsort((all_m, all_s))
            st_s, st_m = all_s[o], np.minimum.accumulate(all_m[o])
            kept_s, kept_m = [st_s], [st_m]
    return order[keep]


# ---------------------------------------------------------------------- one stage
@dataclass
class _Layer:
    """The labels kept after one layer: values and back-pointers."""

    p: np.ndarray
    s: np.ndarray
    m: np.ndarray
    first: np.ndarray
    """Layout of the stage's first layer."""
    last: np.ndarray
    """Layout of this layer."""
    parent: np.ndarray
    """Row in the previous layer's labels (-1 for the stage's first layer)."""
    k: np.ndarray
    """This layer's strategy."""
    f: np.ndarray
    """The largest ``F`` so far (the stage's once-exposed sync, added to ``s`` at its end)."""


@dataclass
class StageFront:
    """The ``(p, s)`` front of one stage: per row its first and last layout and its label."""

    p: np.ndarray
    s: np.ndarray
    first: np.ndarray
    last: np.ndarray
    row: np.ndarray
    layers: list[_Layer]
    start: int
    backward: bool = False
    """The labels were built from the stage's last layer towards its first."""

    def strategies(self, r: int) -> list[int]:
        """The strategies of front row ``r``, first layer first."""
        out = []
        j = int(self.row[r])
        for lay in reversed(self.layers):
            out.append(int(lay.k[j]))
            j = int(lay.parent[j])
        return out if self.backward else out[::-1]


def _stage_layers(
    t: CostTables,
    start: int,
    end: int,
    stage: int,
    linear: bool,
    lookahead: bool = True,
    backward: bool = False,
    upper_bound_s: float = math.inf,
) -> Iterator[_Layer]:
    """The DP of step 1 over layers ``start..end`` on stage ``stage``, yielding the labels
    after each layer. ``linear``: one objective ``c (A + R) + G`` in ``p`` and ``s = 0``.
    ``lookahead``: the stage ends at ``end`` (labels that cannot fit the rest are cut); off
    when the labels after every layer are fronts of shorter stages. ``backward``: from
    ``end`` down to ``start`` (``first`` is then the layout of ``end``), so one sweep gives the
    fronts of every stage that ends at ``end``. ``upper_bound_s``: labels whose every
    completion has a TPI above it are cut (see :func:`_floor`)."""
    c = t.num_microbatches
    limit = t.memory_limit_bytes * (1 + _MEM_TOL)
    # least memory layers u..end still need (for the lookahead cut)
    least = np.zeros(end - start + 2)
    for j in range(end - start, -1, -1):
        u = start + j
        least[j] = least[j + 1] + (
            min(float(t.M[u, k, stage]) for k in t.allowed[u]) if lookahead else 0.0
        )
    order = list(range(end, start - 1, -1) if backward else range(start, end + 1))
    floor = _floor(t, order, stage, linear)
    prev: _Layer | None = None
    for j_u, u in enumerate(order):
        ks = np.asarray(t.allowed[u], dtype=np.int64)
        a_k = t.A[u, ks].astype(float)
        g_k = t.G[u, ks].astype(float)
        f_k = t.F[u, ks].astype(float)
        m_k = t.M[u, ks, stage].astype(float)
        lay_k = t.layout[u, ks].astype(np.int64)
        if linear:
            a_k, g_k = c * a_k + g_k, np.zeros_like(g_k)
        if prev is None:
            n = len(ks)
            p, s, m, f = a_k.copy(), g_k.copy(), m_k.copy(), f_k.copy()
            first, last, parent, kk = lay_k.copy(), lay_k.copy(), np.full(n, -1), ks.copy()
        else:
            n0 = len(prev.p)
            if backward:  # u is followed by the layer before it in this sweep
                rr = t.R[u][lay_k[None, :], prev.last[:, None]]  # (n0, K_u)
            else:
                rr = t.R[u - 1][prev.last[:, None], lay_k[None, :]]
            if linear:
                rr = c * rr
            p = (prev.p[:, None] + rr + a_k[None, :]).ravel()
            s = (prev.s[:, None] + g_k[None, :]).ravel()
            m = (prev.m[:, None] + m_k[None, :]).ravel()
            f = np.maximum(prev.f[:, None], f_k[None, :]).ravel()
            first = np.repeat(prev.first, len(ks))
            last = np.tile(lay_k, n0)
            parent = np.repeat(np.arange(n0), len(ks))
            kk = np.tile(ks, n0)
        ok = m + (0.0 if backward else least[u - start + 1]) <= limit
        if math.isfinite(upper_bound_s):
            cost = (p if linear else c * p + s) + f  # f can only grow
            ok &= cost + floor[j_u] <= upper_bound_s * (1 + _MEM_TOL)
        p, s, m, first, last, parent, kk, f = (x[ok] for x in (p, s, m, first, last, parent, kk, f))
        keep = []
        # labels compare only at the same largest F (its future maximum differs otherwise)
        _, key_of = np.unique(np.stack([first, last, f]), axis=1, return_inverse=True)
        key_of = key_of.reshape(-1)
        for key in range(int(key_of.max()) + 1 if len(key_of) else 0):
            idx = np.flatnonzero(key_of == key)
            sub = (
                _pareto2(p[idx], m[idx])
                if linear
                else _pareto3(np.stack([p[idx], s[idx], m[idx]], axis=1))
            )
            keep.append(idx[sub])
        sel = np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
        prev = _Layer(p[sel], s[sel], m[sel], first[sel], last[sel], parent[sel], kk[sel], f[sel])
        yield prev


def _floor(t: CostTables, order: list[int], stage: int, linear: bool) -> np.ndarray:
    """``floor[j]``: what any assignment adds to ``c p + s`` of a stage label after the
    sweep's layer ``order[j]`` (``p + 0`` for ``linear`` labels), a lower bound:

    ``TPI >= sum_i p_i + (c - 1) p_stage + s_stage + step >= c p_label + s_label + c * ovh
    + (pp - 1) ovh + sum of min_k A over the layers not yet swept + step``

    (every stage pays its overhead, every layer its fastest time in some stage; the linear
    case, one stage, pays ``min_k (c A + G)`` per layer left)."""
    c, L, pp = t.num_microbatches, t.num_layers, t.pp
    per = np.array(
        [
            min(
                (c * float(t.A[u, k]) + float(t.G[u, k])) if linear else float(t.A[u, k])
                for k in t.allowed[u]
            )
            for u in range(L)
        ]
    )
    total = float(per.sum())
    swept = np.cumsum([per[u] for u in order])
    ovh = 0.0 if linear else (c + pp - 1) * t.stage_overhead_s
    return total - swept + ovh + t.step_overhead_s


def _front(
    t: CostTables, layers: list[_Layer], start: int, linear: bool, backward: bool = False
) -> StageFront:
    """Step 1's end: memory dropped, the ``(p, s)`` front per ``(first, last)`` layout."""
    lay = layers[-1]
    if backward:  # in stage order: the sweep's current layer is the stage's first
        lay = dataclasses.replace(lay, first=lay.last, last=lay.first)
    # the stage's largest F is exposed once: in s (in p for linear labels, c p + s)
    p = lay.p + (lay.f if linear else t.stage_overhead_s)
    s = lay.s + (0.0 if linear else lay.f)
    rows = []
    for key in np.unique(lay.first * 1_000_003 + lay.last):
        idx = np.flatnonzero(lay.first * 1_000_003 + lay.last == key)
        rows.append(idx[_pareto2(p[idx], s[idx])] if not linear else idx[[int(np.argmin(p[idx]))]])
    row = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return StageFront(p[row], s[row], lay.first[row], lay.last[row], row, layers, start, backward)


def stage_front(t: CostTables, start: int, end: int, stage: int) -> StageFront:
    """The ``(p, s)`` front of layers ``start..end`` as stage ``stage`` (empty if nothing fits)."""
    layers = list(_stage_layers(t, start, end, stage, linear=False))
    return _front(t, layers, start, linear=False)


# ---------------------------------------------------------------------- steps 2 and 3
def _combine(
    t: CostTables, fronts: list[StageFront], cut_edges: list[int], best: float
) -> tuple[float, list[int]] | None:
    """Steps 2 and 3 for one split: the least ``TPI`` below ``best`` and the front row per
    stage, or None. ``cut_edges[i]``: the last layer of stage ``i`` (its edge ``Rp``)."""
    c = t.num_microbatches
    if any(len(f.p) == 0 for f in fronts):
        return None
    # per stage: {(first, last): (s ascending, p running min, row of that min)}
    tabs = []
    for f in fronts:
        tab = {}
        for key in set(zip(f.first.tolist(), f.last.tolist())):
            idx = np.flatnonzero((f.first == key[0]) & (f.last == key[1]))
            o = idx[np.argsort(f.s[idx], kind="stable")]  # a front: p falls as s grows
            tab[key] = (f.s[o], f.p[o], o)
        tabs.append(tab)

    def chain(S: float) -> tuple[float, tuple[int, ...]] | None:
        # labels per last layout: list of (sum, max, rows)
        labels: dict[int, list[tuple[float, float, tuple[int, ...]]]] = {}
        for i, tab in enumerate(tabs):
            new: dict[int, list[tuple[float, float, tuple[int, ...]]]] = {}
            for (a, b), (ss, pm, arg) in tab.items():
                j = int(np.searchsorted(ss, S, side="right")) - 1
                if j < 0:
                    continue
                p, r = float(pm[j]), int(arg[j])
                if i == 0:
                    new.setdefault(b, []).append((p, p, (r,)))
                    continue
                rp = t.Rp[cut_edges[i - 1]]
                for b0, labs in labels.items():
                    o = float(rp[b0, a])
                    for tot, mx, rows in labs:
                        new.setdefault(b, []).append((tot + o + p, max(mx, o, p), rows + (r,)))
            labels = {}
            for b, labs in new.items():
                labs.sort()
                kept, low = [], math.inf
                for lab in labs:
                    if lab[1] < low:
                        kept.append(lab)
                        low = lab[1]
                labels[b] = kept
        out = None
        for labs in labels.values():
            for tot, mx, rows in labs:
                v = tot + (c - 1) * mx
                if out is None or v < out[0]:
                    out = (v, rows)
        return out

    free = chain(math.inf)
    if free is None:
        return None
    floor_s = max(float(min(f.s)) for f in fronts)
    values = np.unique(np.concatenate([f.s for f in fronts]))
    values = values[values >= floor_s]
    found = None
    for S in values:
        if S + free[0] + t.step_overhead_s >= best:
            break
        got = chain(float(S))
        if got is None:
            continue
        v = got[0] + float(S) + t.step_overhead_s
        if v < best:
            best, found = v, (v, list(got[1]))
    return found


# ---------------------------------------------------------------------- entry point
def optimum(
    t: CostTables,
    stage_of: Sequence[int] | None = None,
    *,
    upper_bound_s: float = math.inf,
    max_splits: int = 100_000,
) -> Optimum:
    """The least TPI over every strategy assignment for these tables: with ``stage_of`` on
    that split, without it (``pp > 1``) over every split (at most ``max_splits`` of them).

    ``upper_bound_s`` (optional): only a value below it is looked for; ``inf`` comes back
    when nothing beats it. The assignment returned is re-scored by
    :func:`uniap.cost_model.evaluate_assignment` and must agree with the DP. One stage per
    rank only (interleaved schedules share a rank's memory between stages: not this DP's
    per-stage labels; :func:`uniap.search.exhaustive` checks those).

    The labels do not track host memory (FSDP-offload's state): tables where the host limit
    could bind (the layers' largest host bytes, on every rank of the fullest node, above it)
    are refused with a ValueError;
    check those with :func:`uniap.search.exhaustive`."""
    if t.virtual_stages > 1:
        raise ValueError(
            f"the verification DP handles one stage per rank, these tables have "
            f"{t.virtual_stages} ({t.schedule}); use uniap.search.exhaustive on small instances"
        )
    t0 = time.perf_counter()
    L, pp = t.num_layers, t.pp
    worst_host = sum(max(float(t.Mh[u, k]) for k in t.allowed[u]) for u in range(L))
    if worst_host * float(t.host_ranks.sum(axis=1).max()) > t.host_limit_bytes * (1 + _MEM_TOL):
        raise ValueError(
            f"the host-memory limit ({t.host_limit_bytes:.4g} B per node) may bind on these "
            "tables and this dynamic program does not track host memory; use "
            "uniap.search.exhaustive, or a cluster with more host memory"
        )
    best = Optimum(math.inf)
    if pp == 1:
        layers = list(_stage_layers(t, 0, L - 1, 0, True, upper_bound_s=upper_bound_s))
        best.max_labels = max(len(x.p) for x in layers)
        f = _front(t, layers, 0, linear=True)
        if len(f.p):
            r = int(np.argmin(f.p))
            v = float(f.p[r]) + t.step_overhead_s
            if v < upper_bound_s:
                best = Optimum(v, [0] * L, f.strategies(r), best.max_labels, 1)
    else:
        if stage_of is not None:
            splits: Iterator[list[int]] = iter([list(stage_of)])
        else:
            total = math.comb(L - 1, pp - 1)
            if total > max_splits:
                raise ValueError(
                    f"{total} stage splits of {L} layers into {pp} stages exceed max_splits "
                    f"({max_splits}); pass stage_of to check one split"
                )
            splits = compositions(L, pp)
        cache: dict[tuple[int, int, int], StageFront] = {}
        max_labels = n_splits = 0
        incumbent = upper_bound_s
        for so in splits:
            n_splits += 1
            bounds = _bounds(so, pp, L)
            fronts = []
            for i, (s, e) in enumerate(bounds):
                if (i, s, e) in cache:
                    pass
                elif stage_of is not None:
                    layers = list(_stage_layers(t, s, e, i, False, upper_bound_s=incumbent))
                    max_labels = max(max_labels, *(len(x.p) for x in layers))
                    cache[i, s, e] = _front(t, layers, s, linear=False)
                elif i == pp - 1:
                    # the last stage ends at L - 1: one backward sweep gives every start
                    acc: list[_Layer] = []
                    for j, lay in enumerate(
                        _stage_layers(t, i, e, i, False, False, True, incumbent)
                    ):
                        acc.append(lay)
                        max_labels = max(max_labels, len(lay.p))
                        cache[i, e - j, e] = _front(t, list(acc), e - j, False, backward=True)
                else:
                    # one sweep from s records the front at every end this stage may have
                    acc = []
                    for j, lay in enumerate(
                        _stage_layers(t, s, L - pp + i, i, False, False, upper_bound_s=incumbent)
                    ):
                        acc.append(lay)
                        max_labels = max(max_labels, len(lay.p))
                        cache[i, s, s + j] = _front(t, list(acc), s, linear=False)
                fronts.append(cache[i, s, e])
            if any(len(f.p) == 0 for f in fronts):
                continue
            if _split_floor(t, fronts, [e for _, e in bounds]) >= incumbent:
                continue
            got = _combine(t, fronts, [e for _, e in bounds], incumbent)
            if got is None:
                continue
            incumbent = got[0]
            strategy_of: list[int] = []
            for f, r in zip(fronts, got[1]):
                strategy_of += f.strategies(r)
            best = Optimum(got[0], list(so), strategy_of)
        best.max_labels, best.splits_searched = max_labels, n_splits
    best.wall_s = time.perf_counter() - t0
    if best.stage_of:
        ev = evaluate_assignment(t, best.stage_of, best.strategy_of)
        assert ev.fits and math.isclose(
            ev.time_per_iteration_s, best.time_per_iteration_s, rel_tol=1e-9
        ), (ev.time_per_iteration_s, best.time_per_iteration_s)
    log.debug(
        "verify pp=%d c=%d: tpi %.6g, %d labels at most, %d splits, %.2f s",
        pp,
        t.num_microbatches,
        best.time_per_iteration_s,
        best.max_labels,
        best.splits_searched,
        best.wall_s,
    )
    return best


def _bounds(stage_of: Sequence[int], pp: int, num_layers: int) -> list[tuple[int, int]]:
    """``(first, last)`` layer of every stage of a split, checked."""
    if len(stage_of) != num_layers or any(not 0 <= x < pp for x in stage_of):
        raise ValueError(
            f"stage_of must give each of the {num_layers} layers a stage in 0..{pp - 1}, "
            f"got {len(stage_of)} entries"
        )
    out = []
    for i in range(pp):
        us = [u for u, x in enumerate(stage_of) if x == i]
        if not us or us[-1] - us[0] + 1 != len(us):
            raise ValueError(
                f"stage_of must give every stage 0..{pp - 1} a contiguous, non-empty run of layers"
            )
        out.append((us[0], us[-1]))
    return out


def _split_floor(t: CostTables, fronts: list[StageFront], ends: list[int]) -> float:
    """A lower bound on the split's TPI from each stage's least time and sync alone."""
    c = t.num_microbatches
    ps = [float(f.p.min()) for f in fronts]
    edges = [float(t.Rp[e].min()) for e in ends[:-1]]
    return (
        sum(ps)
        + sum(edges)
        + (c - 1) * max(ps + edges)
        + max(float(f.s.min()) for f in fronts)
        + t.step_overhead_s
    )
