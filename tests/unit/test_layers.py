"""Dependencies point one way: ``api`` may import ``controller``, never the reverse,
and the pure deciders import nothing that does I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    "path",
    sorted((REPO / "controller").rglob("*.py")),
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_controller_never_imports_api(path: Path) -> None:
    offending = {m for m in imported_modules(path) if m == "api" or m.startswith("api.")}
    assert not offending, f"{path.name} imports {sorted(offending)}"


IO_MODULES = {"asyncio", "aiohttp", "docker", "sqlite3", "redis", "socket", "subprocess", "time"}


@pytest.mark.parametrize(
    "path",
    [
        REPO / "controller" / "autoscaler.py",
        REPO / "controller" / "plan.py",
        REPO / "api" / "balancer.py",
    ],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_pure_deciders_import_no_io(path: Path) -> None:
    roots = {m.split(".")[0] for m in imported_modules(path)}
    assert not roots & IO_MODULES, f"{path.name} imports {sorted(roots & IO_MODULES)}"
