"""The package's layout is its architecture: one sub-package per stage, imports pointing one way.

    plan -> generate -> stream -> cache -> train -> evaluate -> launch     (compare reads run folders)

A module may import the foundation (`streamgen.config`, `streamgen.errors`), its own stage and
earlier stages, never a later one; and no module imports itself through others (no circle). Every
import counts, also those inside functions. The thin entry points (``python -m streamgen.prompts``,
``python -m streamgen.cache``) sit above everything and may import any stage.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest
from conftest import ROOT

import streamgen

STAGES = ("plan", "generate", "stream", "cache", "train", "evaluate", "launch", "compare")
FOUNDATION = {"streamgen", "streamgen.config", "streamgen.errors", "streamgen.data"}
ENTRY_POINTS = {"streamgen.prompts", "streamgen.cache.__main__", "streamgen.shapes"}


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    found = {}
    for path in sorted((ROOT / "streamgen").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The streamgen modules ``path`` imports (resolved to modules: ``from a.b import c`` is a.b.c when
    that is a module, else a.b), at any depth of the file."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        out |= {t for t in targets if t == "streamgen" or t.startswith("streamgen.")}
    return out


def stage_of(module: str) -> int:
    """0 for the foundation, 1.. for the stages in `STAGES` order."""
    if module in FOUNDATION or module.startswith("streamgen.data."):
        return 0
    return STAGES.index(module.split(".")[1]) + 1


def graph() -> dict[str, set[str]]:
    known = set(modules())
    return {name: imports_of(path, name, known) & known for name, path in modules().items()}


def test_every_module_is_in_a_stage_or_the_foundation():
    for name in modules():
        if name not in ENTRY_POINTS:
            stage_of(name)  # ValueError for a module outside every stage


def test_no_import_points_to_a_later_stage():
    later = [
        f"{name} ({STAGES[stage_of(name) - 1] if stage_of(name) else 'foundation'}) imports {target}"
        for name, targets in graph().items()
        if name not in ENTRY_POINTS
        for target in targets
        if target not in ENTRY_POINTS and stage_of(target) > stage_of(name)
    ]
    assert not later, "\n".join(later)


def test_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}  # 1 visiting, 2 done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt == node:
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_checker_finds_a_later_stage_and_a_circle(tmp_path):
    """The two rules above can fail: a planted backward import and a planted circle are found."""
    source = tmp_path / "m.py"
    source.write_text("from streamgen.launch.checks import Job\ndef f():\n    from streamgen.train import model\n")
    known = {"streamgen.launch.checks", "streamgen.train", "streamgen.train.model"}
    found = imports_of(source, "streamgen.plan.m", known)
    assert found == {"streamgen.launch.checks", "streamgen.train.model"}
    assert all(stage_of(t) > stage_of("streamgen.plan.m") for t in found)


@pytest.mark.parametrize("name", [m for m in sorted(modules()) if not m.endswith("__main__")])
def test_every_module_imports(name):
    importlib.import_module(name)


def test_the_walk_of_the_package_finds_the_same_modules():
    walked = {m.name for m in pkgutil.walk_packages(streamgen.__path__, "streamgen.")} | {"streamgen"}
    assert walked == set(modules())
