"""UniAP's program over runs of identical layers: the blocks of a transformer counted, not placed.

:mod:`uniap.milp` places every layer with its own binaries ``x[u,i,k]``. A transformer's blocks
have identical rows in every table, so any permutation of their strategies within a stage is
another optimum: branch and bound proves little on deep stacks (a 128-layer model on 32 H100s
stopped at its time limit with a 0.15 % gap). This program states the same problem over
**runs**, maximal stretches of identical layers, and **portions**, the part of a run on one
stage, so no two of its solutions differ by a permutation.

Index legend: ``g`` run (``first_g..last_g``, ``N_g`` layers), ``i`` stage, ``k`` strategy,
``a``/``b`` layout classes. Two neighbouring layers are in one run when their rows of ``A``,
``G``, ``F``, ``M``, ``Mh``, ``layout`` and ``allowed`` are equal and so are the reshard
edges inside the run (``R[u]``, ``Rp[u]`` for ``first_g <= u < last_g``).

Variables per portion ``(g, i)`` (only for stages in the run's window)
    ``n[g,i,k]``  integer: the run's layers on stage i with strategy k.
    ``pr[g,i]``   binary: the portion is not empty.
    ``e[g,i,a]`` / ``x[g,i,a]`` >= 0: its first / last layer has layout a (integral whenever
        the integers are).
    ``u[g,i,a]``, ``rho[g,i,a]``, ``y[g,i,a,b]`` (runs with more than one layout class):
        whether the portion uses layout a, how many maximal stretches of layout a it has, and
        how many times it changes from a to b.

The portion's layers are a walk through layout classes: it enters at ``e``, leaves at ``x``,
visits class a ``rho_a`` times (each visit at least one layer, ``rho_a <= n_a``) and changes
layout ``y_ab`` times, each change paying ``R[first_g, a, b]``. The rows
    ``in_a``/``out_a``  ``e_a + sum_b y_ba = rho_a = x_a + sum_b y_ab`` (flow balance);
    ``reach_S_b``  for every set S of classes and b in S: ``sum_{a not in S, c in S} y_ac +
        sum_{c in S} e_c >= u_b`` (every class the portion uses is reachable from its entry);
are Euler's conditions for such a walk, so the layers can be laid out with exactly these
changes (:func:`_walk`) and the program's cost is the assignment's. Within a layout class the
strategies' order costs nothing (``R[a, a] = 0``).

Between portions the path of :mod:`uniap.milp` is unchanged, one level up: from ``(g, i)`` it
goes on to ``(g + 1, i)`` (``Y``, same stage, ``R[last_g]`` in ``p_i``), ``(g, i + 1)`` (``Z1``,
the run continues on the next stage, ``Rp[first_g]`` in ``o_i``) or ``(g + 1, i + 1)`` (``Z2``,
the run ends with the stage, ``Rp[last_g]`` in ``o_i``), from ``(0, 0)`` to ``(last run,
S - 1)``: stages are contiguous, ordered and not empty. Stage times, links, the bottleneck,
memory and host memory are those of :mod:`uniap.milp` with ``n`` for ``x``; so is the
objective ``sum_i p_i + sum_i o_i + (c - 1) t + t_sync``. The sync's largest ``F`` of a stage
is stated by levels: ``z[i,l]`` (binary) is 1 when it reaches the l-th smallest ``F`` that
may run on stage i, ``z[i,l] <= z[i,l-1]``, a strategy of level l needs ``z[i,l]``, and the
sync pays ``sum_l (F_l - F_(l-1)) z[i,l]``.

Reductions (exact)
    ``n[g,i,k] = 0`` when another strategy of the same layout is nowhere worse on stage i
    (``A``, ``G``, ``F``, ``M[., ., i]``, ``Mh``; ties keep the lower index): trading it changes
    no reshard and lowers or keeps every term.
    ``cap_g_i``: at most ``C[g,i]`` layers of the run on stage i, the smaller of how many fit
    in the slowest stage time the cutoff allows (``(bound - sum_u min_k A) / (c - 1)``, each
    layer at its least ``A``) and how many fit in memory (each at its least ``M`` there).
    It also tightens ``uses``, ``rho`` and ``y``, whose big-M it is.
    ``size_i``: integer layers on stages 0..i, between the bounds the layers' stage windows
    give (branching on where a stage ends, as in :mod:`uniap.milp`).

One stage per rank (``virtual_stages == 1``), schedules without a longest path only; the
others use :mod:`uniap.milp`'s layer program."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict

import numpy as np
import pulp

from uniap.bounds import bottleneck_lower_bound
from uniap.cost_model import FIT_SLACK, CostTables, evaluate_assignment

__all__ = [
    "MEMORY_ROW",
    "MIN_RUN",
    "MIP_FEASIBILITY_TOLERANCE",
    "RunsProgram",
    "applies",
    "layer_runs",
    "row_key",
]

MIP_FEASIBILITY_TOLERANCE = 1e-8
"""HiGHS's ``mip_feasibility_tolerance`` in both programs (this one and :mod:`uniap.milp`'s):
how far an integer solution may violate a row, and the slack of its bound propagation. At
1e-9 HiGHS returned, as optimal, plans up to 3e-5 above the optimum on programs whose
coefficients span 1e-8..25 (1 of 30 solves of five hard tables, Llama-2-70B on 64 H100s,
fp32, 8 stages, 64 micro-batches among them; at 1e-8, 0 of 30)."""

MEMORY_ROW = MIP_FEASIBILITY_TOLERANCE / FIT_SLACK
"""Memory rows state ``sum M / limit * MEMORY_ROW <= MEMORY_ROW``: HiGHS's absolute tolerance
is then :data:`uniap.cost_model.FIT_SLACK` of the limit, so every solution it accepts fits."""

MIN_RUN = 4
"""The program over runs is used when some run has at least this many layers."""

_MAX_CLASSES = 6
"""More layout classes than this in one run: the reachability rows (``2^C`` of them) are too
many, and the layer program is used."""


def row_key(t: CostTables, u: int) -> bytes:
    """Layer u's rows of every table (``allowed``, ``A``, ``G``, ``F``, ``M``, ``Mh``,
    ``layout``, and zero bubble's ``Af``, ``Aw``): equal keys, interchangeable layers."""
    parts = [np.asarray(t.allowed[u]), t.A[u], t.G[u], t.F[u], t.M[u], t.Mh[u], t.layout[u]]
    parts += [x[u] for x in (t.Af, t.Aw) if x is not None]
    return b"|".join(np.ascontiguousarray(x).tobytes() for x in parts)


def layer_runs(t: CostTables) -> list[tuple[int, int]]:
    """Maximal runs ``(first, last)`` of identical neighbouring layers, in chain order (see
    the module docstring); every layer is in exactly one."""
    out = [[0, 0]]
    key = row_key(t, 0)
    for u in range(1, t.num_layers):
        s, e = out[-1]
        k = row_key(t, u)
        same = k == key
        if same and e > s:
            same = bool(np.array_equal(t.R[e], t.R[s]) and np.array_equal(t.Rp[e], t.Rp[s]))
        if same:
            out[-1][1] = u
        else:
            out.append([u, u])
        key = k
    return [(s, e) for s, e in out]


def applies(t: CostTables) -> bool:
    """Whether :class:`RunsProgram` states these tables (one stage per rank, no longest path,
    a run of at least :data:`MIN_RUN` layers, few layout classes)."""
    if t.virtual_stages != 1 or t.longest_path:
        return False
    runs = layer_runs(t)
    if max(e - s + 1 for s, e in runs) < MIN_RUN:
        return False
    return all(len({int(t.layout[s, k]) for k in t.allowed[s]}) <= _MAX_CLASSES for s, _ in runs)


def _dominated(t: CostTables, u: int, i: int, k: int) -> int | None:
    """A strategy of layer u with k's layout that is nowhere worse than k on stage i (ties:
    the lower index), or None."""
    mine = np.array([t.A[u, k], t.G[u, k], t.F[u, k], t.M[u, k, i], t.Mh[u, k]])
    for k2 in t.allowed[u]:
        if k2 == k or t.layout[u, k2] != t.layout[u, k]:
            continue
        other = np.array([t.A[u, k2], t.G[u, k2], t.F[u, k2], t.M[u, k2, i], t.Mh[u, k2]])
        if np.all(other <= mine) and (np.any(other < mine) or k2 < k):
            return k2
    return None


def _lean(t: CostTables, u: int, i: int, k: int) -> int:
    """k, or the strategy that dominates it on stage i and is not dominated itself."""
    seen = {k}
    while (k2 := _dominated(t, u, i, k)) is not None and k2 not in seen:
        seen.add(k2)
        k = k2
    return k


class RunsProgram:
    """The program for tables ``t`` over the layers' stage ``window`` (from
    :func:`uniap.bounds.stage_windows`), cut off at ``bound`` when given, with times divided
    by ``scale``. ``prob`` is the PuLP problem; :meth:`start_values` and :meth:`assignment`
    translate between assignments and its variables."""

    def __init__(
        self,
        t: CostTables,
        window: list[list[int]],
        bound: float | None,
        bottleneck_s: float,
        scale: float,
    ) -> None:
        self.t, self.scale = t, scale
        self.runs = layer_runs(t)
        self.win = [sorted({i for u in range(s, e + 1) for i in window[u]}) for s, e in self.runs]
        self.classes = [sorted({int(t.layout[s, k]) for k in t.allowed[s]}) for s, _ in self.runs]
        self.prob = pulp.LpProblem("uniap_runs", pulp.LpMinimize)
        self.n: dict = {}
        self.cap: dict = {}
        self._portions(bound)
        self._path()
        self._sizes(window)
        self._objective(bound, bottleneck_s)

    # -- building ---------------------------------------------------------------------------

    def _var(self, name: str, **kw) -> pulp.LpVariable:
        return self.prob.add_variable(name, **kw)

    def _portions(self, bound: float | None) -> None:
        t, prob = self.t, self.prob
        c = t.num_microbatches
        amin_all, _, _ = t.minima()
        cap_s = float("inf")  # the slowest stage's most seconds under the cutoff
        if bound is not None and c > 1:
            cap_s = (bound * (1 + 1e-9) - float(amin_all.sum())) / (c - 1)
        self.pres, self.ent, self.ext = {}, {}, {}
        self.use, self.rho, self.y = {}, {}, {}
        for g, (s, e) in enumerate(self.runs):
            N, C, ks = e - s + 1, self.classes[g], t.allowed[s]
            amin = min(float(t.A[s, k]) for k in ks)
            for i in self.win[g]:
                cap = N
                mmin = min(float(t.M[s, k, i]) for k in ks)
                if np.isfinite(cap_s) and amin > 0:
                    cap = min(cap, int(np.floor(max(cap_s, 0.0) / amin * (1 + 1e-9) + 1e-9)))
                if mmin > 0:
                    lim = t.memory_limit_bytes * (1 + FIT_SLACK)
                    cap = min(cap, int(np.floor(lim / mmin * (1 + 1e-9) + 1e-9)))
                cap = max(cap, 0)
                self.cap[g, i] = cap
                pr = self.pres[g, i] = self._var(f"pr_{g}_{i}", cat=pulp.LpBinary)
                if cap == 0:
                    prob += pr == 0, f"empty_{g}_{i}"
                cat = pulp.LpInteger if N > 1 else pulp.LpBinary
                for k in ks:
                    ub = 0 if _dominated(t, s, i, k) is not None else cap
                    self.n[g, i, k] = self._var(f"n_{g}_{i}_{k}", lowBound=0, upBound=ub, cat=cat)
                total = pulp.lpSum(self.n[g, i, k] for k in ks)
                prob += total <= max(cap, 1) * pr, f"cap_{g}_{i}"
                prob += total >= pr, f"nonempty_{g}_{i}"
                for a in C:
                    self.ent[g, i, a] = self._var(f"e_{g}_{i}_{a}", lowBound=0)
                    self.ext[g, i, a] = self._var(f"x_{g}_{i}_{a}", lowBound=0)
                prob += pulp.lpSum(self.ent[g, i, a] for a in C) == pr, f"entry_{g}_{i}"
                prob += pulp.lpSum(self.ext[g, i, a] for a in C) == pr, f"exit_{g}_{i}"
                na = {a: pulp.lpSum(self.n[g, i, k] for k in ks if t.layout[s, k] == a) for a in C}
                if N == 1:
                    for a in C:
                        prob += self.ent[g, i, a] == na[a], f"e1_{g}_{i}_{a}"
                        prob += self.ext[g, i, a] == na[a], f"x1_{g}_{i}_{a}"
                    continue
                if len(C) == 1:
                    continue
                self._walk_rows(g, i, C, na, max(cap, 1))

    def _walk_rows(self, g: int, i: int, C: list[int], na: dict, cap: int) -> None:
        """``in``/``out``/``reach``: the portion's layers form a walk through layout classes."""
        prob = self.prob
        for a in C:
            u = self.use[g, i, a] = self._var(f"u_{g}_{i}_{a}", cat=pulp.LpBinary)
            r = self.rho[g, i, a] = self._var(
                f"rho_{g}_{i}_{a}", lowBound=0, upBound=cap, cat=pulp.LpInteger
            )
            prob += na[a] <= cap * u, f"use_{g}_{i}_{a}"
            prob += r >= u, f"visit_{g}_{i}_{a}"
            prob += r <= na[a], f"layers_{g}_{i}_{a}"
            for b in C:
                if a != b:
                    self.y[g, i, a, b] = self._var(
                        f"y_{g}_{i}_{a}_{b}", lowBound=0, upBound=cap, cat=pulp.LpInteger
                    )
        y = self.y
        for a in C:
            others = [b for b in C if b != a]
            prob += (
                self.ent[g, i, a] + pulp.lpSum(y[g, i, b, a] for b in others) == self.rho[g, i, a],
                f"in_{g}_{i}_{a}",
            )
            prob += (
                self.ext[g, i, a] + pulp.lpSum(y[g, i, a, b] for b in others) == self.rho[g, i, a],
                f"out_{g}_{i}_{a}",
            )
        for r in range(1, len(C)):
            for subset in itertools.combinations(C, r):
                into = pulp.lpSum(y[g, i, a, b] for a in C if a not in subset for b in subset)
                into += pulp.lpSum(self.ent[g, i, b] for b in subset)
                tag = "_".join(map(str, subset))
                for b in subset:
                    prob += into >= self.use[g, i, b], f"reach_{g}_{i}_{tag}_{b}"

    def _path(self) -> None:
        """``from``/``to``: the path through the portions, from (0, 0) to (last, S - 1)."""
        t, prob, G = self.t, self.prob, len(self.runs)
        S = t.num_stages
        self.Y, self.Z1, self.Z2 = {}, {}, {}
        win = [set(w) for w in self.win]
        for g, (s, e) in enumerate(self.runs):
            for i in self.win[g]:
                for a in self.classes[g]:
                    outs = []
                    if g + 1 < G and i in win[g + 1]:
                        for b in self.classes[g + 1]:
                            v = self.Y[g, i, a, b] = self._var(f"Y_{g}_{i}_{a}_{b}", lowBound=0)
                            outs.append(v)
                    if e > s and i + 1 in win[g]:
                        for b in self.classes[g]:
                            v = self.Z1[g, i, a, b] = self._var(f"Z1_{g}_{i}_{a}_{b}", lowBound=0)
                            outs.append(v)
                    if g + 1 < G and i + 1 in win[g + 1]:
                        for b in self.classes[g + 1]:
                            v = self.Z2[g, i, a, b] = self._var(f"Z2_{g}_{i}_{a}_{b}", lowBound=0)
                            outs.append(v)
                    if (g, i) != (G - 1, S - 1):
                        prob += pulp.lpSum(outs) == self.ext[g, i, a], f"from_{g}_{i}_{a}"
        for g in range(G):
            for i in self.win[g]:
                if (g, i) == (0, 0):
                    continue
                for b in self.classes[g]:
                    ins = []
                    if g > 0:
                        ins += [self.Y.get((g - 1, i, a, b)) for a in self.classes[g - 1]]
                        ins += [self.Z2.get((g - 1, i - 1, a, b)) for a in self.classes[g - 1]]
                    ins += [self.Z1.get((g, i - 1, a, b)) for a in self.classes[g]]
                    ins = [v for v in ins if v is not None]
                    prob += pulp.lpSum(ins) == self.ent[g, i, b], f"to_{g}_{i}_{b}"
        if (0, 0) not in self.pres or (G - 1, S - 1) not in self.pres:
            raise ValueError("the windows leave no path from the first layer to the last")
        prob += self.pres[0, 0] == 1, "start"
        prob += self.pres[G - 1, S - 1] == 1, "end"
        for g, (s, e) in enumerate(self.runs):
            every = [self.n[g, i, k] for i in self.win[g] for k in t.allowed[s]]
            prob += pulp.lpSum(every) == e - s + 1, f"assign_{g}"

    def _sizes(self, window: list[list[int]]) -> None:
        """``size_i``: integer layers on stages 0..i, within the bounds of the layer windows."""
        t, prob = self.t, self.prob
        L = t.num_layers
        on: list[list] = [[] for _ in range(t.num_stages)]
        for (_, i, _), var in self.n.items():
            on[i].append(var)
        prev = None
        for i in range(t.num_stages - 1):
            lo = sum(1 for u in range(L) if max(window[u]) <= i)
            hi = sum(1 for u in range(L) if min(window[u]) <= i)
            n = self._var(f"size_{i}", lowBound=lo, upBound=hi, cat=pulp.LpInteger)
            prob += (
                n == (pulp.lpSum(on[i]) if prev is None else prev + pulp.lpSum(on[i])),
                (f"size_{i}"),
            )
            prev = n

    def _objective(self, bound: float | None, bottleneck_s: float) -> None:
        t, prob, scale = self.t, self.prob, self.scale
        S, c = t.num_stages, t.num_microbatches
        p: list[list] = [[] for _ in range(S)]
        o: list[list] = [[] for _ in range(max(S - 1, 0))]
        sync: list[list] = [[] for _ in range(S)]
        mem: list[list] = [[] for _ in range(S)]
        host: list[list] = [[] for _ in range(S)]
        for (g, i, k), var in self.n.items():
            s = self.runs[g][0]
            p[i].append((var, float(t.A[s, k]) / scale))
            if t.G[s, k]:
                sync[i].append((var, float(t.G[s, k]) / scale))
            mem[i].append((var, float(t.M[s, k, i]) * MEMORY_ROW / t.memory_limit_bytes))
            if t.Mh[s, k]:
                host[i].append((var, float(t.Mh[s, k])))
        # reshards: inside a portion and on to the next run (same stage, in p_i), and across
        # a stage boundary inside a run or at its end (in o_i); edge after layer first or last
        for edges, table, end, into in (
            (self.y, t.R, 0, p),
            (self.Y, t.R, 1, p),
            (self.Z1, t.Rp, 0, o),
            (self.Z2, t.Rp, 1, o),
        ):
            for (g, i, a, b), var in edges.items():
                if r := float(table[self.runs[g][end], a, b]):
                    into[i].append((var, r / scale))
        tb = self._var("t", lowBound=0)
        ts = self._var("t_sync", lowBound=0)
        loads = [pulp.LpAffineExpression(x, constant=t.stage_overhead_s / scale) for x in p]
        links = [pulp.LpAffineExpression(x) for x in o]
        for i in range(S):
            prob += tb >= loads[i], f"bottleneck_{i}"
            prob += pulp.LpAffineExpression(mem[i]) <= MEMORY_ROW, f"memory_{i}"
        for i in range(S - 1):
            prob += tb >= links[i], f"link_{i}"
        lb = max(bottleneck_lower_bound(t), bottleneck_s)
        if np.isfinite(lb):
            prob += tb >= lb / scale, "bottleneck_lb"
        if t.uses_host_memory and np.isfinite(t.host_limit_bytes):
            for nd, ranks in enumerate(t.host_ranks):
                tm = [
                    (var, ranks[i] * x * MEMORY_ROW / t.host_limit_bytes)
                    for i in range(S)
                    for var, x in host[i]
                    if ranks[i] > 0
                ]
                if tm:
                    prob += pulp.LpAffineExpression(tm) <= MEMORY_ROW, f"host_{nd}"
        # the stage's largest F, by levels: z[i,l] = 1 when it is at least the l-th smallest F
        # of the strategies that may run there (z[i,l] <= z[i,l-1]); a strategy of F level l
        # needs z[i,l]; the sync pays each step between levels that is switched on. One binary
        # per stage and level (a binary per portion and strategy, as the layer program's
        # largest-F rows have, took HiGHS 7 % longer over the search grid's 110 programs, and
        # 2.3 s instead of 1.5 s on the 128-layer model's pp = 8 table at 32 devices, fp32,
        # batch 256)
        self.levels: list[list[float]] = [[] for _ in range(S)]
        self.z: dict = {}
        F_of = {
            (g, k): float(t.F[s, k]) for g, (s, _) in enumerate(self.runs) for k in t.allowed[s]
        }
        for i in range(S):
            on = [(g, k, var) for (g, j, k), var in self.n.items() if j == i and var.upBound]
            levels = self.levels[i] = sorted({F_of[g, k] for g, k, _ in on} - {0.0})
            for idx, level in enumerate(levels):
                z = self.z[i, idx] = self._var(f"z_{i}_{idx}", cat=pulp.LpBinary)
                sync[i].append((z, (level - (levels[idx - 1] if idx else 0.0)) / scale))
                if idx:
                    prob += z <= self.z[i, idx - 1], f"level_{i}_{idx}"
            for g, k, var in on:
                if F_of[g, k] > 0:
                    z = self.z[i, levels.index(F_of[g, k])]
                    prob += var <= max(self.cap[g, i], 1) * z, f"uses_{g}_{i}_{k}"
        for i in range(S):
            prob += ts >= pulp.LpAffineExpression(sync[i]), f"sync_{i}"
        obj = pulp.lpSum(loads) + pulp.lpSum(links) + (c - 1) * tb + ts
        obj += t.step_overhead_s / scale
        if bound is not None:
            prob += obj <= bound * (1 + 1e-7) / scale, "cutoff"
        prob += obj

    # -- translating ------------------------------------------------------------------------

    def start_values(self, stage_of: list[int], strategy_of: list[int]) -> dict:
        """HiGHS start values for an assignment (empty when it lies outside the windows or
        caps). Dominated strategies are first traded for those that dominate them (no term
        grows)."""
        t = self.t
        S = t.num_stages
        strategy_of = list(strategy_of)
        vals: dict[str, float] = {}
        order: list[tuple[int, int]] = []  # the portions on the path
        first_of: dict[tuple[int, int], int] = {}
        last_of: dict[tuple[int, int], int] = {}
        for g, (s, e) in enumerate(self.runs):
            for u in range(s, e + 1):
                i = stage_of[u]
                strategy_of[u] = _lean(t, s, i, strategy_of[u])
                if (g, i) not in first_of:
                    first_of[g, i] = u
                    order.append((g, i))
                last_of[g, i] = u
        lay = [int(t.layout[u, k]) for u, k in enumerate(strategy_of)]
        for g, i in order:
            s = self.runs[g][0]
            if (g, i) not in self.pres:
                return {}
            us = range(first_of[g, i], last_of[g, i] + 1)
            if len(us) > self.cap[g, i]:
                return {}
            vals[self.pres[g, i].name] = 1.0
            for k, m in Counter(strategy_of[u] for u in us).items():
                vals[self.n[g, i, k].name] = float(m)
            vals[self.ent[g, i, lay[us[0]]].name] = 1.0
            vals[self.ext[g, i, lay[us[-1]]].name] = 1.0
            if (g, i, lay[us[0]]) in self.use:
                seq = [lay[u] for j, u in enumerate(us) if j == 0 or lay[u] != lay[u - 1]]
                for a, m in Counter(seq).items():
                    vals[self.use[g, i, a].name] = 1.0
                    vals[self.rho[g, i, a].name] = float(m)
                for (a, b), m in Counter(zip(seq, seq[1:])).items():
                    vals[self.y[g, i, a, b].name] = float(m)
        for (g, i), (h, j) in zip(order, order[1:]):
            u = last_of[g, i]
            key = (g, i, lay[u], lay[u + 1])
            edge = {(g + 1, i): self.Y, (g, i + 1): self.Z1, (g + 1, i + 1): self.Z2}
            var = edge.get((h, j), {}).get(key)
            if var is None:
                return {}
            vals[var.name] = 1.0
        for i in range(S - 1):
            vals[f"size_{i}"] = float(sum(1 for j in stage_of if j <= i))
        ev = evaluate_assignment(t, stage_of, strategy_of)
        vals["t"] = max(ev.stage_time_s + ev.link_time_s) / self.scale
        vals["t_sync"] = max(ev.sync_time_s) / self.scale
        for i in range(S):
            fi = max((float(t.F[u, k]) for u, k in enumerate(strategy_of) if stage_of[u] == i))
            for idx, level in enumerate(self.levels[i]):
                vals[self.z[i, idx].name] = float(level <= fi)
        return vals

    def assignment(self) -> tuple[list[int], list[int]]:
        """The assignment of the solved program's values: each portion's layers laid out
        along an Euler walk of its layout changes (:func:`_walk`)."""
        t = self.t
        stage_of: list[int] = []
        strategy_of: list[int] = []

        def val(v) -> int:
            return int(round(v.varValue or 0.0)) if v is not None else 0

        for g, (s, _) in enumerate(self.runs):
            C = self.classes[g]
            for i in self.win[g]:
                count = {k: val(self.n[g, i, k]) for k in t.allowed[s]}
                count = {k: m for k, m in count.items() if m > 0}
                if not count:
                    continue
                entry = max(C, key=lambda a: self.ent[g, i, a].varValue or 0.0)
                leave = max(C, key=lambda a: self.ext[g, i, a].varValue or 0.0)
                changes = {
                    (a, b): val(self.y.get((g, i, a, b)))
                    for a in C
                    for b in C
                    if a != b and val(self.y.get((g, i, a, b))) > 0
                }
                for k in _lay_out(t, s, count, _walk(entry, leave, changes)):
                    stage_of.append(i)
                    strategy_of.append(k)
        return stage_of, strategy_of


def _walk(entry: int, leave: int, changes: dict[tuple[int, int], int]) -> list[int]:
    """The layout classes visited by a walk from ``entry`` that makes every change ``(a, b)``
    its multiplicity of times (Hierholzer's algorithm); ``[entry]`` when there is none."""
    out: dict[int, list[int]] = defaultdict(list)
    for (a, b), m in sorted(changes.items()):
        out[a] += [b] * m
    stack, walk = [entry], []
    while stack:
        a = stack[-1]
        if out[a]:
            stack.append(out[a].pop())
        else:
            walk.append(stack.pop())
    walk.reverse()
    if walk[-1] != leave or len(walk) != 1 + sum(changes.values()):
        raise ValueError(f"no walk from layout {entry} to {leave} with changes {changes}")
    return walk


def _lay_out(t: CostTables, u: int, count: dict[int, int], walk: list[int]) -> list[int]:
    """Strategies, in order, for a portion of run layer ``u``'s kind: each visit of a layout
    class takes one of its layers (the first visit all that the later ones leave)."""
    pool = {
        a: [k for k in sorted(count) if t.layout[u, k] == a for _ in range(count[k])]
        for a in set(walk)
    }
    visits = Counter(walk)
    seen: Counter = Counter()
    out: list[int] = []
    for a in walk:
        seen[a] += 1
        take = len(pool[a]) - (visits[a] - seen[a]) if seen[a] == 1 else 1
        if take < 1:
            raise ValueError(f"layout {a} has fewer layers than visits")
        out += pool[a][:take]
        pool[a] = pool[a][take:]
    if any(pool.values()) or len(out) != sum(count.values()):
        raise ValueError("the walk does not use every layer of the portion")
    return out
