"""Imports go one way (docs/architecture.md, "Imports"): the store holds no algorithm, and the
association reads and writes the store only through its tables."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: where each installed package lives in the repository
PACKAGES = {"streamstars": ROOT / "streamstars", "streamstars.state": ROOT / "state",
            "streamstars.consumers": ROOT / "consumers"}

ALGORITHMS = ("streamstars.ingest", "streamstars.snapshot", "streamstars.references",
              "streamstars.refmatch", "streamstars.select", "streamstars.status",
              "streamstars.backfill", "streamstars.io", "streamstars.report",
              "streamstars.consumers", "streamstars.cli", "streamstars.refs_cli",
              "streamstars.simulate", "streamstars.butler", "streamstars.queries")
PURE_ASSOCIATION = ("fof", "greedy", "links", "join")


def modules(package: str) -> dict[str, Path]:
    """Module name -> file of every module of ``package`` (sub-packages included)."""
    base = PACKAGES[package]
    out = {}
    for path in sorted(base.rglob("*.py")):
        parts = list(path.relative_to(base).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def imported(name: str, path: Path) -> set[str]:
    """Every ``streamstars`` module ``path`` imports (relative imports resolved; the names of
    ``from X import a`` count as ``X.a``, which may be a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "streamstars" or m.startswith("streamstars.")}


def forbidden_imports(files: dict[str, Path], forbidden: tuple[str, ...]) -> list[str]:
    """"M imports T" for every import of a module of ``files`` under a ``forbidden`` one."""
    return [f"{name} imports {target}" for name, path in files.items()
            for target in sorted(imported(name, path))
            if any(target == f or target.startswith(f + ".") for f in forbidden)]


def test_the_import_scanner_sees_absolute_relative_and_guarded_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nfrom .columns import take\n"
                      "import streamstars.sky\nif TYPE_CHECKING:\n"
                      "    from streamstars.references import ReferenceSource\n")
    assert imported("streamstars.m", source) >= {
        "streamstars.columns", "streamstars.columns.take", "streamstars.sky",
        "streamstars.references"}


def test_the_store_imports_no_algorithm() -> None:
    files = modules("streamstars.state")
    assert "streamstars.state.schema" in files
    assert forbidden_imports(files, (*ALGORITHMS, "streamstars.association")) == []


def test_the_association_imports_only_the_store_and_shared_modules() -> None:
    inside = {n: p for n, p in modules("streamstars").items()
              if n.startswith("streamstars.association")}
    assert len(inside) > len(PURE_ASSOCIATION), "no association package found"
    assert forbidden_imports(inside, ALGORITHMS) == []


@pytest.mark.parametrize("module", PURE_ASSOCIATION)
def test_the_pure_association_functions_touch_no_table(module: str) -> None:
    name = f"streamstars.association.{module}"
    found = imported(name, modules("streamstars")[name])
    store = sorted(t for t in found if t.startswith("streamstars.state")
                   and not t.startswith("streamstars.state.schema"))
    assert store == []
    assert not [t for t in found if t.startswith("streamstars.association.")
                and t.split(".")[2] not in PURE_ASSOCIATION]
