"""Reading a plan: the breakdowns add up to what the cost model predicts, explain's rows are the
planner's search, and the text uses human units."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from uniap.cluster import load_cluster
from uniap.contract import Plan
from uniap.cost_model import CostModel, evaluate_assignment
from uniap.explain import render_explain
from uniap.models import build_model, example_batch
from uniap.planner import plan as make_plan
from uniap.report import (
    MEMORY_TERMS,
    TIME_TERMS,
    fmt_bytes,
    fmt_seconds,
    memory_breakdown,
    plan_report,
    render_plan,
    time_breakdown,
)
from uniap.search import heuristic


@pytest.fixture(scope="module")
def graph():
    from uniap.graph import build_graph

    m = build_model("gpt-tiny", device="meta")
    return build_graph(m, example_batch(m, 2, device="meta")[0], name="gpt-tiny")


@pytest.fixture(scope="module")
def planned(graph):
    return make_plan(graph, load_cluster("cpu-4"), global_batch_size=16)


@pytest.mark.parametrize(
    ("pp", "c", "schedule"), [(1, 1, "1F1B"), (1, 4, "1F1B"), (2, 4, "1F1B"), (4, 8, "GPipe")]
)
def test_breakdowns_sum_to_the_cost_models_tpi_and_peak_memory(graph, pp, c, schedule):
    """Time terms sum to evaluate_assignment's TPI; memory terms to each stage's peak."""
    cm = CostModel(graph, load_cluster("cpu-4"))
    t = cm.tables(pp, c, 16, schedule)
    stage_of, strategy_of = heuristic(t)
    ev = evaluate_assignment(t, stage_of, strategy_of)
    tb = time_breakdown(t, stage_of, strategy_of)
    assert sum(tb[k] for k in TIME_TERMS) == pytest.approx(ev.time_per_iteration_s, rel=1e-12)
    assert all(tb[k] >= -1e-15 for k in TIME_TERMS)
    assert tb["communication"] == pytest.approx(sum(tb["communication_parts"].values()), rel=1e-12)
    if pp == 1:
        assert tb["bubble"] == 0.0
    mem = memory_breakdown(t, stage_of, strategy_of)
    for i, m in enumerate(mem):
        assert sum(m[k] for k in MEMORY_TERMS) == pytest.approx(ev.peak_memory_bytes[i], rel=1e-12)
        assert all(m[k] >= 0 for k in MEMORY_TERMS)
        # DDP/FSDP parameter bytes: what the stage's layers hold, from the graph
        expect = 0.0
        for u, (si, k) in enumerate(zip(stage_of, strategy_of)):
            if si == i:
                s = t.strategies[k]
                p = graph.layers[u].param_bytes / s.tp
                expect += p / s.dp if s.kind == "FSDP" else p
                expect += p if s.kind == "FSDP" and c > 1 else 0.0
        assert m["parameters"] == pytest.approx(expect, rel=1e-12)


def test_plan_stores_breakdown_and_dtype_and_show_rederives_the_same(graph, planned):
    """The planner keeps the breakdown and dtype in the plan; the cost model re-derives equal
    numbers."""
    assert planned.provenance["dtype"] == "float32"
    tb = planned.predicted["time_breakdown_s"]
    assert sum(tb[k] for k in TIME_TERMS) == pytest.approx(
        planned.predicted["time_per_iteration_s"], rel=1e-12
    )
    stored = plan_report(Plan.load(planned.to_yaml()))
    derived = plan_report(planned, CostModel(graph, load_cluster("cpu-4")))
    assert derived["time_breakdown_s"] == pytest.approx(stored["time_breakdown_s"], rel=1e-9)
    for a, b in zip(derived["stages"], stored["stages"]):
        assert a["memory_bytes"] == pytest.approx(b["memory_bytes"], rel=1e-9)
    assert all("time_s" in row for row in derived["layers"])
    assert len(stored["layers"]) == graph.num_layers


def test_explain_rows_are_the_planners_candidates(planned):
    """One row per (pp, schedule) searched; its TPI is the best of that group's solved rows,
    the winner's row is the plan, and pruned groups show a plan no better than the winner."""
    cands = planned.solver["candidates"]
    rows = planned.solver["best_per_pp"]
    assert {(r["pp"], r["schedule"]) for r in rows} == {(c["pp"], c["schedule"]) for c in cands}
    tpi = planned.predicted["time_per_iteration_s"]
    for r in rows:
        group = [c for c in cands if (c["pp"], c["schedule"]) == (r["pp"], r["schedule"])]
        solved = [c["time_per_iteration_s"] for c in group if c["time_per_iteration_s"] is not None]
        assert r["lower_bound_s"] == pytest.approx(min(c["lower_bound_s"] for c in group))
        if solved:
            assert r["time_per_iteration_s"] <= min(solved) * (1 + 1e-12)
        if (r["pp"], r["c"]) == (planned.pp_degree, planned.num_microbatches):
            assert r["time_per_iteration_s"] == pytest.approx(tpi, rel=1e-12)
        elif r["time_per_iteration_s"] is not None:
            assert r["time_per_iteration_s"] >= tpi * (1 - 1e-9)
            assert sum(r["time_breakdown_s"].values()) == pytest.approx(
                r["time_per_iteration_s"], rel=1e-9
            )
        assert r["binds"] or r["time_per_iteration_s"] is None
    text = render_explain(planned)
    for r in rows:
        assert re.search(rf"^\*?\s+{r['pp']}\s+{r['schedule']}\s", text, re.M), text
    assert "runner-up:" in text and "winner: pp=" in text


def test_explain_names_memory_when_it_binds(graph):
    """A cluster with just enough memory: explain says memory on a stage binds."""
    cm = CostModel(graph, load_cluster("cpu-4"))
    t = cm.tables(1, 1, 16)
    stage_of, strategy_of = heuristic(t)
    need = max(evaluate_assignment(t, stage_of, strategy_of).peak_memory_bytes)
    from uniap.explain import binding

    t.memory_limit_bytes = need * 1.01
    assert binding(t, stage_of, strategy_of)[0].startswith("memory on stage 0 (99% of the limit)")


def test_units_are_human():
    """ms/s/us and KiB/MiB/GiB with three significant digits, never an exponent."""
    assert (
        fmt_seconds(4.59) == "4.59 s"
        and fmt_seconds(0.0459) == "45.9 ms"
        and fmt_seconds(4.59e-5) == "45.9 us"
    )
    assert fmt_seconds(4590.0) == "76.5 min" and fmt_seconds(0) == "0 s"
    assert (
        fmt_bytes(3 * 2**30) == "3.00 GiB"
        and fmt_bytes(1536) == "1.50 KiB"
        and fmt_bytes(12) == "12 B"
    )


def test_render_plan_wraps_per_layer_group_and_lists_layers(planned):
    """One table row per run of layers with one strategy; --layers lists every layer; no
    exponents."""
    r = plan_report(planned)
    text = render_plan(r, layers=True)
    groups = sum(len(s["groups"]) for s in r["stages"])
    assert groups >= planned.pp_degree
    for s in r["stages"]:
        for g in s["groups"]:
            assert g["strategy"] in text
    for ls in planned.layer_strategies:
        assert re.search(rf"^\s+\d+\s+{re.escape(ls.fqn)}\s", text, re.M)
    assert not re.search(r"\de[+-]\d", text), text
    assert "precision: fp32" in text
    for term in ("compute", "exposed communication", "pipeline bubble", "optimizer step"):
        assert term in text
    for term in ("parameters", "gradients", "optimizer", "activations", "of limit"):
        assert term in text
    assert math.isfinite(r["time_per_iteration_s"])


def test_show_of_a_plan_without_breakdown_still_prints():
    """An older or hand-written plan file (no breakdown, no dtype) shows what it has."""
    from uniap.contract import LayerStrategy, Stage, Strategy

    p = Plan(
        "m",
        "sig",
        2,
        2,
        4,
        1,
        "1F1B",
        (
            Stage(
                (0, 1),
                (LayerStrategy("a", Strategy(2, 1)), LayerStrategy("b", Strategy(1, 2, "DDP"))),
            ),
        ),
        predicted={"time_per_iteration_s": "x", "peak_memory_bytes": [1e6]},
    )
    text = render_plan(plan_report(p))
    assert "not recorded" in text and "977 KiB" in text and "a .. b" not in text


def test_plot_draws_the_plans_devices_timeline_and_memory(planned, tmp_path):
    """`show --plot`: the file is written; one box per device, F and B per micro-batch per
    stage, one memory bar per term per stage, the limit line."""
    pytest.importorskip("matplotlib")
    from uniap.plot import plot_plan, timeline

    p = Plan.load(planned.to_yaml())
    pp, c = p.pp_degree, p.num_microbatches
    path = tmp_path / "plan.png"
    fig = plot_plan(p, path)
    assert path.stat().st_size > 10_000
    ax_dev, ax_mem, ax_tl = fig.axes
    devices = [x for x in ax_dev.patches if (x.get_label() or "").startswith("device ")]
    assert len(devices) == p.world_size
    fb = [x for x in ax_tl.patches if re.fullmatch(r"[FB]\d+", x.get_label() or "")]
    assert len(fb) == 2 * c * pp
    assert len(ax_mem.patches) == len(MEMORY_TERMS) * pp
    from uniap.report import plan_report

    peaks = [fmt_bytes(sum(st["memory_bytes"].values())) for st in plan_report(p)["stages"]]
    assert set(peaks) <= {x.get_text() for x in ax_mem.texts}  # each stage's total, written
    limit = p.predicted["memory_limit_bytes"] / 2**30
    assert any(abs(line.get_ydata()[0] - limit) < 1e-9 for line in ax_mem.lines)
    # the simulated 1F1B timeline: every stage runs each micro-batch's F before its B, and the
    # last stage's B starts right after its F
    st = [{"forward_s": 1.0, "backward_s": 2.0, "send_s": 0.0} for _ in range(3)]
    ops = timeline("1F1B", 4, st)
    for stage in ops:
        f = {m: a for k, m, a, _ in stage if k == "F"}
        b = {m: a for k, m, a, _ in stage if k == "B"}
        assert all(f[m] < b[m] for m in range(4))
    # 1F1B with equal stages: (c + pp - 1) * (f + b) + nothing else
    assert max(op[3] for s in ops for op in s) == pytest.approx((4 + 3 - 1) * 3.0)


def test_plot_pipelined_plan_counts(graph, tmp_path):
    """A pp=2, c=4 plan: 16 F/B boxes, 8 memory bars, 4 devices."""
    pytest.importorskip("matplotlib")
    from uniap.plot import plot_plan

    p = make_plan(
        graph, load_cluster("cpu-4"), global_batch_size=16, pp_degrees=[2], num_microbatches=[4]
    )
    fig = plot_plan(p, tmp_path / "pp2.png")
    ax_dev, ax_mem, ax_tl = fig.axes
    assert len([x for x in ax_dev.patches if (x.get_label() or "").startswith("device ")]) == 4
    assert (
        len([x for x in ax_tl.patches if re.fullmatch(r"[FB]\d+", x.get_label() or "")])
        == 2 * 4 * 2
    )
    assert len(ax_mem.patches) == 4 * 2
    assert (tmp_path / "pp2.png").exists()


def test_plot_without_matplotlib_says_how_to_install(planned, monkeypatch):
    """matplotlib is optional: without it, one clear error naming the extra."""
    import sys

    from uniap.errors import UniapError
    from uniap.plot import plot_plan

    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UniapError, match=r"pip install 'uniap\[plot\]'"):
        plot_plan(planned)


def test_long_strategies_keep_the_columns_aligned():
    """A strategy wider than the usual column (FSDP-offload with recompute, 26 characters):
    the header's time/mb and memory columns end where the first row's time and memory end,
    and no row ends in blanks; one device and one micro-batch are singular."""
    from uniap.contract import LayerStrategy, Stage, Strategy

    strategies = [Strategy(2, 1, "FSDP-offload", True), Strategy(2, 1, "FSDP")]
    p = Plan(
        "m",
        "sig",
        2,
        2,
        4,
        1,
        "1F1B",
        (Stage((0, 1), tuple(LayerStrategy(n, s) for n, s in zip("ab", strategies))),),
        predicted={"time_per_iteration_s": 1.0, "peak_memory_bytes": [1e6], "stage_time_s": [0.5]},
    )
    lines = render_plan(plan_report(p)).splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    row = lines[head + 2]
    assert "dp2 tp1 FSDP-offload +ckpt " in row, row
    assert row.endswith("977 KiB") and len(row) == len(lines[head]), (lines[head], row)
    assert all(line == line.rstrip() for line in lines)
    one = Plan(
        "m", "sig", 1, 1, 4, 1, "1F1B", (Stage((0,), (LayerStrategy("a", Strategy(1, 1)),)),)
    )
    assert "on 1 device " in render_plan(plan_report(one)).splitlines()[0] + " "
    assert "1 micro-batch of 4" in render_plan(plan_report(one))


def test_explain_says_nothing_fits_where_the_bound_is_infinite(planned):
    """A pipeline degree whose lower bound is infinite (no assignment fits its memory) is
    reported as not fitting, not as pruned by a bound that 'cannot beat the winner'."""
    rows = planned.solver["best_per_pp"]
    row = {"pp": 99, "schedule": "1F1B", "c": None, "time_per_iteration_s": None}
    row |= {"lower_bound_s": math.inf, "status": "pruned"}
    solver = {**planned.solver, "best_per_pp": [*rows, row]}
    text = render_explain(dataclasses.replace(planned, solver=solver))
    line = next(line for line in text.splitlines() if re.match(r"^\s+99\s", line))
    assert "nothing fits in memory (a lower bound on its memory is over the limit)" in line
    assert "inf" not in line and "cannot beat" not in line
