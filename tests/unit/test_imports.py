"""The import graph of ``uniap/`` (read with ``ast``, imports inside functions included): no
cycles, and nothing on the planner side reaches ``torch.distributed``, the executor or the
measuring code, directly or through another module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "uniap"

RUNTIME_SIDE = (
    "uniap.__main__",
    "uniap._dist",
    "uniap.api",
    "uniap.checkpoint",
    "uniap.cli",
    "uniap.executor",
    "uniap.models",
    "uniap.pretrained",
    "uniap.profiler",
    "uniap.training_log",
)
"""Modules that run on launched ranks (or launch them) and the model zoo. Every other module of
``uniap/`` is the planner side: cluster, graph, profile data, cost model, solver, planner,
strategies, the Plan contract, schedules, calibration, and the helpers they use."""

FORBIDDEN = ("torch.distributed", "uniap.executor", "uniap.profiler")
"""What the planner side must not import: it plans without process groups or GPUs."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class _Imports(ast.NodeVisitor):
    """Every module an import statement names; ``if TYPE_CHECKING:`` blocks are skipped (they
    never run)."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.names: set[str] = set()

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.names.update(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            anchor = self.package.split(".")
            anchor = anchor[: len(anchor) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            # `from a import b` imports the module a.b when there is one, else a name of a
            full = f"{base}.{alias.name}"
            self.names.add(full if full in MODULES or not base.startswith("uniap") else base)


def _imports() -> dict[str, set[str]]:
    out = {}
    for name, path in MODULES.items():
        visitor = _Imports(name, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        out[name] = visitor.names
    return out


IMPORTS = _imports()
INTERNAL = {m: sorted(n for n in names if n in MODULES) for m, names in IMPORTS.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in INTERNAL[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in INTERNAL[v]:
                found.append(sorted(comp))

    for v in sorted(INTERNAL):
        if v not in index:
            visit(v)
    return found


def _path(start: str, goal_prefixes: tuple[str, ...]) -> list[str] | None:
    """Shortest import chain from ``start`` to a module named in ``goal_prefixes``."""
    parent: dict[str, str | None] = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for name in sorted(IMPORTS[v]):
            if _under(name, goal_prefixes):
                chain = [name, v]
                while parent[chain[-1]] is not None:
                    chain.append(parent[chain[-1]])
                return chain[::-1]
        for w in INTERNAL[v]:
            if w not in parent:
                parent[w] = v
                queue.append(w)
    return None


PLANNER_SIDE = sorted(m for m in MODULES if m != "uniap" and not _under(m, RUNTIME_SIDE))


def test_the_graph_is_read() -> None:
    """The walk sees the package: the planner, the executor and their known imports."""
    assert {"uniap.planner", "uniap.cost_model", "uniap.contract", "uniap.executor.mesh"} <= set(
        MODULES
    )
    assert "uniap.contract" in INTERNAL["uniap.executor.mesh"]
    assert "torch.distributed" in IMPORTS["uniap.executor.mesh"]
    assert {"uniap.cluster", "uniap.graph", "uniap.planner", "uniap.profiles.measured"} <= set(
        PLANNER_SIDE
    )


def test_no_import_cycles() -> None:
    """No module of uniap/ imports itself through others, at module level or in a function."""
    assert _cycles() == []


@pytest.mark.parametrize("module", PLANNER_SIDE)
def test_planner_side_does_not_reach_distributed_executor_or_measuring(module: str) -> None:
    """Planning imports without torch.distributed, the executor or the measuring package,
    through any chain of imports."""
    assert _path(module, FORBIDDEN) is None, " -> ".join(_path(module, FORBIDDEN) or [])


@pytest.mark.parametrize(
    ("side", "forbidden"),
    [
        # the executor reads the Plan and the model, never the planner's own modules
        (
            "uniap.executor",
            ("uniap.strategies", "uniap.cost_model", "uniap.planner", "uniap.milp", "uniap.search"),
        ),
        # model code and its adapters do not depend on how they are run
        ("uniap.models", ("uniap.executor", "uniap.profiler", "uniap.api")),
        # the measured data does not depend on the code that measures it
        ("uniap.profiles", ("uniap.profiler", "torch.distributed")),
    ],
)
def test_arrows_point_one_way(side: str, forbidden: tuple[str, ...]) -> None:
    """No module of ``side`` imports, directly, anything in ``forbidden``."""
    bad = sorted(
        f"{m} -> {n}"
        for m, names in IMPORTS.items()
        if _under(m, (side,))
        for n in names
        if _under(n, forbidden)
    )
    assert bad == []
