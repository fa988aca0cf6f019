"""The package's shape, checked: the import graph between its modules, its cycles, and the
layers each folder may reach. Used by the project's own tests; plain ast, imports nothing."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

# Each layer may import itself and the layers before it, never one after it.
LAYERS = ("errors", "families", "compare", "engines", "config", "runner", "report",
          "pytest_plugin", "testing", "cli")


def module_name(root: Path, path: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> modules of the package it imports (at any depth of the file, lazily or not;
    imports under `if TYPE_CHECKING:` are for type checkers only and are left out)."""
    modules = {module_name(root, p, package): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        skipped = {id(n) for node in ast.walk(tree) if _is_type_checking_block(node)
                   for n in ast.walk(node)}
        targets: set[str] = set()
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(name, node, is_package)
                targets.add(base)
                targets.update(f"{base}.{a.name}" for a in node.names)
        graph[name] = {_owner(t, modules) for t in targets if _owner(t, modules)} - {name}
    return graph


def _is_type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    keep = len(parts) - node.level + (1 if is_package else 0)
    return ".".join(parts[:keep] + ([node.module] if node.module else []))


def _owner(target: str, modules: Mapping[str, Path]) -> str | None:
    """The package module a dotted import name lands in (a module, or a name in one)."""
    while target:
        if target in modules:
            return target
        target = target.rpartition(".")[0]
    return None


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer_of(module: str, package: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == package else None


def upward_imports(graph: Mapping[str, Iterable[str]], package: str) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a module reaches a layer after its own."""
    out = []
    for module, targets in graph.items():
        mine = layer_of(module, package)
        if mine not in LAYERS:
            continue
        for target in targets:
            theirs = layer_of(target, package)
            if theirs in LAYERS and LAYERS.index(theirs) > LAYERS.index(mine):
                out.append((module, target))
    return sorted(out)
