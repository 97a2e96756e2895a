"""The package layering, read from the source with ``ast`` (nothing is imported):

- ``worker`` sits on top; ``dicom_node``, ``models`` and ``db`` never import ``worker``, nor each
  other;
- no import cycle among the project's modules, counting imports made inside functions too (only
  ``if TYPE_CHECKING:`` blocks are left out: they never run).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("worker", "dicom_node", "models", "db")
LIBRARIES = ("dicom_node", "models", "db")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(p): p
        for pkg in PACKAGES
        for p in sorted((REPO / pkg).rglob("*.py"))
        if "__pycache__" not in p.parts
    }


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children: list[ast.AST] = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node):
            children = list(node.orelse)
        stack.extend(children)


def _imported_names(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """Absolute dotted names ``module`` imports (``from a import b`` gives ``a.b``), with line."""
    is_package = path.name == "__init__.py"
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
            continue
        if node.level:  # relative: resolve against the importing module's package
            package = module.split(".")
            if not is_package:
                package = package[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        yield base, node.lineno
        for alias in node.names:
            yield f"{base}.{alias.name}", node.lineno


def _project_module(name: str) -> str | None:
    """The project module a dotted name refers to (a name inside a module maps to the module)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported project module: first line}."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in MODULES.items():
        edges: dict[str, int] = {}
        for name, line in _imported_names(module, path):
            target = _project_module(name)
            if target is not None and target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


GRAPH = _graph()


def _top(module: str) -> str:
    return module.split(".")[0]


def test_the_four_packages_are_found() -> None:
    assert {_top(m) for m in MODULES} == set(PACKAGES)
    assert "db.queue" in GRAPH["worker.service"]  # edges are found


@pytest.mark.parametrize("package", LIBRARIES)
def test_library_packages_import_neither_worker_nor_each_other(package: str) -> None:
    forbidden = {"worker", *LIBRARIES} - {package}
    wrong = []
    for module, path in MODULES.items():
        if _top(module) != package:
            continue
        # every import counts here, TYPE_CHECKING ones too: a type-only import still couples
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            wrong += [
                f"{path.relative_to(REPO)}:{node.lineno} imports {n}"
                for n in names
                if _top(n) in forbidden
            ]
    assert not wrong, (
        f"{package} must not import {', '.join(sorted(forbidden))} "
        "(worker sits on top; the other three stand alone):\n" + "\n".join(wrong)
    )


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_one_cycle(graph, set(c)) for c in components]


def _one_cycle(graph: dict[str, dict[str, int]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    return paths[v] + [start]
                if w in component and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")  # pragma: no cover


def test_no_import_cycle() -> None:
    cycles = _cycles(GRAPH)
    lines = []
    for cycle in cycles:
        hops = [f"{a} (line {GRAPH[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:], strict=False)]
        lines.append(" -> ".join(cycle) + "\n    " + "\n    ".join(hops))
    assert not cycles, "import cycle(s) among the project's modules:\n" + "\n".join(lines)


def test_cycle_finder_names_the_cycle() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []
