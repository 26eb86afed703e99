"""Run every case of one world size in ONE spawned process group per session (this folder's
helpers are importable through pytest's ``pythonpath``, see pyproject.toml): the grid's cases
below and every module's own cases go to the group that ``harness.run_cases`` keeps per world
size, stopped after the last test of this folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop the kept process groups after this folder's last test (the tests that run next
    need neither their memory nor their processes)."""
    if nextitem is None or Path(nextitem.path).parent != Path(item.path).parent:
        from harness import close_groups

        close_groups()


def _run(world_size: int, cases: list[dict], tmp: Path) -> dict[str, Any]:
    from harness import run_cases

    for case in cases:
        if case.get("kind") == "checkpoint":
            case["dir"] = str(tmp / case["name"])
    return run_cases(world_size, "cases:run_case", cases)


@pytest.fixture(scope="session")
def results_w2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Results of every world-size-2 case (one spawn)."""
    from grid import w2_cases

    return _run(2, w2_cases(), tmp_path_factory.mktemp("w2"))


@pytest.fixture(scope="session")
def results_w4(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Results of every world-size-4 case (one spawn)."""
    from grid import w4_cases

    return _run(4, w4_cases(), tmp_path_factory.mktemp("w4"))
