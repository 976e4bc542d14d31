"""The policy domain is pure: no database rows, sessions or I/O clients among its imports (DESIGN: policies/)."""

from __future__ import annotations

import ast
from pathlib import Path

import policies

# Modules of core and libraries that mean rows, sessions or I/O; the domain takes values instead.
FORBIDDEN = ("core.tables", "core.db", "core.blobs", "core.jobs", "core.listings", "sqlmodel", "sqlalchemy", "redis")


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_policy_module_imports_rows_sessions_or_io() -> None:
    root = Path(policies.__file__).parent
    found = {
        f"{path.relative_to(root)}: {name}"
        for path in root.rglob("*.py")
        for name in imported(path)
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)
    }
    assert not found, sorted(found)
