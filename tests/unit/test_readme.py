"""README's "How it works" tables list every module of uniap/ and nothing that does not exist,
and the README links only inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _listed_paths() -> list[str]:
    section = README.split("## How it works", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [p for row in rows for p in re.findall(r"`(uniap/[^`]*)`", row)]


def test_module_table_matches_the_tree() -> None:
    """Every listed path exists; every module is listed itself or under a listed package."""
    listed = _listed_paths()
    assert listed, "no module table found under '## How it works'"
    missing = [p for p in listed if not any(ROOT.glob(p.rstrip("/")))]
    assert missing == [], f"listed but absent: {missing}"
    dirs = [p for p in listed if p.endswith("/")]
    modules = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "uniap").rglob("*.py"))
    unlisted = [m for m in modules if m not in listed and not any(m.startswith(d) for d in dirs)]
    assert unlisted == [], f"modules missing from README's table: {unlisted}"


def test_readme_links_stay_inside_the_repository() -> None:
    """No relative link or path that leaves the repository (a clone does not have it)."""
    assert "../" not in README
