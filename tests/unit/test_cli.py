"""The command line: help text, plan/show/explain output, progress, model specs, one-line errors,
`python -m uniap`."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import subprocess
import sys

import pytest

from uniap.cli import _parser, main
from uniap.contract import Plan
from uniap.errors import UniapError
from uniap.models import list_models, resolve_model

COMMANDS = ("plan", "explain", "show", "profile", "models", "clusters", "demo")
PLAN_ARGS = ["--model", "gpt-tiny", "--cluster", "cpu-4", "--global-batch-size", "16"]


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    ap = _parser()
    action = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_a_description_two_examples_and_help_on_every_option(cmd):
    """`uniap CMD --help`: a description, two examples, and help text for every option."""
    sp = _subparsers()[cmd]
    assert sp.description and len(sp.description) > 30
    examples = sp.epilog.split("examples:\n", 1)[1].strip().splitlines()
    assert len(examples) >= 2 and all(e.strip().startswith(("uniap", "torchrun")) for e in examples)
    for a in sp._actions:
        assert a.help, f"uniap {cmd} {a.option_strings}: no help text"
        if (
            a.option_strings
            and a.default not in (None, False, argparse.SUPPRESS)
            and a.dest != "help"
        ):
            assert "default" in a.help, (
                f"uniap {cmd} {a.option_strings}: default {a.default!r} not stated"
            )
    code, out, _ = _run([cmd, "--help"])
    assert code == 0 and "examples:" in out


def test_plan_help_explains_batch_and_schedule():
    """The options new users ask about say what they mean and their defaults."""
    code, out, _ = _run(["plan", "--help"])
    text = " ".join(out.split())
    assert "samples per iteration over all data-parallel replicas" in text
    assert "(default: 1F1B" in text and "(default: 60)" in text


@pytest.fixture(scope="module")
def plan_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "plan.yaml"
    code, out, err = _run(
        ["plan", *PLAN_ARGS, "--out", str(path), "--explain", "--progress-interval-s", "0"]
    )
    assert code == 0, err
    return path, out, err


def test_plan_prints_precision_human_units_and_breakdown(plan_run):
    """`uniap plan` names the dtype, uses ms/MiB (never 4.59e+03 ms) and splits time and memory."""
    _, out, _ = plan_run
    assert "precision: fp32 (compute float32, gradient reduction float32, master float32)" in out
    assert not re.search(r"\de[+-]\d", out), out
    assert re.search(r"predicted: [\d.]+ ms per iteration", out)
    assert "exposed communication" in out and "activations" in out


def test_progress_lines_during_a_solve_and_quiet(plan_run):
    """With a short interval the solve reports candidate, incumbent, bound and gap; -q silences."""
    _, _, err = plan_run
    lines = [x for x in err.splitlines() if "solving for" in x]
    assert lines, err
    assert all(
        re.match(
            r"\[\d+/\d+\] pp=\d+ c=\d+ (1F1B|GPipe): solving for \d+ s, incumbent .+, bound .+, "
            r"gap .+",
            x,
        )
        for x in lines
    ), lines
    code, _, err = _run(["plan", *PLAN_ARGS, "-q", "--progress-interval-s", "0"])
    assert code == 0 and err == ""
    # the default interval: a solve this short prints only its result line
    code, _, err = _run(["plan", *PLAN_ARGS])
    assert code == 0 and "solving for" not in err
    assert re.search(r"^searching \d+ candidates", err, re.M)
    assert re.search(r"^\[1/\d+\] pp=\d+ c=\d+ 1F1B: optimal [\d.]+ ms per iteration", err, re.M), (
        err
    )


def test_progress_through_logging_in_python(caplog):
    """uniap.plan(..., progress=True) logs the progress lines on the `uniap.progress` logger."""
    import logging

    from uniap import plan

    with caplog.at_level(logging.INFO, logger="uniap.progress"):
        plan("gpt-tiny", "cpu-4", global_batch_size=16, progress=True, progress_interval_s=0.0)
    msgs = [r.getMessage() for r in caplog.records if r.name == "uniap.progress"]
    assert any("solving for" in m and "incumbent" in m for m in msgs), msgs
    assert any(re.search(r"optimal [\d.]+ ms per iteration", m) for m in msgs), msgs


def test_explain_rows_equal_the_planners_candidates(plan_run):
    """`uniap explain plan.yaml` lists every (pp, schedule) the planner searched, with its TPI."""
    from uniap.report import fmt_seconds

    path, out, _ = plan_run
    code, text, err = _run(["explain", str(path)])
    assert code == 0, err
    p = Plan.load(path)
    for r in p.solver["best_per_pp"]:
        t = (
            fmt_seconds(r["time_per_iteration_s"])
            if r["time_per_iteration_s"] is not None
            else ">="
        )
        assert re.search(
            rf"^\*?\s+{r['pp']}\s+{r['schedule']}\s+\S+\s+{re.escape(t)}", text, re.M
        ), text
    assert {(c["pp"], c["schedule"]) for c in p.solver["candidates"]} == {
        (r["pp"], r["schedule"]) for r in p.solver["best_per_pp"]
    }
    assert "Why this plan" in out  # plan --explain printed the same
    code, _, err = _run(["explain"])
    assert code == 2 and "give a plan file, or --model" in err


def test_show_json_and_layers(plan_run):
    """`show --json` is the report as JSON; `show --layers` lists each layer."""
    path, _, _ = plan_run
    code, out, _ = _run(["show", str(path), "--json"])
    r = json.loads(out)
    p = Plan.load(path)
    assert (
        code == 0
        and r["pp"] == p.pp_degree
        and len(r["layers"]) == p.num_layers
        and r["dtype"] == "float32"
    )
    code, out, _ = _run(
        ["show", str(path), "--layers", "--model", "gpt-tiny", "--cluster", "cpu-4"]
    )
    assert code == 0
    for ls in p.layer_strategies:
        assert re.search(rf"^\s+\d+\s+{re.escape(ls.fqn)}\s+\d+\s+dp\d", out, re.M)


def test_model_module_function_imports_from_the_current_directory(tmp_path, monkeypatch):
    """--model mymodels:build finds mymodels.py in the current directory, as `python -m` does."""
    (tmp_path / "mymodels_cli_test.py").write_text(
        "from uniap import models\n"
        "def build():\n    m = models.build_model('gpt-tiny', device='meta')\n"
        "    return m, models.example_batch(m, 2, device='meta')[0]\n"
    )
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(
        [
            "plan",
            "--model",
            "mymodels_cli_test:build",
            "--cluster",
            "cpu-2",
            "--global-batch-size",
            "8",
            "-q",
        ]
    )
    assert code == 0, err
    code, _, err = _run(
        [
            "plan",
            "--model",
            "nosuchmodule_xyz:build",
            "--cluster",
            "cpu-2",
            "--global-batch-size",
            "8",
            "-q",
        ]
    )
    assert code == 2 and "current directory" in err and err.count("\n") == 1


def test_show_plot_writes_the_picture(plan_run, tmp_path):
    """`uniap show plan.yaml --plot plan.png` writes the picture and says where."""
    pytest.importorskip("matplotlib")
    path, _, _ = plan_run
    png = tmp_path / "plan.png"
    code, out, err = _run(["show", str(path), "--plot", str(png)])
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"picture written to {png}" in out


@pytest.mark.parametrize("extra", [["--sequence-parallel"], ["--precision", "bf16-mixed"]])
def test_show_rederives_what_the_planner_predicted(tmp_path, extra):
    """`show --model --cluster` prices a plan as the planner did: sequence-parallel layers (it
    refused them as not offered) and a bf16-mixed plan give the plan file's own predictions."""
    path = tmp_path / "plan.yaml"
    args = ["plan", "--model", "llama-7b", "--cluster", "a100-1x8", "--global-batch-size", "16"]
    code, _, err = _run([*args, *extra, "--out", str(path), "-q"])
    assert code == 0, err
    p = Plan.load(path)
    assert any(ls.sp for ls in p.layer_strategies) == (extra == ["--sequence-parallel"])
    code, out, err = _run(
        ["show", str(path), "--json", "--model", "llama-7b", "--cluster", "a100-1x8"]
    )
    assert code == 0, err
    r = json.loads(out)
    assert r["source"] == "cost model"
    assert r["time_per_iteration_s"] == pytest.approx(p.predicted["time_per_iteration_s"], rel=1e-9)
    assert [st["peak_memory_bytes"] for st in r["stages"]] == pytest.approx(
        p.predicted["peak_memory_bytes"]
    )


def test_show_rederiving_with_another_model_is_refused(plan_run):
    """`show --model` re-derives from the cost model only for the plan's own model."""
    path, _, _ = plan_run
    code, _, err = _run(["show", str(path), "--model", "llama-tiny", "--cluster", "cpu-4"])
    assert code == 2 and "the plan does not match: model signature" in err and err.count("\n") == 1


def test_show_html_is_one_page_with_picture_report_and_explain(plan_run, tmp_path):
    """`uniap show plan.yaml --html plan.html`: the picture inline, the report and why it won."""
    pytest.importorskip("matplotlib")
    path, _, _ = plan_run
    page = tmp_path / "plan.html"
    code, out, err = _run(["show", str(path), "--html", str(page)])
    assert code == 0, err
    text = page.read_text()
    assert "src='data:image/png;base64," in text and "precision: fp32" in text
    assert "Why this plan" in text and "runner-up:" in text and f"page written to {page}" in out


def test_python_dash_m_uniap_runs_the_cli() -> None:
    """`python -m uniap models` prints the presets and exits 0."""
    p = subprocess.run(
        [sys.executable, "-m", "uniap", "models"], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == list_models()


def test_resolve_model_preset_function_and_errors() -> None:
    """A preset resolves to its name; module:function to (model, inputs); bad specs name the fix."""
    assert resolve_model("gpt-tiny") == ("gpt-tiny", None)
    with pytest.raises(
        UniapError, match=r"unknown model 'nope'; presets: .*or give module:function"
    ):
        resolve_model("nope")
    with pytest.raises(UniapError, match=r"expected module:function, e.g. mypkg.models:build"):
        resolve_model(":build")
    with pytest.raises(UniapError, match=r"'uniap.models' has no callable 'missing'"):
        resolve_model("uniap.models:missing")


def test_unknown_schedule_is_refused_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    """--schedule takes the names of uniap.schedules only."""
    with pytest.raises(SystemExit) as e:
        main(
            [
                "plan",
                "--model",
                "gpt-tiny",
                "--cluster",
                "cpu-2",
                "--global-batch-size",
                "8",
                "--schedule",
                "x",
            ]
        )
    assert e.value.code == 2
    assert "argument --schedule: invalid choice: 'x'" in capsys.readouterr().err


def test_kinds_offers_only_those_and_the_plan_shows_them(tmp_path) -> None:
    """--kinds ZeRO2: every data-parallel layer is ZeRO2 in the printed table and the plan file,
    and `uniap show` prints it back; an unknown kind is one error naming the known ones."""
    out_file = tmp_path / "p.yaml"
    code, out, _ = _run(["plan", *PLAN_ARGS, "--kinds", "ZeRO2", "--out", str(out_file)])
    assert code == 0 and "dp4 tp1 ZeRO2" in out
    assert {ls.kind for ls in Plan.load(out_file).layer_strategies} == {"ZeRO2"}
    code, out, _ = _run(["show", str(out_file)])
    assert code == 0 and "dp4 tp1 ZeRO2" in out
    code, _, err = _run(["plan", *PLAN_ARGS, "--kinds", "ZeRO3"])
    assert code != 0
    assert (
        "kinds ['ZeRO3']: choose one or more of ['DDP', 'FSDP', 'ZeRO2', 'HSDP', 'FSDP-offload']"
        in err
    )


def test_no_vocab_parallel_reaches_the_planner(monkeypatch) -> None:
    """--no-vocab-parallel plans with ``vocab_parallel=False`` (the planner's test:
    tests/unit/test_head_layout.py); without it, True."""
    import uniap.planner

    seen = []

    def fake_plan(*args, **kwargs):
        seen.append(kwargs["vocab_parallel"])
        raise UniapError("stop here")

    monkeypatch.setattr(uniap.planner, "plan", fake_plan)
    assert _run(["plan", *PLAN_ARGS, "--no-vocab-parallel"])[0] != 0
    assert _run(["plan", *PLAN_ARGS])[0] != 0
    assert seen == [False, True]
