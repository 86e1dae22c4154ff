"""The import graph: no circles between modules, and every package imports only the layers below it.

Imports are read from the source (module level, inside functions and under TYPE_CHECKING alike), so a
lazy import that closes a circle, or a lower layer reaching up, fails here even though Python would run it.

    python tests/test_imports.py      # prints the package-level graph
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llada_edge"

# Bottom to top. A unit (a top-level module or subpackage of llada_edge) may import only units listed before it.
LAYERS = [
    "errors", "positions", "config", "layout", "checkpoint", "buildfolder", "synthetic", "model", "components",
    "runtime", "training", "export", "calibration", "engines", "summary", "reference", "demo", "serve", "cli",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """The llada_edge modules a file imports (``from pkg import name`` counts ``pkg.name`` when it is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("llada_edge"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llada_edge"):
            subs = [f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")]
            found.update(subs if len(subs) == len(node.names) else [*subs, node.module])
    return found


def module_graph() -> dict[str, set[str]]:
    graph = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}
    return {m: {d for d in deps if d != m} for m, deps in graph.items()}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def unit_graph() -> dict[str, set[str]]:
    units: dict[str, set[str]] = defaultdict(set)
    for module, deps in module_graph().items():
        units[unit_of(module)].update(unit_of(d) for d in deps if unit_of(d) != unit_of(module))
    return units


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walker_sees_lazy_imports_and_finds_a_planted_circle() -> None:
    graph = module_graph()
    # a function-level import (torch-free runtime: the backend factory imports its implementations lazily)
    assert "llada_edge.runtime.backends.onnxruntime_backend" in graph["llada_edge.runtime.backends"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_itself_through_a_circle() -> None:
    assert find_cycle(module_graph()) is None


def test_every_unit_is_placed_in_a_layer() -> None:
    assert set(unit_graph()) - {"__init__"} <= set(LAYERS), "add new packages to LAYERS"


def test_packages_import_only_the_layers_below() -> None:
    rank = {unit: i for i, unit in enumerate(LAYERS)}
    upward = sorted(f"{unit} -> {dep}" for unit, deps in unit_graph().items() if unit in rank
                    for dep in deps if rank[dep] >= rank[unit])
    assert upward == []


if __name__ == "__main__":
    for unit in LAYERS:
        deps = unit_graph().get(unit, set())
        print(f"{unit:<12} -> {', '.join(sorted(deps, key=LAYERS.index)) or '-'}")
