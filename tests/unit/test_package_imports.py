"""No package of natgwd imports another that imports it back, directly or round a longer
circle (docs/development.md states the direction). Every import counts: at the top of a
module, inside a function, and under `if TYPE_CHECKING:` (mypy follows those, and a
circle there is one a later edit turns into a runtime one)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import natgwd

ROOT = Path(natgwd.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module `source` (the text of `module`) imports, wherever the import statement is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            # `from natgwd.x import y` may import the module natgwd.x.y.
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _unit(module: str) -> str | None:
    """The package (natgwd.state) or top-level module (natgwd.cli) a natgwd module belongs to."""
    parts = module.split(".")
    if parts[0] != "natgwd" or len(parts) < 2:
        return None
    return ".".join(parts[:2])


def package_graph() -> dict[str, dict[str, set[str]]]:
    """package -> package it imports -> the modules whose imports make that edge."""
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    units = {_unit(_module_name(path)) for path in ROOT.rglob("*.py")}
    for path in ROOT.rglob("*.py"):
        module = _module_name(path)
        source_unit = _unit(module)
        if source_unit is None:
            continue
        for target in imported_modules(path.read_text(), module, path.name == "__init__.py"):
            target_unit = _unit(target)
            if target_unit in units and target_unit != source_unit:
                graph[source_unit][target_unit].add(module)
    return graph


def circles(graph: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    """The strongly connected components of more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_package_imports_one_that_imports_it_back() -> None:
    graph = package_graph()
    found = circles(graph)
    detail = [
        f"{a} -> {b} by {sorted(graph[a][b])}"
        for component in found
        for a in component
        for b in component
        if b in graph.get(a, {})
    ]
    assert not found, f"import circles {found}: " + "; ".join(detail)


def test_the_check_sees_imports_under_type_checking_and_in_functions() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from natgwd.ha import roles\n"
        "def f():\n"
        "    import natgwd.kernel.tc\n"
        "    from . import sibling\n"
    )
    found = imported_modules(source, "natgwd.state.model")
    assert {"natgwd.ha.roles", "natgwd.kernel.tc", "natgwd.state.sibling"} <= found
    assert circles({"a": {"b": {"m"}}, "b": {"c": {"n"}}, "c": {"a": {"o"}}}) == [["a", "b", "c"]]
    assert circles({"a": {"b": {"m"}}, "b": {}}) == []


def test_the_graph_knows_the_pipeline() -> None:
    """The check reads the real tree: runtime's imports of the layers below are seen."""
    graph = package_graph()
    assert {"natgwd.state", "natgwd.planning", "natgwd.kernel"} <= set(graph["natgwd.runtime"])
