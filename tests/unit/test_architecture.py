"""The package's shape: no import cycles, no private names borrowed across modules.

Imports are read from the source (ast), not by importing, so the check sees every import a
module can run: at the top, inside functions, lazily. Imports under ``if TYPE_CHECKING:`` are
type-only and never run, so they do not count.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "outbox_relay"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(path): path for path in root.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement outside ``if TYPE_CHECKING:`` blocks."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports (a ``from pkg import sub`` names the submodule)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text("utf-8"))
    for node in runtime_imports(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            assert not node.level, f"{path}: relative import (the project uses absolute ones)"
            base = node.module or ""
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            if target in known and target != name:
                found.add(target)
                break
            # `import a.b.c` also runs a and a.b: attribute the edge to the deepest known one.
            while "." in target and target not in known:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules(PACKAGE)
    known = set(mods)
    return {name: imported_modules(name, path, known) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
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


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_package_has_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 30, "the walker found too few modules"
    assert "outbox_relay.relay.window" in graph["outbox_relay.relay.loop"], "walker broken"
    assert cycles(graph) == []


def test_the_producer_api_imports_no_broker_client_and_no_consumer() -> None:
    graph = import_graph()
    reached: set[str] = set()
    todo = ["outbox_relay", "outbox_relay.producer"]
    while todo:
        current = todo.pop()
        if current in reached:
            continue
        reached.add(current)
        todo.extend(graph.get(current, ()))
    assert not {m for m in reached if m.startswith(("outbox_relay.consumer", "outbox_relay.cli"))}
    assert not {m for m in reached if m.startswith("outbox_relay.publishers.")}


def private_imports(root: Path) -> list[str]:
    """``from module import _name`` where ``module`` is one of the project's own, another file."""
    offenders = []
    for path in [*root.rglob("*.py")]:
        tree = ast.parse(path.read_text("utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            if not node.module.startswith(("outbox_relay", "tests", "bench")):
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    offenders.append(f"{path.relative_to(ROOT)}: {node.module}.{alias.name}")
    return offenders


def test_no_private_name_is_imported_across_modules() -> None:
    offenders = [
        *private_imports(PACKAGE),
        *private_imports(ROOT / "tests"),
        *private_imports(ROOT / "bench"),
    ]
    assert offenders == []
