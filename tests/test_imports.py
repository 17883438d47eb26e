"""The import graph of the project's packages (read with ``ast``, nothing imported): no
cycle between modules of one package, and no cycle between packages. Every import counts,
wherever it is written (module level, inside a function, under ``TYPE_CHECKING``): an
import that only runs later is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# every top-level package of the project (pipeline, deployments, cluster, bench ...), not the tests
PACKAGES = tuple(sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests"))


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (``from a import b`` is ``a.b`` when that is a
    module, else ``a``)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # "pipeline.face.FaceInfo" -> "pipeline.face"
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
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

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_graph_reader_sees_relative_absolute_and_nested_imports():
    assert {"pipeline", "deployments", "cluster", "bench"} <= set(PACKAGES)
    edges = graph()
    assert "pipeline.adapter" in edges["pipeline.pipeline"]  # from .adapter import ...
    assert "pipeline.face" in edges["deployments.face"]  # from pipeline.face import ...
    assert "pipeline.pipeline" in edges["pipeline"]  # inside get_pipeline
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_inside_a_package():
    edges = graph()
    found = []
    for package in PACKAGES:
        inside = {m: {t for t in targets if t.split(".")[0] == package}
                  for m, targets in edges.items() if m.split(".")[0] == package}
        found += cycles(inside)
    assert not found, f"import cycles: {found}"


def test_no_import_cycle_between_packages():
    between: dict[str, set[str]] = {package: set() for package in PACKAGES}
    for module, targets in graph().items():
        between[module.split(".")[0]] |= {t.split(".")[0] for t in targets} - {module.split(".")[0]}
    found = cycles(between)
    witnesses = {f"{m} -> {t}" for m, ts in graph().items() for t in ts
                 if any(m.split(".")[0] in c and t.split(".")[0] in c and m.split(".")[0] != t.split(".")[0]
                        for c in found)}
    assert not found, f"packages import each other: {found}: {sorted(witnesses)}"
