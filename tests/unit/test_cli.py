"""The command line's own logic: `python -m uniap`, model specs, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from uniap.cli import main
from uniap.errors import UniapError
from uniap.models import list_models, resolve_model


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
