"""The engine's boundary, read from the source: the rest of r1 and the benchmarks reach the engine
through `r1.engine`'s names and an engine's public surface (add_requests, abort, step,
has_unfinished, stats, config_record), never through its modules or its parts; and the
bookkeeping modules stay free of torch."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import r1.engine

ROOT = Path(__file__).parent.parent
ENGINE = ROOT / "r1" / "engine"
ENGINE_PARTS = {"runner", "scheduler", "block_manager", "requests", "by_request_id"}


def outside_the_engine() -> list[Path]:
    files = [p for p in (ROOT / "r1").rglob("*.py") if ENGINE not in p.parents] + sorted((ROOT / "bench").glob("*.py"))
    assert len(files) > 30  # the walk found the tree
    return files


def test_only_the_engine_package_is_imported():
    offenders = []
    for path in outside_the_engine():
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names if n.startswith("r1.engine.")
            ]
    assert not offenders, "\n".join(offenders)


def _is_engine(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id == "engine") or (
        isinstance(node, ast.Attribute) and node.attr == "engine"
    )


def test_an_engine_is_reached_only_through_its_surface():
    offenders = [
        f"{path.relative_to(ROOT)}:{node.lineno} reads engine.{node.attr}"
        for path in outside_the_engine()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr in ENGINE_PARTS and _is_engine(node.value)
    ]
    assert not offenders, "\n".join(offenders)


def test_the_public_names_resolve():
    for name in r1.engine.__all__:
        module = importlib.import_module(f"r1.engine.{r1.engine._PUBLIC[name]}")
        assert getattr(r1.engine, name) is getattr(module, name)


def test_bookkeeping_never_imports_torch():
    for name in ("sequence", "block_manager", "scheduler"):
        tree = ast.parse((ENGINE / f"{name}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(m == "torch" or m.startswith("torch.") for m in imported), name
