"""The optimum of a pipelined candidate without the program: runs of layers as label fronts,
stages as a dynamic program over run ends (1F1B and GPipe, one stage per rank).

With ``pp`` stages ``TPI = sum_i p_i + sum_i o_i + (c - 1) T* + S* + step`` where ``p_i`` is
stage i's time per micro-batch (its layers' ``A``, the reshards between them, the overhead
``k``), ``o_i`` its outgoing edge, ``T* = max(p_i, o_i)`` and ``S* = max_i s_i`` with ``s_i =
sum G + max F`` over its layers (:func:`uniap.cost_model.evaluate_assignment`). The program
(:mod:`uniap.milp`) relaxes the layers' stages and strategies to fractions; on deep pipelines
whose memory binds its bound closes slowly. Here the search is exact and combinatorial, in two
levels, below a bound (the best plan in hand):

Caps (every assignment below the bound keeps them)
    ``least``, the smallest ``sum_i p_i`` of any split whose runs fit their stage's memory
    (each run at its fastest labelling that fits: the exact knapsack of
    :func:`uniap.bounds.memory_bottleneck_bound`, reshards left out; a dynamic program over
    run ends), gives ``T* <= (bound - least - S_low - step) / (c - 1)`` and ``S* <= bound -
    least - (c - 1) T_low - step`` (``T_low``, ``S_low``: the bottleneck and sync bounds),
    and each complete run at most ``bound - least - (c - 1) T_low - S_low - step`` slower
    than its fastest labelling that fits. With ``T*`` capped, ``S_low`` rises to the least
    largest stage sync of a split whose runs each stay within the cap (:meth:`_Search.
    _sync_floor`), which lowers the cap again (three rounds at most); runs over the cap are
    dropped from ``least``'s split, and every stage's run must hold at least the layers
    that leave the later stages a split within the cap (``need``; a prefix short of it must
    still find the time and memory for the rest, :meth:`_Search._fewest_layers`). A label's
    excesses over the floors add up against the slack: ``c - 1`` times its stage's time over
    ``T_low``, its sync over ``S_low`` and, for a complete run, its time over its fastest.
Runs (:meth:`_Search._runs`)
    For stage i and a run of layers from ``s``, every strategy labelling of its layers so
    far is a label ``(p, m, g, f)`` (time, memory on stage i, sum of ``G``, largest ``F``)
    with the layouts of its first and last layer, extended layer by layer. A label x makes a
    label y with the same layouts redundant when ``m_x <= m_y`` and ``p_x + (g_x - g_y +
    (f_x - f_y)^+)^+ <= p_y``: whatever the rest of the run, x's time is no larger (so is the
    bottleneck) and its sync exceeds y's by at most that excess, which the time saved pays
    for. Labels over the memory limit or the caps are dropped. Runs of the same sequence of
    equal layers share their fronts (the blocks of a transformer). A complete run offers its
    labels' ``(p, s = g + f)`` (x over y when ``p_x + (s_x - s_y)^+ <= p_y``).
Stages (:meth:`_Search.run`)
    Labels ``(sum, T, S)`` per run end and last layout: the sum of ``p_i + o_i`` so far, the
    largest ``p_i`` or ``o_i`` and the largest ``s_i``. Label x makes label y redundant when
    ``sum_x + (c - 1) (T_x - T_y)^+ + (S_x - S_y)^+ <= sum_y``: whatever follows, x's time is
    at most y's (the rest raises T and S to at least its own, so x's excess over y in either
    is at most its excess here). A label whose sum, the later stages' ``least`` and its ``T``,
    ``S`` (at least their lower bounds) reach the bound is dropped.

Each rule is an order of sums, coordinate by coordinate, once the labels are sorted by time
(or sum): ``(x)^+ <= d`` holds when ``0 <= d`` and ``x <= d``, so for runs x drops y when
``m``, ``p + g`` and ``p + g + f`` are no larger, for a run's options when ``p + s`` is, and
for stages when ``sum + (c - 1) T``, ``sum + S`` and ``sum + (c - 1) T + S`` are. Orders of
sums are transitive, so fronts are filtered in one sweep in time order (:func:`_sweep`).
Every label dropped completes to no better than a label kept or than the bound, so the best
complete label is the optimum below the bound; when a front of one layout pair outgrows
``max_points`` (4,096) or the deadline passes the search gives up (None) and the program
answers. It settles the deep, many-micro-batch pipelines the program leaves at its time limit
(Llama-2-70B, 8 stages, 64 micro-batches: about 0.6 s on 64 H100s, 4 s on 1024 at batch
8192, whose fronts peak at 2,475 labels); with few micro-batches and long stages (the bottleneck
weighs little, sync and memory trade off over 30 layers of a 128-layer model, whose fronts
pass 27,000 labels) its fronts outgrow the limit and the program answers instead.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable

import numpy as np

from uniap.bounds import (
    KNAPSACK_POINTS,
    bottleneck_lower_bound,
    extend_front,
    knapsack_runs,
    min_max_split,
)
from uniap.cost_model import CostTables, evaluate_assignment
from uniap.search import undominated_strategies

__all__ = ["pipeline_optimum"]

_TOL = 1e-9


class _GiveUp(Exception):
    pass


def pipeline_optimum(
    t: CostTables,
    bound_s: float,
    *,
    bottleneck_s: float = 0.0,
    max_points: int = 4096,
    deadline: float | None = None,
    progress: Callable[[dict], None] | None = None,
    progress_interval_s: float = 5.0,
    memo: dict | None = None,
) -> tuple[float, list[int], list[int]] | None:
    """The optimum of a pipelined table (``pp > 1``, one stage per rank, not zero bubble) whose
    time is at most ``bound_s``: ``(time per iteration, stage_of, strategy_of)``, ``(inf, [],
    [])`` when no assignment that fits is that fast, or None when it gives up (a front above
    ``max_points`` labels, ``deadline`` (``time.perf_counter()``) passed, host memory that
    binds, or no finite bound) and the program must answer. ``bottleneck_s``: a known lower
    bound on ``T*`` (:func:`uniap.bounds.memory_bottleneck_bound`). ``progress`` is called at
    most every ``progress_interval_s`` with what :func:`uniap.milp.solve` reports
    (``running_s``, ``incumbent`` (the bound), ``bound`` (a lower bound: the fastest stages
    that fit, the bottleneck and sync bounds), ``gap``, ``nodes`` (run fronts built)).
    ``memo``: a dict kept by the caller between searches of the same tables; the run fronts
    built under a bound serve every later search under the same or a lower one (they hold
    every label its caps keep), so a search that gave up at its deadline resumes there."""
    if (
        t.virtual_stages != 1
        or t.zero_bubble
        or t.num_stages < 2
        or (t.uses_host_memory and math.isfinite(t.host_limit_bytes))
        or not math.isfinite(bound_s)
    ):
        return None
    try:
        search = _Search(t, bound_s, bottleneck_s, max_points, deadline)
        if memo is not None:
            if memo.get("bound_s", math.inf) >= bound_s:
                search.fronts = memo.setdefault("fronts", search.fronts)
            memo["bound_s"] = min(memo.get("bound_s", math.inf), bound_s)
        if progress is not None:
            search.watch(progress, progress_interval_s, float(bound_s))
        return search.run()
    except _GiveUp:
        return None


class _Search:
    def __init__(self, t, bound_s, bottleneck_s, max_points, deadline):
        self.t = t
        self.max_points = max_points
        self.deadline = deadline
        L, pp, c = t.num_layers, t.num_stages, t.num_microbatches
        self.L, self.pp, self.c = L, pp, c
        mask = t.allowed_mask()
        self.mask = mask
        amin, gmin, mmin = t.minima()
        self.k0, self.step = t.stage_overhead_s, t.step_overhead_s
        self.goal = float(bound_s) * (1 + _TOL)
        self.limit = t.memory_limit_bytes * (1 + 1e-9)
        self.S_low = max(float(gmin.max()), float(gmin.sum()) / pp)
        split = bottleneck_lower_bound(t)
        self.T_low = max(float(bottleneck_s), split + self.k0) if math.isfinite(split) else math.inf
        # every assignment: TPI >= (sum p) + (c - 1) T* + S* + step
        self.T_cap = (
            (self.goal - float(amin.sum()) - pp * self.k0 - self.S_low - self.step) / (c - 1)
            if c > 1
            else math.inf
        )
        # stages with equal memory tables share their fronts and run times (a group each)
        self.C = t.num_layouts
        self.fronts: list[dict] = []  # per group: class sequence -> (front, options)
        self.stage_group: list[int] = []
        self.useful: list[np.ndarray] = []
        self.cls: list[tuple[list[int], list[int]]] = []
        # fast[g][s, e]: the fastest run s..e on a stage of group g that fits its memory (an
        # exact knapsack, reshards left out; at most it past a coarsened front, a lower bound
        # all the same), inf when none fits or it must exceed the cap
        fast: list[np.ndarray] = []
        allowed = [np.flatnonzero(mask[u]) for u in range(L)]
        groups: dict[bytes, int] = {}
        for i in range(pp):
            Mi = np.ascontiguousarray(t.M[:, :, i])
            g = groups.setdefault(Mi.tobytes(), len(groups))
            self.stage_group.append(g)
            if g == len(self.fronts):
                self.fronts.append({})
                self.useful.append(self._useful(Mi))
                self.cls.append(self._classes(Mi, self.useful[g]))
                fast.append(
                    knapsack_runs(
                        t.A,
                        Mi,
                        allowed,
                        amin,
                        mmin[:, i],
                        self.limit,
                        self.T_cap - self.k0,
                        KNAPSACK_POINTS,
                    )
                )
        self.fast = [fast[g] for g in self.stage_group]
        least = self._rest()  # sum p of every assignment that fits is at least this
        if c > 1:
            self.T_cap = min(self.T_cap, (self.goal - least - self.S_low - self.step) / (c - 1))
            # a larger sync floor lowers the time cap, which raises the floor again
            for _ in range(3):
                floor = self._sync_floor(allowed)
                if not floor > self.S_low * (1 + 1e-9):
                    break
                self.S_low = floor
                self.T_cap = min(self.T_cap, (self.goal - least - self.S_low - self.step) / (c - 1))
            # no stage of an assignment below the bound is slower than the cap
            cap = self.T_cap * (1 + _TOL) - self.k0
            self.fast = [np.where(f <= cap, f, np.inf) for f in self.fast]
            least = max(least, self._rest())
        self._fewest_layers(gmin)
        self.slack = self.goal - least - (c - 1) * self.T_low - self.S_low - self.step
        self.S_cap = self.goal - least - (c - 1) * self.T_low - self.step
        self.floor = least + (c - 1) * self.T_low + self.S_low + self.step
        self.report: Callable[[], None] | None = None
        self.built = 0

    def watch(self, progress: Callable[[dict], None], interval_s: float, bound_s: float) -> None:
        start = last = time.perf_counter()

        def report() -> None:
            nonlocal last
            now = time.perf_counter()
            if now - last >= interval_s:
                last = now
                gap = (bound_s - self.floor) / bound_s if bound_s > 0 else 0.0
                progress(
                    {
                        "running_s": now - start,
                        "incumbent": bound_s,
                        "bound": self.floor,
                        "gap": max(gap, 0.0),
                        "nodes": self.built,
                    }
                )

        self.report = report

    def _rest(self) -> float:
        """``rest[i][s]``: the fastest stages i.. can run layers s.. (overheads included) with
        the runs of :attr:`fast`; returns ``rest[0][0]``."""
        L, pp = self.L, self.pp
        self.rest = [np.full(L + 1, np.inf) for _ in range(pp + 1)]
        self.rest[pp][L] = 0.0
        for i in range(pp - 1, -1, -1):
            nxt = self.rest[i + 1][1:]  # nxt[e]: stages i+1.. from layer e + 1
            self.rest[i][:L] = (self.fast[i] + nxt[None, :]).min(axis=1) + self.k0
        return float(self.rest[0][0])

    def _fewest_layers(self, gmin: np.ndarray) -> None:
        """``need[g]``: the fewest layers a run of a stage of group g holds in an assignment
        below the bound: stage i from layer s must reach a layer e whose run s..e has a time
        within the cap (:attr:`fast`) and after which the later stages can run the rest, from
        every start the earlier stages can reach. A run's prefix of ``n < need`` layers takes
        ``d = need - n`` more, consecutive: at least the least time of any ``d`` consecutive
        layers within the memory its labels leave (``tail[g][d]``, the knapsack envelope of
        :func:`_window_envelopes`) on top of its time, and the ``d`` smallest syncs of any
        layers on top of its sync (``least_g``), against the caps. With few micro-batches
        the caps alone keep short prefixes of slow, lean strategies that no run of the
        length a stage needs can complete (the 128-layer model, 8 stages of 16 layers: a
        search of 11 s without these, 1.6 s with them)."""
        L, pp = self.L, self.pp
        need = [L + 1] * len(self.fronts)
        reach = np.zeros(L, dtype=bool)  # where stage i may start
        reach[0] = True
        for i in range(pp):
            runs = np.isfinite(self.fast[i][reach])
            ok = runs & np.isfinite(self.rest[i + 1][1:])[None, :]
            has = ok.any(axis=1)
            if has.any():
                n = int((ok.argmax(axis=1) - np.flatnonzero(reach))[has].min()) + 1
                g = self.stage_group[i]
                need[g] = min(need[g], n)
            reach = np.concatenate([[False], runs.any(axis=0)[:-1]])
        self.need = [n if n <= L else 0 for n in need]

        self.least_g = np.concatenate([[0.0], np.cumsum(np.sort(gmin))])
        self.tail = [
            _window_envelopes(
                self.t.A,
                np.ascontiguousarray(self.t.M[:, :, self.stage_group.index(g)]),
                self.mask,
                max(self.need[g] - 1, 0),
                self.limit,
            )
            for g in range(len(self.fronts))
        ]

    def _sync_floor(self, allowed: list[np.ndarray]) -> float:
        """A lower bound on ``S*`` of every assignment whose stages all run within ``T_cap``:
        the smallest largest stage sync of a split whose runs each take their least ``sum G``
        with ``sum A <= T_cap - k`` (an exact knapsack; reshards and memory left out, which
        only lowers it), plus the largest of their layers' smallest ``F``; a min-max dynamic
        program over run ends. Where the strategies of least sync are slower (tensor
        parallel, recomputation), only a few layers of a stage can take them under the cap."""
        t, L = self.t, self.L
        amin, gmin, _ = t.minima()
        runs = knapsack_runs(
            t.G, t.A, allowed, gmin, amin, self.T_cap - self.k0, math.inf, KNAPSACK_POINTS
        )
        fmin = np.where(self.mask, t.F, np.inf).min(axis=1)
        run = np.array(runs)
        for s in range(L):
            run[s, s:] += np.maximum.accumulate(fmin[s:])
        return min_max_split([run] * self.pp)[0]

    # ------------------------------------------------------------------ runs of one stage
    def _useful(self, Mi: np.ndarray) -> np.ndarray:
        """Per layer, the strategies no other of its layout matches or beats in A, G, F and
        memory on this stage (the same reshards either side, so never needed)."""
        t = self.t
        return undominated_strategies(self.mask, t.layout, [t.A, t.G, t.F, Mi])

    def _classes(self, Mi: np.ndarray, useful: np.ndarray) -> tuple[list[int], list[int]]:
        """Class ids of each layer as a run's first layer and as a later one (with the reshard
        into it): equal ids, equal fronts."""
        t = self.t
        ids: dict[bytes, int] = {}
        first, later = [], []
        for u in range(self.L):
            own = (
                useful[u].tobytes()
                + t.A[u].tobytes()
                + t.G[u].tobytes()
                + t.F[u].tobytes()
                + Mi[u].tobytes()
                + t.layout[u].tobytes()
            )
            first.append(ids.setdefault(own, len(ids)))
            into = own + (t.R[u - 1].tobytes() if u else b"")
            later.append(ids.setdefault(b"R" + into, len(ids)))
        return first, later

    def _front(self, i: int, s: int, e: int, parent: dict | None) -> dict | None:
        """The labels of the run ``s..e`` on stage i (extending ``parent``, the run ``s..e-1``);
        None when none is within the caps."""
        t = self.t
        g = self.stage_group[i]
        ks = np.flatnonzero(self.useful[g][e])
        A, G, F, M = t.A[e, ks], t.G[e, ks], t.F[e, ks], t.M[e, ks, i]
        lay = t.layout[e, ks]
        # every label extended by every strategy, as [label, strategy] grids (one row for the
        # run's first layer)
        if parent is None:
            p, m, gs, f = A[None, :], M[None, :], G[None, :], F[None, :]
        else:
            p = parent["p"][:, None] + A[None, :] + t.R[e - 1][:, lay][parent["b"]]
            m = parent["m"][:, None] + M[None, :]
            gs = parent["g"][:, None] + G[None, :]
            f = np.maximum(parent["f"][:, None], F[None, :])
        d = max(self.need[g] - (e - s + 1), 0)  # layers the run must still take
        ok = (
            (m <= self.limit)
            & (p + self.k0 <= self.T_cap)
            & (gs + f + self.least_g[d] <= self.S_cap)
        )
        # the run's time, with the rest it must take, and its sync over their floors: their
        # excesses, (c - 1) times the one, add to every assignment's time
        t_run = p[ok] + self.k0
        if d:
            ms, ts = self.tail[g][d]
            at = np.searchsorted(ms, self.limit - m[ok], side="right") - 1
            t_run = t_run + np.where(at >= 0, ts[np.maximum(at, 0)], np.inf)
        over = np.maximum(gs[ok] + f[ok] + self.least_g[d] - self.S_low, 0.0)
        if self.c > 1:
            over = over + (self.c - 1) * np.maximum(t_run - self.T_low, 0.0)
        # (inf time: the rest fits no memory the labels leave)
        ok[ok] = np.isfinite(t_run) & (t_run <= self.T_cap) & (over <= self.slack)
        keep = np.flatnonzero(ok.ravel())
        if not len(keep):
            return None
        par, j = keep // len(ks), keep % len(ks)
        p, m, gs, f = (x.ravel()[keep] for x in (p, m, gs, f))
        b, kk = lay[j], ks[j]
        if parent is None:
            a, par = b, np.full(len(keep), -1)
        else:
            a = parent["a"][par]
        order = np.lexsort((f, gs, m, p, a * self.C + b))
        p, m, gs, f, a, b, par, kk = (x[order] for x in (p, m, gs, f, a, b, par, kk))
        # x's time, memory and sync are no worse than y's whatever the rest of the run (a
        # larger sync costs at most its excess, a smaller time saves at least its own
        # difference): m_x <= m_y and p_x + (g_x - g_y + (f_x - f_y)^+)^+ <= p_y, that is
        # p_x <= p_y (their order), m_x <= m_y, p_x + g_x <= p_y + g_y, p_x + g_x + f_x <= ...
        pg = p + gs
        on = _sweep(a * self.C + b, [m, pg, pg + f], self.max_points)
        p, m, gs, f, a, b, par, kk = (x[on] for x in (p, m, gs, f, a, b, par, kk))
        return {"p": p, "m": m, "g": gs, "f": f, "a": a, "b": b, "par": par, "k": kk}

    def _runs(self, i: int, s: int, last: int) -> list[tuple[int, dict]]:
        """``(e, options)`` of every run ``s..e`` (``e <= last``) of stage i with labels within
        the caps; ``options`` what the run offers the stages (:meth:`_options`)."""
        g = self.stage_group[i]
        cache = self.fronts[g]
        first, later = self.cls[g]
        seq: tuple = ()
        front = None
        out = []
        for e in range(s, last + 1):
            seq = (*seq, first[e] if e == s else later[e])
            if seq in cache:
                front, opts = cache[seq]
            else:
                if self.deadline is not None and time.perf_counter() > self.deadline:
                    raise _GiveUp
                if self.report is not None:
                    self.report()
                self.built += 1
                front = self._front(i, s, e, front if e > s else None)
                opts = self._options(front, self.fast[i][s, e]) if front is not None else None
                cache[seq] = (front, opts)
            if front is None:
                break  # longer runs break a cap too (times and memories only grow)
            out.append((e, opts))
        return out

    def _options(self, front: dict, fast: float) -> dict:
        """What the run offers the stages: its labels' ``(p, s = g + f)`` at most the slack
        above its fastest labelling that fits (``fast``; a complete run only: a prefix may
        have to give up time for the memory of the layers after it), less those another with
        the same layouts makes redundant (``p_x + (s_x - s_y)^+ <= p_y``)."""
        p, s, a, b = front["p"], front["g"] + front["f"], front["a"], front["b"]
        order = np.lexsort((s, p, b, a))
        # its excess over the run's fastest, its stage's over T_low and its sync's over S_low
        # add to every assignment's time
        over = (
            (p - fast)
            + (self.c - 1) * np.maximum(p + self.k0 - self.T_low, 0.0)
            + np.maximum(s - self.S_low, 0.0)
        )
        order = order[over[order] <= self.slack]
        p, s, a, b = p[order], s[order], a[order], b[order]
        # p_x + (s_x - s_y)^+ <= p_y: p_x <= p_y (their order) and p_x + s_x <= p_y + s_y
        on = _sweep(a * self.C + b, [p + s], self.max_points)
        return {"p": p[on], "s": s[on], "a": a[on], "b": b[on], "idx": order[on]}

    # ------------------------------------------------------------------ stages
    def run(self) -> tuple[float, list[int], list[int]]:
        L, pp, c, k0 = self.L, self.pp, self.c, self.k0
        if not (math.isfinite(self.T_low) and math.isfinite(self.slack)) or self.slack < 0:
            return math.inf, [], []
        # level[e] = labels of stages 0..i ending at layer e: arrays sum, T, S, b, back
        levels: list[dict[int, dict]] = []
        prev: dict[int, dict] = {-1: None}
        for i in range(pp):
            last = L - 1 - (pp - 1 - i)
            cur_parts: dict[int, list] = {}
            for e0, lab in prev.items():
                s = e0 + 1
                if s > last:
                    continue
                for e, opts in self._runs(i, s, last):  # the last stage: last = L - 1
                    if i == pp - 1 and e != L - 1:
                        continue
                    P = opts["p"] + k0
                    if lab is None:
                        tot = P.copy()
                        T = P.copy()
                        S = opts["s"].copy()
                        src = np.full(len(P), -1)
                        oi = np.arange(len(P))
                    else:
                        n, mo = len(lab["sum"]), len(P)
                        src = np.repeat(np.arange(n), mo)
                        oi = np.tile(np.arange(mo), n)
                        o = self.t.Rp[e0, lab["b"][src], opts["a"][oi]]
                        tot = lab["sum"][src] + o + P[oi]
                        T = np.maximum(np.maximum(lab["T"][src], P[oi]), o)
                        S = np.maximum(lab["S"][src], opts["s"][oi])
                    low = (
                        tot
                        + self.rest[i + 1][e + 1]
                        + (c - 1) * np.maximum(T, self.T_low)
                        + np.maximum(S, self.S_low)
                        + self.step
                    )
                    keep = (low <= self.goal) & (T <= self.T_cap * (1 + _TOL))
                    if not keep.any():
                        continue
                    b = opts["b"][oi]
                    cur_parts.setdefault(e, []).append(
                        (tot[keep], T[keep], S[keep], b[keep], src[keep], oi[keep], s)
                    )
            cur: dict[int, dict] = {}
            for e, parts in cur_parts.items():
                lab = self._prune(parts)
                if lab is not None:
                    cur[e] = lab
            levels.append(cur)
            if not cur:
                return math.inf, [], []
            prev = cur
        final = prev.get(L - 1)
        if final is None:
            return math.inf, [], []
        tpi = final["sum"] + (c - 1) * final["T"] + final["S"] + self.step
        j = int(np.argmin(tpi))
        if tpi[j] > self.goal:
            return math.inf, [], []
        stage_of, strategy_of = self._assignment(levels, j)
        ev = evaluate_assignment(self.t, stage_of, strategy_of)
        return float(ev.time_per_iteration_s), stage_of, strategy_of

    def _prune(self, parts: list) -> dict | None:
        """The labels of one run end that no other with the same last layout makes
        redundant (see the module docstring)."""
        tot, T, S, b, src, oi = (np.concatenate([p[j] for p in parts]) for j in range(6))
        s = np.concatenate([np.full(len(p[0]), p[6]) for p in parts])
        w = self.c - 1
        order = np.lexsort((S, T, tot, b))
        tot, T, S, b, src, oi, s = (x[order] for x in (tot, T, S, b, src, oi, s))
        # sum_x + w (T_x - T_y)^+ + (S_x - S_y)^+ <= sum_y: sum_x <= sum_y (their order) and
        # the same with each of the two excesses and with both
        wT = tot + w * T
        on = _sweep(b, [wT, tot + S, wT + S], self.max_points)
        if not len(on):
            return None
        return {
            "sum": tot[on],
            "T": T[on],
            "S": S[on],
            "b": b[on],
            "src": src[on],
            "opt": oi[on],
            "start": s[on],
        }

    def _assignment(self, levels: list[dict[int, dict]], j: int) -> tuple[list[int], list[int]]:
        stage_of = [0] * self.L
        strategy_of = [0] * self.L
        e = self.L - 1
        for i in range(self.pp - 1, -1, -1):
            lab = levels[i][e]
            s = int(lab["start"][j])
            g = self.stage_group[i]
            first, later = self.cls[g]
            seq = tuple(first[u] if u == s else later[u] for u in range(s, e + 1))
            front, opts = self.fronts[g][seq]
            idx = int(opts["idx"][int(lab["opt"][j])])
            for u in range(e, s - 1, -1):
                stage_of[u] = i
                strategy_of[u] = int(front["k"][idx])
                idx = int(front["par"][idx])
                seq = seq[:-1]
                if u > s:
                    front = self.fronts[g][seq][0]
            j = int(lab["src"][j])
            e = s - 1
        return stage_of, strategy_of


_NEAR = 64
"""Each label is first compared with the labels just before it in its group, this many: most
labels that a front drops are dropped by a near one (their parent's neighbour extended by the
same strategy), and the sweep then checks the rest against every label kept. On Llama-2-70B at
1024 H100s, batch 8192, fp32 (8 stages, 64 micro-batches) the first comparisons drop 82 % of
5.9 million labels and the sweeps of that table's search take 1.7 s instead of 5.8 s."""


def _sweep(
    group: np.ndarray, coords: list[np.ndarray], max_points: int, chunk: int = 256
) -> np.ndarray:
    """Indices of the labels that no other of their group dominates, the first of equal ones.
    Labels come sorted by ``group`` and within a group by their cost, so that a dominator
    comes first; an earlier label x dominates y when ``coords`` are no larger for x, each of
    them. Domination is transitive, so y may be checked against any earlier label, kept or
    not: first against the :data:`_NEAR` labels before it, then, chunk by chunk, against the
    labels kept and within the chunk (with one coordinate a running minimum answers).
    Raises :class:`_GiveUp` above ``max_points`` kept labels in a group."""
    if not len(group):
        return np.zeros(0, dtype=np.int64)
    X = np.stack(coords)
    if len(X) == 1:
        out = []
        bounds = np.flatnonzero(np.concatenate([[True], group[1:] != group[:-1], [True]]))
        for g0, g1 in zip(bounds[:-1], bounds[1:]):
            q = X[0, g0:g1]
            earlier = np.concatenate([[np.inf], np.minimum.accumulate(q)[:-1]])
            kept = g0 + np.flatnonzero(q < earlier)
            if len(kept) > max_points:
                raise _GiveUp
            out.append(kept)
        return np.concatenate(out)
    near = np.zeros(len(group), dtype=bool)
    for j in range(1, min(_NEAR, len(group) - 1) + 1):
        dom = group[j:] == group[:-j]
        for row in X:
            dom &= row[:-j] <= row[j:]
        near[j:] |= dom
    idx = np.flatnonzero(~near)
    group, X = group[idx], X[:, idx]
    out = []
    bounds = np.flatnonzero(np.concatenate([[True], group[1:] != group[:-1], [True]]))
    for g0, g1 in zip(bounds[:-1], bounds[1:]):
        kept = np.zeros(0, dtype=np.int64)
        for lo in range(g0, g1, chunk):
            ys = np.arange(lo, min(g1, lo + chunk))
            # the latest kept first (the closest in cost, they drop most), then the rest
            for xs in (kept[-chunk:], kept[:-chunk]):
                if len(xs) and len(ys):
                    ys = ys[~_no_larger(X, xs, ys).any(axis=0)]
            if len(ys) > 1:
                dom = _upper(chunk)[: len(ys), : len(ys)] & _no_larger(X, ys, ys)
                ys = ys[~dom.any(axis=0)]
            kept = np.concatenate([kept, ys])
            if len(kept) > max_points:
                raise _GiveUp
        out.append(kept)
    return idx[np.concatenate(out)]


def _no_larger(X: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """``[a, b]``: label ``xs[a]``'s coordinates (the rows of ``X``) are no larger than
    ``ys[b]``'s, each of them."""
    dom = X[0, xs][:, None] <= X[0, ys][None, :]
    for r in range(1, len(X)):
        dom &= X[r, xs][:, None] <= X[r, ys][None, :]
    return dom


@functools.lru_cache(maxsize=4)
def _upper(n: int) -> np.ndarray:
    """``[x, y]``: x comes before y (the strict upper triangle of an ``n x n`` grid)."""
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    upper.flags.writeable = False
    return upper


def _window_envelopes(
    A: np.ndarray, M: np.ndarray, mask: np.ndarray, depth: int, limit: float, max_points: int = 1024
) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """``[d]`` for d = 1..``depth``: the least time ``sum A`` that any ``d`` consecutive layers
    need within a memory ``sum M <= B``, for every B, as ``(memories ascending, times)``: the
    lower envelope of every window's exact knapsack front (reshards left out). Windows of
    equal layers share their fronts (a stack of blocks needs a few per length); a front that
    passes ``max_points`` counts as its fastest times with its leanest memories, and past
    ``4 L`` fronts in all (layers that differ) the longer windows count as their least times
    and memories apart (each lower still)."""
    L = A.shape[0]
    amin = np.where(mask, A, np.inf).min(axis=1)
    mmin = np.where(mask, M, np.inf).min(axis=1)
    ca, cm = np.concatenate([[0.0], np.cumsum(amin)]), np.concatenate([[0.0], np.cumsum(mmin)])
    rows: dict[bytes, int] = {}
    cls = []
    for u in range(L):
        ks = np.flatnonzero(mask[u])
        cls.append(rows.setdefault(A[u, ks].tobytes() + M[u, ks].tobytes(), len(rows)))
    fronts: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    seqs: list[tuple] = [()] * L
    cur = [(np.zeros(1), np.zeros(1))] * L
    out: list[tuple[np.ndarray, np.ndarray] | None] = [None]
    for d in range(1, depth + 1):
        n = L - d + 1  # windows of d layers
        if n <= 0:
            out.append((np.zeros(1), np.full(1, np.inf)))
            continue
        if len(fronts) > 4 * L:  # the least time and the least memory, each on its own
            out.append((np.array([(cm[d:] - cm[:-d]).min()]), np.array([(ca[d:] - ca[:-d]).min()])))
            continue
        for s in range(n):
            e = s + d - 1
            seqs[s] = (*seqs[s], cls[e])
            front = fronts.get(seqs[s])
            if front is None:
                ks = np.flatnonzero(mask[e])
                a, m, _ = extend_front(*cur[s], A[e, ks], M[e, ks], limit)
                if len(a) > max_points:
                    a, m = a[:1], m[-1:]  # the fastest time at the leanest memory
                front = fronts[seqs[s]] = (a, m)
            cur[s] = front
        distinct = list({id(f): f for f in cur[:n]}.values())
        a = np.concatenate([f[0] for f in distinct])
        m = np.concatenate([f[1] for f in distinct])
        if not len(a):  # no window of d layers fits
            out.append((np.zeros(1), np.full(1, np.inf)))
            continue
        order = np.lexsort((a, m))
        out.append((m[order], np.minimum.accumulate(a[order])))
    return out
