"""Bad input gets a clear error, nothing else: random and mutated cluster YAML, plan files and
CLI arguments either work or raise uniap's own error (a ValueError subclass) naming the file;
the CLI exits with 0, or with 2 and one ``error:`` line, never a traceback.

Hypothesis runs derandomized with bounded example counts (the file runs in well under a
minute). Escapes found earlier are kept as regular cases at the end:
they must exit 2 with one line.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uniap.cli import main as cli_main
from uniap.cluster import load_cluster
from uniap.contract import LayerStrategy, Plan, Stage, Strategy
from uniap.errors import UniapError

FUZZ = settings(
    derandomize=True,
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    database=None,
)
PRESET = Path(__file__).resolve().parents[2] / "uniap" / "clusters" / "cpu-4.yaml"
_TMP = Path(tempfile.mkdtemp(prefix="uniap-fuzz-"))


def _base_plan() -> Plan:
    fqns = ["embed", "blocks.0", "blocks.1", "head"]
    return Plan(
        model_name="toy",
        model_signature="abc123",
        num_layers=4,
        world_size=4,
        global_batch_size=8,
        num_microbatches=2,
        schedule="1F1B",
        stages=(
            Stage((0, 1), tuple(LayerStrategy(f, Strategy(2, 1, "FSDP")) for f in fqns[:2])),
            Stage(
                (2, 3),
                (
                    LayerStrategy(fqns[2], Strategy(1, 2, "DDP")),
                    LayerStrategy(fqns[3], Strategy(2, 1)),
                ),
            ),
        ),
        predicted={"time_per_iteration_s": 0.1, "peak_memory_bytes": [1e6, 2e6]},
    )


# ------------------------------------------------------------------------ mutations
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["40 GiB", "1 GB/s", "5 us", "0 B", "-1 GiB", "1e400 B", "nan", "DDP", "FSDP",
                     "GPipe", "1F1B", "float32", "fp8", "cuda", "tpu", "gloo", ""]),
)  # fmt: skip
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a nested dict/list, the root included."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def _mutated(draw: st.DrawFn, base: dict, rounds: int = 3) -> Any:
    """``base`` with 1..rounds random edits: replace a node, delete a key or an item, add a key."""
    data: Any = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, rounds))):
        path = draw(st.sampled_from(_paths(data)))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            if action == "replace":
                data = draw(_VALUES)
            continue
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        leaf = path[-1]
        if action == "replace":
            parent[leaf] = draw(_VALUES)
        elif action == "delete":
            del parent[leaf]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(_VALUES)
        else:
            parent.append(draw(_VALUES))
    return data


@st.composite
def _text_edits(draw: st.DrawFn, text: str) -> str:
    """``text`` with a few random character-level insertions, deletions and replacements."""
    chars = list(text)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(chars)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        c = draw(st.sampled_from(list(":-{}[]#'\"\t\n ,&*!|>%@`") + ["x", "0", "9", "é"]))
        if op == "insert" or i == len(chars):
            chars.insert(i, c)
        elif op == "delete":
            del chars[i]
        else:
            chars[i] = c
    return "".join(chars)


def _write(name: str, content: Any) -> Path:
    path = _TMP / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        try:
            text = yaml.safe_dump(content, sort_keys=False, allow_unicode=True)
        except (yaml.YAMLError, ValueError, OverflowError):
            text = repr(content)
        path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------ cluster YAML
_PRESET_DATA = yaml.safe_load(PRESET.read_text())


def _load_cluster_or_error(path: Path) -> None:
    try:
        cluster = load_cluster(path)
    except UniapError as e:
        assert str(path) in str(e), f"the error does not name the file: {e}"
        return
    assert cluster.world_size >= 1 and cluster.device_memory_bytes > 0


@FUZZ
@given(_mutated(_PRESET_DATA))
def test_mutated_cluster_yaml_loads_or_names_the_file(data: Any) -> None:
    """A cluster file with random fields replaced, deleted or added: a Cluster or ConfigError."""
    _load_cluster_or_error(_write("cluster.yaml", data))


@FUZZ
@given(_text_edits(PRESET.read_text()))
def test_cluster_yaml_with_typos_loads_or_names_the_file(text: str) -> None:
    """A cluster file with random character edits (broken YAML included) never escapes."""
    _load_cluster_or_error(_write("cluster-typo.yaml", text))


# ------------------------------------------------------------------------ plan files
_PLAN = _base_plan()
_PLAN_DATA = _PLAN.to_dict()


def _load_plan_or_error(path: Path) -> None:
    try:
        plan = Plan.load(path)
    except UniapError as e:
        assert str(path) in str(e), f"the error does not name the file: {e}"
        return
    assert Plan.from_dict(plan.to_dict()).to_yaml() == plan.to_yaml()  # what loads, round-trips


@FUZZ
@given(_mutated(_PLAN_DATA))
def test_mutated_plan_file_loads_or_names_the_file(data: Any) -> None:
    """A plan file with random fields replaced, deleted or added: a valid Plan or ConfigError."""
    _load_plan_or_error(_write("plan.yaml", data))


@FUZZ
@given(_text_edits(_PLAN.to_yaml()))
def test_plan_file_with_typos_loads_or_names_the_file(text: str) -> None:
    """A plan file with random character edits never escapes."""
    _load_plan_or_error(_write("plan-typo.yaml", text))


# ------------------------------------------------------------------------ CLI arguments
def _run_cli(argv: list[str]) -> tuple[int, str]:
    """``uniap.cli.main(argv)`` in this process: (exit code, stderr)."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = cli_main(argv)
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 2
    return code, err.getvalue()


def _assert_clean(argv: list[str], code: int, stderr: str) -> None:
    assert code in (0, 2), f"uniap {argv}: exit code {code}: {stderr}"
    assert "Traceback" not in stderr, f"uniap {argv}: {stderr}"
    if code == 2:
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("uniap") and ": error: " in last, f"uniap {argv}: {stderr!r}"


_OK_PLAN = _write("ok-plan.yaml", _PLAN_DATA)
_BAD_FILE = _write("bad.yaml", "a: [1, 2\n")
_CLUSTER_FILE = _write("ok-cluster.yaml", _PRESET_DATA)

_ARG_VALUES = st.one_of(
    st.sampled_from(["gpt-tiny", "bert-tiny", "vit-tiny", "no-such-model", "cpu-2", "cpu-4", "h100",
                     "0", "-1", "8", "16", "1e3", "abc", "", "GPipe", "1F1B", "float32", "bfloat16",
                     "float64", "nosuch:fn", "uniap.models:list_models", str(_OK_PLAN),
                     str(_BAD_FILE), str(_CLUSTER_FILE), str(_TMP / "missing.yaml")]),
    st.integers(-5, 64).map(str),
    st.text(alphabet="abc-_:./019 ", max_size=8),
)  # fmt: skip
_FLAGS = ["--model", "--cluster", "--global-batch-size", "--dtype", "--schedule", "--time-limit-s",
          "--profile", "--global-batch-size", "-q", "-v", "--help-me", "--out"]  # fmt: skip


_WELL_FORMED = {"--model": "gpt-tiny", "--cluster": "cpu-2", "--global-batch-size": "8",
                "--time-limit-s": "5"}  # fmt: skip


@st.composite
def _argv(draw: st.DrawFn) -> list[str]:
    cmd = draw(st.sampled_from(["plan"] * 6 + ["show", "show", "models", "clusters", "nosuch"]))
    argv = [cmd]
    if cmd == "show":
        return [cmd, draw(_ARG_VALUES)]
    if cmd == "plan" and draw(st.integers(0, 3)) < 3:  # mostly: well-formed but for one or two
        opts = dict(_WELL_FORMED)
        for flag in draw(st.lists(st.sampled_from(_FLAGS[:8]), min_size=1, max_size=2)):
            opts[flag] = draw(_ARG_VALUES)
        if draw(st.booleans()):
            opts["--out"] = str(_TMP / draw(st.sampled_from(["p.yaml", "p.json", "p.txt"])))
        return [cmd, "-q", *(x for kv in opts.items() for x in kv)]
    for _ in range(draw(st.integers(0, 3))):
        flag = draw(st.sampled_from(_FLAGS))
        if flag == "--out":  # never write outside the scratch folder
            argv += [flag, str(_TMP / draw(st.sampled_from(["p.yaml", "p.json", "p.txt"])))]
        elif flag in ("-q", "-v", "--help-me"):
            argv.append(flag)
        else:
            argv += [flag, draw(_ARG_VALUES)]
    return argv


@settings(FUZZ, max_examples=40)
@given(_argv())
def test_random_cli_arguments_exit_0_or_2_with_one_error_line(argv: list[str]) -> None:
    """uniap with random arguments exits 0, or 2 with an ``error:`` line; no traceback."""
    code, stderr = _run_cli(argv)
    _assert_clean(argv, code, stderr)


@settings(FUZZ, max_examples=25)
@given(_mutated(_PLAN_DATA))
def test_uniap_show_on_mutated_plan_exits_0_or_2(data: Any) -> None:
    """``uniap show`` on a mutated plan file: 0, or 2 with one line naming the file."""
    path = _write("show.yaml", data)
    code, stderr = _run_cli(["show", str(path)])
    _assert_clean(["show", str(path)], code, stderr)
    if code == 2:
        assert stderr.count("\n") == 1 and str(path) in stderr, stderr


@settings(FUZZ, max_examples=15)
@given(_mutated(_PRESET_DATA, rounds=2))
def test_uniap_plan_on_mutated_cluster_exits_0_or_2(data: Any) -> None:
    """``uniap plan --cluster`` a mutated cluster file: 0, or 2 with one line naming the file."""
    path = _write("plan-cluster.yaml", data)
    argv = ["plan", "--model", "gpt-tiny", "--cluster", str(path), "--global-batch-size", "8",
            "-q", "--time-limit-s", "5"]  # fmt: skip
    code, stderr = _run_cli(argv)
    _assert_clean(argv, code, stderr)
    if code == 2:
        assert stderr.count("\n") == 1 and str(path) in stderr, stderr


def test_cli_subprocess_bad_plan_file_one_line_exit_2() -> None:
    """``python -m uniap.cli show broken.yaml``: exit 2, exactly one stderr line, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "uniap.cli", "show", str(_BAD_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"uniap: error: {_BAD_FILE}: not valid YAML/JSON at line 2")


# ------------------------------------------------- escapes found by this file (reported)
_BINARY = _TMP / "binary.yaml"
_BINARY.write_bytes(b"\xff\xfe\x00garbage")
_KNOWN_ESCAPES = [
    pytest.param(["show", str(_TMP)], id="show-a-directory"),
    pytest.param(["show", str(_BINARY)], id="show-a-binary-file"),
    pytest.param(
        ["plan", "--model", "gpt-tiny", "--cluster", str(_BINARY), "--global-batch-size", "8"],
        id="cluster-binary-file",
    ),
    pytest.param(
        [
            "plan",
            "--model",
            "gpt-tiny",
            "--cluster",
            "cpu-2",
            "--global-batch-size",
            "8",
            "-q",
            "--out",
            str(_TMP / "no-such-dir" / "p.yaml"),
        ],
        id="out-in-missing-directory",
    ),  # fmt: skip
    pytest.param(
        [
            "plan",
            "--model",
            "gpt-tiny",
            "--cluster",
            "cpu-2",
            "--global-batch-size",
            "8",
            "--dtype",
            "int8",
        ],
        id="dtype-int8",
    ),  # fmt: skip
    pytest.param(
        ["plan", "--model", "json:loads", "--cluster", "cpu-2", "--global-batch-size", "8"],
        id="model-function-needs-arguments",
    ),
    pytest.param(
        ["plan", "--model", ":x", "--cluster", "cpu-2", "--global-batch-size", "8"],
        id="model-empty-module-name",
    ),
    pytest.param(
        ["plan", "--model", ".:x", "--cluster", "cpu-2", "--global-batch-size", "8"],
        id="model-relative-module-name",
    ),
    pytest.param(
        [
            "plan",
            "--model",
            "gpt-tiny",
            "--cluster",
            "cpu-2",
            "--global-batch-size",
            "8",
            "--time-limit-s",
            "-1",
        ],
        id="negative-time-limit-accepted",
    ),  # fmt: skip
    pytest.param(["plan", "--global-batch-size", "abc"], id="argparse-error-prints-usage-too"),
]


@pytest.mark.parametrize("argv", _KNOWN_ESCAPES)
def test_known_escape_exits_2_with_one_line(argv: list[str]) -> None:
    """Reported reproducers: each must exit 2 with exactly one ``uniap: error:`` line."""
    code, stderr = _run_cli(argv)
    assert code == 2 and "Traceback" not in stderr, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("uniap"), stderr
