"""Who imports whom: the project's import graph, read from the source (no module is imported).

``python tests/import_graph.py [ROOT]`` prints the package graph (an edge per pair of top-level
packages, with how many import statements make it) and the module-level circles, if any.
README "Processes" draws this graph; tests/unit/test_import_boundaries.py holds the code to it.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

__all__ = ["PACKAGES", "circles", "module_edges", "package_edges"]

PACKAGES = ("cli", "bot", "engine", "settings", "storage", "bench")


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST, here: str) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package this module is in
                base = here.split(".")[: -node.level]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return found


def module_edges(root: Path) -> set[tuple[str, str]]:
    """(importer, imported) for every import between the project's modules, lazy ones included."""
    files = [p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py")) if "migrations" not in p.parts]
    modules = {_module_name(root, p): p for p in files}
    edges = set()
    for name, path in modules.items():
        for target in _imports(ast.parse(path.read_text(encoding="utf-8")), name):
            if target in modules and target != name:
                edges.add((name, target))
    return edges


def package_edges(root: Path) -> Counter[tuple[str, str]]:
    return Counter((a.split(".")[0], b.split(".")[0]) for a, b in module_edges(root)
                   if a.split(".")[0] != b.split(".")[0])


def circles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (each an import circle)."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parents[1]
    for (a, b), n in sorted(package_edges(root).items()):
        print(f"{a:9} -> {b:9} ({n} module pairs)")
    for group in circles(module_edges(root)):
        print("circle:", " <-> ".join(group))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
