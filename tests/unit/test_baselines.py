"""The benchmark baselines (benchmarks/baselines) on tiny instances: valid plans, never better
than uniap, and uniap equal to the exhaustive search."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from benchmarks.baselines import (  # noqa: E402
    HANDSET_METHODS,
    alpa,
    exhaustive_search,
    galvatron,
    handset,
    to_plan,
    uniap_search,
)
from benchmarks.baselines.alpa import candidate_order, inter_op_dp  # noqa: E402
from benchmarks.baselines.common import candidate_tables, even_split, param_split  # noqa: E402
from benchmarks.baselines.galvatron import galvatron_split, memory_unit, stage_dp  # noqa: E402
from uniap import models  # noqa: E402
from uniap.cluster import load_cluster  # noqa: E402
from uniap.cost_model import CostModel, evaluate_assignment  # noqa: E402
from uniap.graph import build_graph  # noqa: E402

# (model, devices, memory GiB, global batch): the small memories make memory bind.
INSTANCES = [
    ("bert-tiny", 2, 0.0022, 8),
    ("vit-tiny", 4, 0.0012, 16),
    ("gpt-tiny", 2, 0.004, 4),
]


def _cost_model(name: str, devices: int, memory_gib: float) -> CostModel:
    graph = build_graph(
        models.build_model(name, device="meta"),
        models.example_batch(name, 2, device="meta")[0],
        name=name,
        dtype=torch.bfloat16,
    )
    cluster = load_cluster("a100-1x8").replace(
        name=f"tiny-{devices}", devices_per_node=devices, device_memory_bytes=memory_gib * 2**30
    )
    return CostModel(graph, cluster)


@pytest.fixture(scope="module")
def results() -> dict:
    """Every method on every instance, computed once."""
    out = {}
    for name, n, mem, batch in INSTANCES:
        cm = _cost_model(name, n, mem)
        res = {
            "uniap": uniap_search(cm, batch),
            "galvatron": galvatron(cm, batch),
            "alpa": alpa(cm, batch, time_cap_s=60),
        }
        for m in HANDSET_METHODS:
            res[m] = handset(cm, batch, m)
        out[name, n, mem, batch] = (cm, res)
    return out


def test_every_baseline_returns_a_valid_assignment(results) -> None:
    """Stages contiguous from 0 to pp-1, allowed strategies, evaluation reproduces the TPI; its
    plan carries the precision it was costed at."""
    for (_, _, _, batch), (cm, res) in results.items():
        for method, r in res.items():
            if not r.found:
                continue
            t = cm.tables(r.pp, r.num_microbatches, batch)
            assert r.stage_of[0] == 0 and r.stage_of[-1] == r.pp - 1, method
            assert all(b - a in (0, 1) for a, b in zip(r.stage_of, r.stage_of[1:])), method
            assert all(k in t.allowed[u] for u, k in enumerate(r.strategy_of)), method
            ev = evaluate_assignment(t, r.stage_of, r.strategy_of)
            assert ev.time_per_iteration_s == pytest.approx(r.time_per_iteration_s, rel=1e-12)
            assert ev.fits == r.fits
            plan = to_plan(cm, t, r.stage_of, r.strategy_of, batch)
            assert cm.evaluate(plan).time_per_iteration_s == pytest.approx(r.time_per_iteration_s)
            assert plan.precision == cm.precision  # the executor runs what was costed


def test_search_baselines_find_fitting_plans(results) -> None:
    """Galvatron and Alpa return a plan that fits on every tiny instance."""
    for key, (_, res) in results.items():
        for method in ("galvatron", "alpa"):
            assert res[method].found and res[method].fits, (key, method)
            assert not res[method].capped


def test_uniap_never_worse_than_any_baseline(results) -> None:
    """uniap's TPI <= every baseline's fitting plan on every tiny instance."""
    for key, (_, res) in results.items():
        u = res["uniap"]
        assert u.fits
        for method, r in res.items():
            if r.found and r.fits:
                assert u.time_per_iteration_s <= r.time_per_iteration_s * (1 + 1e-9), (key, method)


@pytest.mark.parametrize(
    "instance", [INSTANCES[0], INSTANCES[1]], ids=lambda i: f"{i[0]}-{i[1]}dev"
)
def test_exhaustive_agrees_with_uniap(results, instance) -> None:
    """The exhaustive optimum over every (pp, c) equals uniap's plan."""
    cm, res = results[instance]
    ex = exhaustive_search(cm, instance[3])
    assert ex.time_per_iteration_s == pytest.approx(res["uniap"].time_per_iteration_s, rel=1e-9)


def test_galvatron_stage_dp_is_optimal_for_its_objective(results) -> None:
    """The per-stage DP equals brute force over the stage's strategies (its objective, its
    memory units), with coarse units and with its default (1 MiB, or finer on tiny devices)."""
    cm, _ = results[INSTANCES[1]]
    t = cm.tables(1, 2, INSTANCES[1][3])
    layers = list(range(t.num_layers))
    assert memory_unit(t) == pytest.approx(t.memory_limit_bytes / 40960)  # a 1.2 MiB device
    for unit in (t.memory_limit_bytes / 1024, memory_unit(t)):
        q = int(np.floor(t.memory_limit_bytes / unit + 1e-9))
        best = np.inf
        for strat in itertools.product(*t.allowed):
            mem = sum(int(np.ceil(t.M[u, k, 0] / unit - 1e-9)) for u, k in zip(layers, strat))
            if mem > q:
                continue
            cost = sum(2 * t.A[u, k] + t.G[u, k] for u, k in zip(layers, strat))
            cost += sum(
                2 * t.R[u, t.layout[u, a], t.layout[u + 1, b]]
                for u, (a, b) in enumerate(zip(strat, strat[1:]))
            )
            best = min(best, cost)
        got = stage_dp(t, layers, 0, unit)
        cost = sum(2 * t.A[u, k] + t.G[u, k] for u, k in zip(layers, got))
        cost += sum(
            2 * t.R[u, t.layout[u, a], t.layout[u + 1, b]]
            for u, (a, b) in enumerate(zip(got, got[1:]))
        )
        assert cost == pytest.approx(best, rel=1e-12)


def test_galvatron_split_puts_the_remainder_last() -> None:
    """Galvatron's pp_division_even: L // pp blocks per stage, the remainder on the last stage,
    embeddings with the first and norm + head with the last (llama-tiny with 9 blocks: 12
    layers)."""
    graph = build_graph(
        models.build_model("llama-tiny", device="meta", n_layers=9),
        models.example_batch("llama-tiny", 2, device="meta")[0],
        name="llama-tiny",
        dtype=torch.bfloat16,
    )
    assert graph.num_layers == 12
    sizes = lambda so: [so.count(i) for i in range(max(so) + 1)]  # noqa: E731
    assert sizes(galvatron_split(graph, 2)) == [1 + 4, 5 + 2]
    assert sizes(galvatron_split(graph, 4)) == [1 + 2, 2, 2, 3 + 2]
    assert sizes(galvatron_split(graph, 12)) == [1] * 12  # fewer blocks than stages: every layer


def test_handtuned_is_the_best_uniform_plan(results) -> None:
    """The hand-tuned grid contains torchtitan's recipe and pure DDP / FSDP: it is never worse."""
    for key, (cm, res) in results.items():
        h = res["handtuned"]
        assert h.fits, key
        if res["torchtitan"].fits:
            assert h.time_per_iteration_s <= res["torchtitan"].time_per_iteration_s * (1 + 1e-12), (
                key
            )
        n, batch = cm.cluster.world_size, key[3]
        for t in candidate_tables(cm, batch, pp_degrees=[1]):
            for kind in ("DDP", "FSDP"):
                ks = [
                    next(
                        (
                            k
                            for k in t.allowed[u]
                            if t.strategies[k].dp == n
                            and t.strategies[k].kind == kind
                            and not t.strategies[k].recompute
                        ),
                        None,
                    )
                    for u in range(t.num_layers)
                ]
                if None in ks:
                    continue
                ev = evaluate_assignment(t, [0] * t.num_layers, ks)
                if ev.fits:
                    assert h.time_per_iteration_s <= ev.time_per_iteration_s * (1 + 1e-12), (
                        key,
                        kind,
                    )


def test_alpa_inter_op_dp_matches_brute_force() -> None:
    """Alpa's t_max-enumerating DP equals min over all splits of sum + (c - 1) max."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        pp, num_layers, c = (
            int(rng.integers(1, 4)),
            int(rng.integers(3, 7)),
            int(rng.integers(1, 6)),
        )
        lat = rng.uniform(0.1, 1.0, size=(pp, num_layers, num_layers))
        lat[rng.uniform(size=lat.shape) < 0.2] = np.inf
        best = np.inf
        for cuts in itertools.combinations(range(1, num_layers), pp - 1):
            b = [0, *cuts, num_layers]
            ts = [lat[i, b[i], b[i + 1] - 1] for i in range(pp)]
            best = min(best, sum(ts) + (c - 1) * max(ts))
        got = inter_op_dp(lat, c)
        if not np.isfinite(best):
            assert got is None
        else:
            assert got[0] == pytest.approx(best, rel=1e-12)


def test_stage_splits() -> None:
    """Even and parameter-count splits give pp contiguous non-empty stages."""
    assert even_split(7, 3) == [0, 0, 0, 1, 1, 2, 2]
    assert param_split([1, 1, 1, 1], 4) == [0, 1, 2, 3]
    assert param_split([10, 1, 1, 1, 1], 2) == [0, 1, 1, 1, 1]
    assert param_split([1, 1, 1, 1, 1, 1], 2) == [0, 0, 0, 1, 1, 1]


def test_compare_alpa_cap_and_search_time_verdicts() -> None:
    """compare.py raises the Alpa-style cap only where the target applies (>= 16 devices), and
    reports a capped run's ratio as a lower bound: the target holds only when every row with
    >= 16 devices reaches 10x, measured or as a lower bound."""
    import compare

    from benchmarks.baselines import BaselineResult

    small = compare.Workload("bert-tiny", compare.tiny(4, 1.0), 16)
    big = compare.Workload("llama2-70b", compare.h100(8), 128)
    assert compare.alpa_cap(small, 5.0, 20.0, 15.0, 180.0) == 20.0
    assert compare.alpa_cap(big, 0.5, 20.0, 15.0, 180.0) == 20.0
    assert compare.alpa_cap(big, 5.0, 20.0, 15.0, 180.0) == 75.0
    assert compare.alpa_cap(big, 50.0, 20.0, 15.0, 180.0) == 180.0
    assert compare.alpa_cap(big, 5.0, 20.0, 0.0, 180.0) == 20.0

    def row(uniap_s: float, alpa_s: float, capped: bool):
        return big, {
            "uniap": BaselineResult("uniap", wall_s=uniap_s),
            "alpa": BaselineResult("alpa", wall_s=alpa_s, capped=capped),
        }

    text, holds = compare.search_time_target([row(1.0, 30.0, True), row(2.0, 25.0, False)])
    assert holds and "yes (lower bound)" in text and ">= 30x" in text
    text, holds = compare.search_time_target([row(1.0, 30.0, True), row(3.0, 20.0, True)])
    assert not holds and "not shown (Alpa capped)" in text and "shown on 1 of 2 rows" in text
    text, holds = compare.search_time_target([row(3.0, 20.0, False)])
    assert not holds and "| no |" in text
    _, holds = compare.search_time_target(
        [
            (
                small,
                {
                    "uniap": BaselineResult("uniap", wall_s=1.0),
                    "alpa": BaselineResult("alpa", wall_s=1.0),
                },
            )
        ]
    )
    assert not holds  # no row the target applies to: nothing shown


def test_alpa_visits_every_pp_first_and_reports_progress(results) -> None:
    """Candidates go round-robin over pp (a capped run has seen every pp); the result says how
    many (pp, c) it finished, all of them when it was not capped."""
    assert candidate_order([1, 2, 4], [1, 2, 8]) == [
        (1, 1),
        (2, 1),
        (4, 1),
        (1, 2),
        (2, 2),
        (4, 2),
        (1, 8),
        (2, 8),
        (4, 8),
    ]
    for key, (_, res) in results.items():
        a = res["alpa"]
        assert not a.capped and a.candidates_done == a.candidates_total > 0, key
    cm, _ = results[INSTANCES[0]]
    capped = alpa(cm, INSTANCES[0][3], time_cap_s=0.0)
    assert capped.capped and capped.candidates_done < capped.candidates_total
    assert capped.progress == f"{capped.candidates_done}/{capped.candidates_total} (pp, c)"


def test_compare_full_mode_reports_measured_rows() -> None:
    """compare.py --full: a row that finishes says so with every (pp, c) done and a measured
    ratio; one stopped at its limit says how far it got and gives a lower bound."""
    import compare

    w = compare.Workload("bert-tiny", compare.tiny(2, 0.0022), 8)
    done = compare.alpa_full([w], 600.0).splitlines()[-1].split(" | ")
    assert done[4] == "yes" and done[5].split("/")[0] == done[5].split("/")[1].split(" ")[0]
    assert int(done[6]) > 0 and not done[7].startswith(">=") and done[8].rstrip(" |") == "1.0000"
    stopped = compare.alpa_full([w], 0.0).splitlines()[-1].split(" | ")
    assert stopped[4].startswith("no (stopped") and stopped[7].startswith(">= ")
