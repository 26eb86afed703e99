"""The independent optimality check (uniap.verify, a DP that shares no code with the MILP)
equals exhaustive search on random small instances and the MILP's optimum on a 27-layer
Llama with binding memory for pp in {1, 2, 4}."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from uniap import models
from uniap.cluster import load_cluster
from uniap.cost_model import CostModel, CostTables, evaluate_assignment
from uniap.graph import build_graph
from uniap.planner import plan_graph
from uniap.search import exhaustive
from uniap.verify import _pareto3, compositions, optimum


def random_tables(seed: int) -> CostTables:
    """A random instance (3-6 layers, 1-4 stages) whose memory limit often binds."""
    rng = np.random.default_rng(seed)
    L = int(rng.integers(3, 7))
    pp = int(rng.integers(1, min(L, 4) + 1))
    K = int(rng.integers(2, 5 if L <= 5 else 4))
    C = int(rng.integers(1, K + 1))
    c = int(rng.choice([1, 2, 3, 4, 8]))
    layout = np.tile(rng.integers(0, C, size=K), (L, 1))
    A = rng.uniform(0.1, 2.0, size=(L, K))
    allowed = []
    for u in range(L):
        ks = sorted(rng.choice(K, size=int(rng.integers(1, K + 1)), replace=False).tolist())
        allowed.append(ks)
        A[u, [k for k in range(K) if k not in ks]] = np.inf
    G = rng.uniform(0.0, 1.0, size=(L, K))
    M = rng.uniform(1.0, 10.0, size=(L, K, 1)) + rng.uniform(0, 2.0, size=(L, K, pp))
    R = rng.uniform(0.0, 0.5, size=(L - 1, C, C))
    for a in range(C):
        R[:, a, a] = 0.0
    Rp = rng.uniform(0.05, 1.0, size=(L - 1, C, C))
    return CostTables(
        pp=pp,
        num_microbatches=c,
        A=A,
        G=G,
        M=M,
        layout=layout,
        R=R,
        Rp=Rp,
        memory_limit_bytes=float(rng.uniform(1.0, 3.0) * L * 5.5 / pp),
        allowed=allowed,
        stage_overhead_s=float(rng.uniform(0, 0.2)) if pp > 1 else 0.0,
        step_overhead_s=0.01,
        # every other instance: a once-per-stage exposed sync (its own stream of numbers)
        F=np.random.default_rng(seed + 10_000).uniform(0.0, 1.0, size=(L, K)) * (seed % 2),
    )


@pytest.mark.parametrize("seed", range(80))
def test_random_instance_matches_exhaustive(seed: int) -> None:
    """Over every split, and on the exhaustive optimum's own split, the DP's TPI is exhaustive's."""
    t = random_tables(seed)
    ex_tpi, ex_stage_of, _ = exhaustive(t)
    got = optimum(t)
    if not np.isfinite(ex_tpi):
        assert not np.isfinite(got.time_per_iteration_s) and not got.stage_of
        return
    assert got.time_per_iteration_s == pytest.approx(ex_tpi, rel=1e-9)
    ev = evaluate_assignment(t, got.stage_of, got.strategy_of)
    assert ev.fits and ev.time_per_iteration_s == pytest.approx(ex_tpi, rel=1e-9)
    fixed = optimum(t, ex_stage_of)
    assert fixed.time_per_iteration_s == pytest.approx(ex_tpi, rel=1e-9)
    assert fixed.stage_of == ex_stage_of
    # an upper bound only cuts what cannot beat it: just above the optimum it is found, just
    # below nothing is
    for split in (None, ex_stage_of):
        above = optimum(t, split, upper_bound_s=ex_tpi * (1 + 1e-9))
        assert above.time_per_iteration_s == pytest.approx(ex_tpi, rel=1e-9)
        assert optimum(t, split, upper_bound_s=ex_tpi * (1 - 1e-9)).stage_of == []


def test_pareto3_equals_brute_force() -> None:
    """The blocked staircase filter keeps exactly the non-dominated rows (ties: one copy)."""
    rng = np.random.default_rng(0)
    for block in (3, 64):
        v = rng.integers(0, 6, size=(300, 3)).astype(float)
        kept = {tuple(v[i]) for i in _pareto3(v, block=block)}
        want = {tuple(x) for x in v if not any((y <= x).all() and (y < x).any() for y in v)}
        assert kept == want
        assert len(_pareto3(v, block=block)) == len(want)


def test_bad_stage_split_is_refused() -> None:
    """A split with an empty or non-contiguous stage gets one clear error."""
    t = next(t for t in map(random_tables, range(100)) if t.pp == 3 and t.num_layers >= 4)
    with pytest.raises(ValueError, match="contiguous, non-empty run"):
        optimum(t, [0, 2, 2] + [2] * (t.num_layers - 3))
    with pytest.raises(ValueError, match=f"each of the {t.num_layers} layers a stage in 0..2"):
        optimum(t, [0, 1, 2])
    assert len(list(compositions(6, 3))) == len(list(itertools.combinations(range(1, 6), 2)))


@pytest.fixture(scope="module")
def llama24():
    """A Llama with 24 blocks (27 layers) on 4 devices with 12 MiB usable memory each."""
    graph = build_graph(
        models.build_model("llama-tiny", device="meta", n_layers=24),
        models.example_batch("llama-tiny", 2, device="meta")[0],
        name="llama-tiny",
        dtype=torch.bfloat16,
    )
    cluster = load_cluster("a100-1x8").replace(
        name="tiny-1x4", devices_per_node=4, device_memory_bytes=12 * 2**20 / 0.9
    )
    return graph, cluster


@pytest.mark.parametrize(("pp", "c"), [(1, 1), (2, 1), (4, 4)])
def test_medium_llama_dp_equals_milp(llama24, pp: int, c: int) -> None:
    """On every split, the DP's optimum equals the planner's MILP optimum for this (pp, c);
    the memory limit binds (with 100x the memory the optimum is lower)."""
    graph, cluster = llama24
    B = 16
    plan = plan_graph(graph, cluster, global_batch_size=B, pp_degrees=[pp], num_microbatches=[c])
    assert plan.solver.get("status") == "optimal"
    cm = CostModel(graph, cluster)
    t = cm.tables(pp, c, B)
    assert t.num_layers == 27
    milp_tpi = cm.evaluate(plan).time_per_iteration_s
    got = optimum(t)
    assert got.time_per_iteration_s == pytest.approx(milp_tpi, rel=1e-6)
    stage_of = cm.assignment(plan, t)[0]
    assert optimum(t, stage_of).time_per_iteration_s == pytest.approx(milp_tpi, rel=1e-6)
    roomy = dataclasses.replace(t, memory_limit_bytes=t.memory_limit_bytes * 100)
    # every split for pp = 2 with roomy memory takes ~20 s; its own split already shows it
    assert optimum(roomy, stage_of if pp == 2 else None).time_per_iteration_s < milp_tpi * (
        1 - 1e-6
    )


def test_infeasible_memory_gives_no_plan(llama24) -> None:
    """Below the leanest plan's memory the DP finds nothing, over every split and on one."""
    graph, cluster = llama24
    cm = CostModel(graph, cluster)
    for pp in (1, 2):
        t = dataclasses.replace(cm.tables(pp, 1, 16), memory_limit_bytes=2**20)
        got = optimum(t)
        assert got.stage_of == [] and got.time_per_iteration_s == float("inf")
    assert optimum(t, [0] * 13 + [1] * 14).stage_of == []
