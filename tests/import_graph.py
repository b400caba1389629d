"""The project's import graph, read from the source with ``ast`` (tests/unit/test_layering.py).

Every import counts: at module level, inside functions, under ``TYPE_CHECKING``, relative
(``from . import x``) and ``from package import module`` (an edge to the module, not the
package). An import of a name inside a module is an edge to that module; an import of a package
is an edge to its ``__init__``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("clients", "detserve", "converters", "loadtest", "training")


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported project module
    line: int
    in_function: bool
    names: tuple[str, ...]


def modules(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py of the project's packages (``pkg/__init__.py`` -> ``pkg``)."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            out[".".join(p for p in rel.parts if p != "__init__")] = path
    return out


def _resolve(name: str, known: Mapping[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies in (``a.b.func`` -> ``a.b``)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return None


def _base(module: str, path: Path, level: int, name: str | None) -> str:
    """The absolute module a relative ``from ...name import`` names."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = package[: len(package) - (level - 1)] if level > 1 else package
    return ".".join([*package, name] if name else package)


def edges(module: str, path: Path, known: Mapping[str, Path]) -> list[Edge]:
    tree = ast.parse(path.read_text(), filename=str(path))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    out = []
    for node in ast.walk(tree):
        nested = id(node) in in_function
        if isinstance(node, ast.Import):
            for a in node.names:
                target = _resolve(a.name, known)
                if target is not None:
                    out.append(Edge(module, target, node.lineno, nested, ()))
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, path, node.level, node.module) if node.level else (node.module or "")
            for a in node.names:
                # ``from pkg import mod`` is an edge to pkg.mod; ``from mod import name`` one to mod
                target = _resolve(f"{base}.{a.name}", known) or _resolve(base, known)
                if target is not None and target != module:
                    out.append(Edge(module, target, node.lineno, nested, (a.name,)))
    return out


def graph(known: Mapping[str, Path] | None = None) -> list[Edge]:
    known = known if known is not None else modules()
    return [e for m, p in known.items() for e in edges(m, p, known)]


def cycles(pairs: Iterable[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan), each sorted."""
    adjacency: dict[str, set[str]] = {}
    for a, b in pairs:
        if a != b:
            adjacency.setdefault(a, set()).add(b)
            adjacency.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(adjacency[v]):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(adjacency):
        if v not in index:
            visit(v)
    return sorted(found)
