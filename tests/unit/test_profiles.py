"""Measured profiles without a process group: fits, lookups, YAML, staleness, combining,
calibration against them, and the CLI's `plan --profile`."""

from __future__ import annotations

import dataclasses

import pytest

from uniap.calibration import Measurement, calibrate, prediction_errors
from uniap.cli import main
from uniap.cluster import load_cluster
from uniap.cost_model import CostModel
from uniap.errors import ConfigError
from uniap.graph import build_graph
from uniap.models import build_model, example_batch
from uniap.planner import plan_graph
from uniap.profiles import MeasuredProfile
from uniap.profiles.fits import CollectiveFit, fit_line, group_shape_key, interpolate
from uniap.profiles.measured import LayerProfile, library_versions

BATCHES = [1, 2, 4, 8, 16]


@pytest.fixture(scope="module")
def graph():
    """gpt-tiny's layer chain (meta trace)."""
    m = build_model("gpt-tiny")
    return build_graph(m, example_batch("gpt-tiny", 2, device="meta")[0], name="gpt-tiny")


def fake_profile(graph, world: int = 2, per_sample_s: float = 1e-4) -> MeasuredProfile:
    """A measured profile with made-up, exactly linear numbers for ``graph``."""
    layers = {}
    for layer in graph.layers:
        lp = layers.setdefault(layer.cost_key, LayerProfile(fqns=[], batches=list(BATCHES)))
        lp.fqns.append(layer.fqn)
        scale = 1 + layer.fwd_flops_per_sample / 1e6
        for tp in (1, 2) if layer.tp_enabled else (1,):
            lp.fwd_s[tp] = [1e-4 + per_sample_s * scale * b / tp for b in BATCHES]
            lp.bwd_s[tp] = [2e-4 + 2 * per_sample_s * scale * b / tp for b in BATCHES]
            lp.activation_bytes[tp] = [layer.saved_bytes_per_sample * b / tp for b in BATCHES]
    fit = CollectiveFit(1e-4, 1e9)
    key = group_shape_key(range(world), world)
    return MeasuredProfile(
        model={
            "name": graph.name,
            "signature": graph.signature,
            "dtype": graph.dtype,
            "sample_shape": list(graph.sample_shape),
            "layers": list(graph.fqns),
        },
        hardware={
            "device_type": "cpu",
            "device_name": "test",
            "world_size": world,
            "devices_per_node": world,
            "backend": "gloo",
            "threads_per_rank": 1,
        },
        versions=library_versions(),
        layers=layers,
        collectives={
            op: {key: fit} for op in ("all_reduce", "all_gather", "reduce_scatter", "p2p")
        },
        overlap_coefficient=0.3,
        optimizer_s_per_param=1e-9,
    )


def test_fit_line_recovers_a_line_and_reports_its_error() -> None:
    """fit_line returns intercept, slope and a zero residual on exact data."""
    a, slope, err = fit_line([1, 2, 4, 8], [0.5 + 0.25 * x for x in (1, 2, 4, 8)])
    assert (
        a == pytest.approx(0.5)
        and slope == pytest.approx(0.25)
        and err == pytest.approx(0, abs=1e-12)
    )
    assert fit_line([1, 2, 4], [1.0, 1.0, 3.0])[2] > 0.1


def test_interpolate_is_piecewise_linear_inside_and_the_fit_outside() -> None:
    """Between measured batches the line through the neighbours; beyond, the fitted line."""
    xs, ys = [1, 2, 4], [1.0, 5.0, 6.0]
    assert interpolate(3, xs, ys, (0, 1)) == pytest.approx(5.5)
    assert interpolate(8, xs, ys, (1.0, 0.5)) == pytest.approx(5.0)


def test_measured_profile_answers_from_its_numbers(graph) -> None:
    """layer_compute_s interpolates the measured times; collectives use the group's fit."""
    prof = fake_profile(graph)
    block = graph.layer("blocks.0")
    scale = 1 + block.fwd_flops_per_sample / 1e6
    fwd, bwd = prof.layer_compute_s(block, 3, 2)
    assert fwd == pytest.approx(1e-4 + 1e-4 * scale * 3 / 2)
    assert bwd == pytest.approx(2e-4 + 2e-4 * scale * 3 / 2)
    assert prof.collective_s("all_reduce", 1e6, [0, 1]) == pytest.approx(1e-4 + 1e-3)
    assert prof.collective_s("all_reduce", 1e6, [0]) == 0.0
    assert prof.activation_bytes(block, 4, 1) == pytest.approx(block.saved_bytes_per_sample * 4)


def test_loss_working_memory_at_an_unmeasured_tp_keeps_loss_parallels_temporary(graph) -> None:
    """A vocabulary-parallel head's loss measured at tp = 1 only: at tp = 2 its working memory
    is that plus one logits-shaped temporary (loss parallel's shifted logits), both halved,
    as the analytic profile charges; measured at tp = 2, the measurement."""
    head = graph.layers[-1]
    assert head.tp_vocab is not None and head.tp_vocab.kind == "head"
    profile = fake_profile(graph)
    lp = profile.layers[head.cost_key]
    lp.loss_working_bytes = [1000.0 * b for b in BATCHES]
    out = head.output_bytes_per_sample * 4
    assert profile.loss_working_bytes(head, 4, 1) == pytest.approx(4000.0)
    assert profile.loss_working_bytes(head, 4, 2) == pytest.approx((4000.0 + out) / 2)
    lp.loss_tp[2] = {"loss_working_bytes": [700.0 * b for b in BATCHES]}
    assert profile.loss_working_bytes(head, 4, 2) == pytest.approx(2800.0)


def test_yaml_round_trip_gives_identical_cost_tables(graph, tmp_path) -> None:
    """A profile saved and loaded predicts exactly the same TPI and memory."""
    prof = fake_profile(graph)
    path = tmp_path / "profile.yaml"
    prof.to_yaml(path)
    loaded = MeasuredProfile.load(path)
    cluster = load_cluster("cpu-2")
    a = plan_graph(graph, cluster, global_batch_size=8, profile=prof)
    b = plan_graph(graph, cluster, global_batch_size=8, profile=loaded)
    assert a.predicted == b.predicted
    assert b.provenance["profile"] == "measured"


def test_stale_profile_is_refused_naming_what_differs(graph) -> None:
    """Another model and another world size are both named in one ConfigError."""
    prof = fake_profile(graph)
    prof.model["signature"] = "0000000000000000"
    with pytest.raises(
        ConfigError, match=r"stale profile: model signature.*world size: profile 2, cluster 4"
    ):
        CostModel(graph, load_cluster("cpu-4"), prof)


def test_profile_for_another_torch_version_is_refused(graph) -> None:
    """A profile measured with another torch is stale."""
    prof = fake_profile(graph)
    prof.versions["torch"] = "1.0.0"
    with pytest.raises(ConfigError, match="torch version: profile 1.0.0"):
        CostModel(graph, load_cluster("cpu-2"), prof)


def test_not_a_profile_file_is_a_config_error(tmp_path) -> None:
    """Loading a plan or garbage as a profile says what it expected."""
    path = tmp_path / "x.yaml"
    path.write_text("a: 1\n")
    with pytest.raises(ConfigError, match="not a uniap measured profile"):
        MeasuredProfile.load(path)


def test_calibration_recovers_a_known_slowdown(graph) -> None:
    """Runs 1.5x slower in compute with a per-layer overhead: calibration cuts the error."""
    cluster = load_cluster("cpu-2")
    prof = fake_profile(graph)
    truth = prof.with_calibration(compute_scale=1.5, layer_overhead_s=2e-3)
    plans = [
        plan_graph(
            graph,
            cluster,
            global_batch_size=8,
            profile=prof,
            num_microbatches=[c],
            pp_degrees=[pp],
            schedules=["GPipe"],
        )
        for pp in (1, 2)
        for c in (1, 2, 4)
    ]
    cm_true = CostModel(graph, cluster, truth)
    ms = [Measurement(p, cm_true.evaluate(p).time_per_iteration_s) for p in plans]
    before = max(abs(e) for e in prediction_errors(prof, ms, graph=graph, cluster=cluster))
    cal = calibrate(prof, ms, graph=graph, cluster=cluster)
    after = max(abs(e) for e in prediction_errors(cal, ms, graph=graph, cluster=cluster))
    assert before > 0.2 and after < 0.02
    assert cal.calibration["compute_scale"] == pytest.approx(1.5, rel=0.05)


def test_cli_plan_with_profile_records_measured_and_refuses_stale(graph, tmp_path, capsys) -> None:
    """`uniap plan --profile` plans from the file; a stale one exits 2 with one line."""
    path = tmp_path / "p.yaml"
    fake_profile(graph).to_yaml(path)
    out = tmp_path / "plan.yaml"
    rc = main(
        [
            "plan",
            "--model",
            "gpt-tiny",
            "--cluster",
            "cpu-2",
            "--global-batch-size",
            "8",
            "--profile",
            str(path),
            "--out",
            str(out),
            "-q",
        ]
    )
    assert rc == 0 and "profile: measured" in out.read_text()
    stale = dataclasses.replace(fake_profile(graph), model={"signature": "x"})
    stale.to_yaml(path)
    rc = main(
        [
            "plan",
            "--model",
            "gpt-tiny",
            "--cluster",
            "cpu-2",
            "--global-batch-size",
            "8",
            "--profile",
            str(path),
            "-q",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "stale profile: model signature" in err[0]


def test_mutated_profile_files_give_config_errors_only(graph, tmp_path) -> None:
    """Random mutations of a real profile file either load or raise ConfigError (no traceback)."""
    import random

    import yaml
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from uniap.errors import UniapError

    base = yaml.safe_load(fake_profile(graph).to_yaml())
    paths: list[list] = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + [k])
        elif isinstance(node, list):
            for i, v in enumerate(node[:3]):
                walk(v, path + [i])

    walk(base, [])
    junk = st.one_of(
        st.none(),
        st.integers(-5, 5),
        st.floats(allow_nan=True),
        st.text(max_size=5),
        st.lists(st.integers(), max_size=2),
        st.just({"x": 1}),
    )

    @settings(
        max_examples=120,
        derandomize=True,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(idx=st.integers(0, len(paths) - 1), value=junk, delete=st.booleans())
    def check(idx, value, delete):
        doc = yaml.safe_load(yaml.safe_dump(base))
        path = paths[idx]
        if not path:
            doc = value
        else:
            parent = doc
            for p in path[:-1]:
                parent = parent[p]
            if delete and isinstance(parent, dict):
                parent.pop(path[-1])
            else:
                parent[path[-1]] = value
        f = tmp_path / f"p{random.random()}.yaml"
        f.write_text(yaml.safe_dump(doc))
        try:
            MeasuredProfile.load(f)
        except UniapError as e:
            assert str(f) in str(e) or "profile" in str(e)

    check()


def test_combined_profile_is_the_median_of_every_measurement(graph) -> None:
    """Profiles of one model taken at three machine speeds combine into the middle one's
    numbers; profiles of different models are refused."""
    speeds = (1e-4, 4e-4, 2e-4)
    parts = [fake_profile(graph, per_sample_s=s) for s in speeds]
    for p, s in zip(parts, speeds):
        p.overlap_coefficient = s * 1e3
        p.collectives["p2p"] = {
            k: CollectiveFit(s, 1e9, 0.0, [4096, 8192], [s, 2 * s]) for k in p.collectives["p2p"]
        }
    combined = MeasuredProfile.combine(parts)
    middle = parts[2]
    block = graph.layer("blocks.0")
    assert combined.layer_compute_s(block, 3, 2) == pytest.approx(
        middle.layer_compute_s(block, 3, 2)
    )
    assert combined.overlap_coefficient == pytest.approx(0.2)
    assert combined.collective_s("p2p", 6144, [0, 1]) == pytest.approx(1.5 * 2e-4)
    assert combined.settings["combined_from"] == 3
    other = fake_profile(graph)
    other.model = {**other.model, "signature": "0" * 16}
    with pytest.raises(ConfigError, match="cannot combine profiles with different model"):
        MeasuredProfile.combine([parts[0], other])


def test_profile_summary_marks_noise_and_clamped_negative_rates(graph) -> None:
    """`uniap profile` output: a fit error above the threshold is marked [noise], a negative
    fitted rate [negative, clamped], each with one line saying what the planner does with it;
    a clean profile has no marks."""
    from uniap.profiles.marks import NOISE_FIT_ERROR, measured_rate, overlap_line

    clean = fake_profile(graph).summary()
    assert "[noise]" not in clean and "clamped" not in clean
    p = fake_profile(graph)
    lp = next(iter(p.layers.values()))
    lp.fwd_s[1] = [5e-4, 3e-4, 4e-4, 2e-4, 1e-4]  # noisy and falling: a negative fitted rate
    text = p.summary()
    row = next(line for line in text.splitlines() if line.strip().startswith(lp.fqns[0]))
    assert "[negative, clamped]" in row and "[noise]" in row
    assert "the fit only beyond the largest" in text and "never used below zero" in text
    marks: set[str] = set()
    assert (
        measured_rate("fwd", 1.23e-4, 0.05, marks) == "fwd 123 us/sample (fit err 5%)" and not marks
    )
    assert measured_rate("bwd", 2e-3, NOISE_FIT_ERROR + 0.24, marks).endswith(
        "(fit err 44%) [noise]"
    )
    assert marks == {"noise"}
    assert overlap_line(0.0, -8.99) == (
        "overlap coefficient 0.00 (measured -8.99, outside [0, 1]: noise, clamped to 0.00; the "
        "planner assumes no overlap: the whole gradient sync is exposed)"
    )
    assert overlap_line(0.42, 0.42) == "overlap coefficient 0.42"
