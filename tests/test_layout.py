"""The package's shape: modules import in the order the data flows, never in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "archiver"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each module's imports of the package at module level (imports inside a function are
    deliberate: optional parts, loaded when used)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if not node.module.startswith("archiver"):
                    continue
                # ``from archiver.ledger import core`` depends on the submodule, not the package.
                subs = {f"{node.module}.{a.name}" for a in node.names}
                deps |= subs if subs <= modules.keys() else {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("archiver")}
        graph[name] = deps & modules.keys()
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        for dep in sorted(graph[node]):
            if dep in path:
                found.append([*path[path.index(dep) :], dep])
            elif dep not in done:
                visit(dep, [*path, dep])
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node, [node])
    return found


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert "archiver.ledger.core" in graph and graph["archiver.cli"], "the graph was read"
    assert cycles(graph) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_rules_and_the_wiring_stay_apart() -> None:
    graph = import_graph()
    # The ledger's rules touch no connection, no driver, no storage.
    assert graph["archiver.ledger.core"] <= {
        "archiver.audit",
        "archiver.errors",
        "archiver.ledger.base",
        "archiver.ledger.ops",
        "archiver.ledger.rows",
        "archiver.models",
        "archiver.sources",
    }
    assert graph["archiver.ledger.ops"] <= {"archiver.models"}
    # What a listing is limited to is pure: the filters and the scope know no HTTP client.
    assert not (graph["archiver.filters"] | graph["archiver.scope"]) & {"archiver.telnyx"}
    # Policy (producers) never opens resources: it knows no service or daemon wiring.
    assert not graph["archiver.producers"] & {"archiver.service", "archiver.daemon"}
    # Commands print through archiver.output, never through the CLI module.
    assert "archiver.cli" not in graph["archiver.commands"]
