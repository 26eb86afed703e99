"""Random cost tables for the solver, bound and search tests (small enough to enumerate)."""

from __future__ import annotations

import itertools
import math

import numpy as np

from uniap.bounds import SegmentBound, candidate_lower_bound, stage_windows
from uniap.cost_model import CostTables, evaluate_assignment
from uniap.graph import Layer, ModelGraph, TPPair
from uniap.milp import Solution, solve
from uniap.search import compositions, exhaustive, heuristic

__all__ = [
    "assert_bounds_keep_the_optimum",
    "assert_program_equals_enumeration",
    "preset_plan_tables",
    "random_tables",
    "synthetic_graph",
]


def assert_program_equals_enumeration(t: CostTables) -> tuple[float, list[int], Solution] | None:
    """The program, cold and warm-started from the heuristic with a cutoff 2 % above the
    optimum, equals exhaustive search over every split and strategy (its objective too);
    ``(optimum, its stage_of, the cold solution)``, or None when nothing fits (the program
    must say infeasible)."""
    opt, stage_of, _ = exhaustive(t)
    sol = solve(t)
    if math.isinf(opt):
        assert sol.status == "infeasible"
        return None
    assert sol.status == "optimal"
    assert math.isclose(sol.time_per_iteration_s, opt, rel_tol=1e-9)
    assert math.isclose(sol.objective_s, opt, rel_tol=1e-6)
    warm = solve(t, incumbent=heuristic(t), incumbent_tpi_s=opt * 1.02)
    assert math.isclose(warm.time_per_iteration_s, opt, rel_tol=1e-9)
    return opt, stage_of, sol


def assert_bounds_keep_the_optimum(t: CostTables, opt: float) -> None:
    """Against ``opt``, the enumerated optimum of ``t``: the candidate and segment bounds stay
    below it (finite where it is), and the stage windows (of the whole table and of the
    segment bound) keep every assignment that fits and is faster than ``1.05 opt``."""
    assert candidate_lower_bound(t) <= opt * (1 + 1e-12)
    seg = SegmentBound(t)
    for target in (None, opt * 0.999, opt, opt * 1.5):
        if target is not None and math.isinf(target):
            continue
        lb = seg.lower_bound(target)
        assert lb <= opt * (1 + 1e-12) and (math.isfinite(lb) or math.isinf(opt))
    if math.isinf(opt):
        return
    target = opt * 1.05
    win, runs = stage_windows(t, target), seg.windows(target)
    for stage_of in compositions(t.num_layers, t.num_stages):
        for strat in itertools.product(*t.allowed):
            ev = evaluate_assignment(t, stage_of, list(strat))
            if ev.fits and ev.time_per_iteration_s < target:
                assert all(i in win[u] and i in runs[u] for u, i in enumerate(stage_of))


def preset_plan_tables(plan, cluster: str) -> tuple[CostTables, list[int], list[int]]:
    """The cost tables a plan of a model preset (built on the meta device) is priced in on
    ``cluster``, and its assignment (:meth:`uniap.cost_model.CostModel.plan_tables`)."""
    from uniap import models
    from uniap.cluster import load_cluster
    from uniap.cost_model import CostModel
    from uniap.graph import build_graph

    name = plan.model_name
    m = models.build_model(name, device="meta")
    g = build_graph(m, models.example_batch(m, 2, device="meta")[0], name=name)
    return CostModel(g, load_cluster(cluster), precision=plan.precision).plan_tables(plan)


def random_tables(seed: int) -> CostTables:
    rng = np.random.default_rng(seed)
    L = int(rng.integers(3, 7))
    pp = int(rng.integers(1, min(L, 4) + 1))
    K = int(rng.integers(2, 5 if L <= 5 else 4))
    C = int(rng.integers(1, K + 1))
    c = int(rng.choice([1, 2, 3, 4, 8]))
    layout_k = rng.integers(0, C, size=K)
    layout = np.tile(layout_k, (L, 1))
    A = rng.uniform(0.1, 2.0, size=(L, K))
    allowed = []
    for u in range(L):
        ks = sorted(rng.choice(K, size=int(rng.integers(1, K + 1)), replace=False).tolist())
        allowed.append(ks)
        for k in range(K):
            if k not in ks:
                A[u, k] = np.inf
    G = rng.uniform(0.0, 1.0, size=(L, K))
    M = rng.uniform(1.0, 10.0, size=(L, K, 1)) + rng.uniform(0, 2.0, size=(L, K, pp))
    if seed % 2:  # a run of identical layers (exercises symmetry breaking and count variables)
        s0 = int(rng.integers(0, L - 2))
        for u in range(s0 + 1, min(L, s0 + 4)):
            A[u], G[u], M[u], allowed[u] = A[s0], G[s0], M[s0], list(allowed[s0])
    R = rng.uniform(0.0, 0.5, size=(max(L - 1, 0), C, C))
    for a in range(C):
        R[:, a, a] = 0.0
    Rp = rng.uniform(0.05, 1.0, size=(max(L - 1, 0), C, C))
    # A memory limit that binds: between the leanest and the median plan's peak.
    # a once-per-stage exposed sync on most instances (its own stream: the draws above stay)
    F = np.random.default_rng(seed + 10_000).uniform(0.0, 1.0, size=(L, K)) * (seed % 3 != 2)
    if seed % 2:
        for u in range(s0 + 1, min(L, s0 + 4)):
            F[u] = F[s0]
    t = CostTables(pp, c, A, G, M, layout, R, Rp, 1e30, allowed, F=F)
    peaks = []
    for stage_of in compositions(L, pp):
        strat = [min(allowed[u], key=lambda k, u=u: M[u, k, 0]) for u in range(L)]
        peaks.append(max(evaluate_assignment(t, stage_of, strat).peak_memory_bytes))
        strat = [min(allowed[u], key=lambda k, u=u: A[u, k]) for u in range(L)]
        peaks.append(max(evaluate_assignment(t, stage_of, strat).peak_memory_bytes))
    lo, hi = min(peaks), max(peaks)
    t.memory_limit_bytes = float(lo + rng.uniform(0.0, 0.6) * (hi - lo))
    return t


def synthetic_graph(num_layers: int = 4, seed: int = 0) -> ModelGraph:
    """A chain of uneven layers, some with a TP plan, sized so a 4 GiB device binds."""
    import random

    rng = random.Random(seed)
    layers = []
    for u in range(num_layers):
        params = rng.choice([50e6, 120e6, 200e6])
        tp = u % 2 == 1
        layers.append(
            Layer(
                fqn=f"layers.{u}",
                type_name="Block",
                num_params=int(params),
                param_bytes=int(params * 4),
                fwd_flops_per_sample=rng.uniform(0.5, 3.0) * 1e9,
                bwd_flops_per_sample=rng.uniform(1.0, 6.0) * 1e9,
                output_bytes_per_sample=rng.choice([1e5, 4e5]),
                saved_bytes_per_sample=rng.choice([2e7, 6e7]),
                tp_pairs=(TPPair(("a",), "b", 2e5),) if tp else (),
                tp_divisors=(4,) if tp else (),
                tp_saved_fraction=0.6,
                cost_key=f"k{u}",
            )
        )
    return ModelGraph("synthetic", tuple(layers))
