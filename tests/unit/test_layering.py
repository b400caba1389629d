"""Imports go one way, and this test can fail (issue 22 part 4).

The layers, lowest first (a module may import its own layer and those below, never above):

    foundation (errors, pipeline, hashing, cachedir) < clients < specs < families < runtime
    < tritonconfig < ops, verification, jobs < converters, loadtest, training < app

Every import counts (tests/import_graph.py: inside functions, under TYPE_CHECKING, relative,
``from package import module``), and besides the upward rule: no import cycle between files, none
between packages, the client modules checked in a subprocess for what they really load, the
model zoos (AGPL ultralytics, transformers) only where one table allows them, and only inside
functions. The tests at the bottom plant each kind of violation in a scratch tree and check that
the rules catch it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from tests.import_graph import ROOT, Edge, cycles, graph, modules

LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "detserve",
        "detserve.errors",
        "detserve.pipeline",
        "detserve.hashing",
        "detserve.cachedir",
        "detserve.kwargs",
        "detserve.samples",
    ),
    ("clients",),
    ("detserve.specs",),
    ("detserve.families",),
    ("detserve.runtime",),
    ("detserve.tritonconfig",),
    ("detserve.ops", "detserve.verification", "detserve.jobs", "detserve.video"),
    ("converters", "loadtest", "training"),
    ("detserve.app",),
)
# what a client install must never load (python -c "import clients..."; sys.modules)
HEAVY = ("torch", "torchvision", "onnxruntime", "cv2", "tensorrt", "ultralytics", "transformers")
CLIENT_MODULES = ("clients", "detserve.jobs")
# model zoo -> the only modules that may import it, and only inside functions (licence, start-up cost)
ZOOS: dict[str, tuple[str, ...]] = {
    "ultralytics": ("detserve.families.yolo.models",),
    "transformers": ("detserve.families.detr.models", "detserve.families.detr.configs"),
    "huggingface_hub": ("detserve.families.detr.models",),
    "mmdet": ("detserve.families.mmdet.models",),
    "mmcv": ("detserve.families.mmdet.models", "detserve.families.mmdet.zoo"),
    "mmengine": ("detserve.families.mmdet.models",),
}


def unit(module: str) -> str:
    """The longest LAYERS entry ``module`` belongs to (its package for the cycle rule)."""
    owners = [u for layer in LAYERS for u in layer if module == u or module.startswith(u + ".")]
    if not owners:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return max(owners, key=len)


def layer(module: str) -> int:
    return next(i for i, units in enumerate(LAYERS) if unit(module) in units)


def upward(edges: Sequence[Edge]) -> list[str]:
    return [
        f"{e.source}:{e.line} (layer {layer(e.source)}) imports {e.target} (layer {layer(e.target)})"
        for e in edges
        if layer(e.target) > layer(e.source)
    ]


def file_cycles(edges: Sequence[Edge]) -> list[list[str]]:
    return cycles((e.source, e.target) for e in edges)


def package_cycles(edges: Sequence[Edge]) -> list[list[str]]:
    return cycles((unit(e.source), unit(e.target)) for e in edges if unit(e.source) != unit(e.target))


def _top_level_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def zoo_violations(known: Mapping[str, Path]) -> list[str]:
    bad = []
    for module, path in known.items():
        every = [
            a.name if isinstance(n, ast.Import) else n.module or ""
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Import | ast.ImportFrom)
            for a in (n.names if isinstance(n, ast.Import) else [n])  # type: ignore[list-item]
        ]
        for zoo, allowed in ZOOS.items():
            if any(name.split(".")[0] == zoo for name in every) and module not in allowed:
                bad.append(f"{module} imports {zoo}: only {', '.join(allowed)} may")
            if any(name.split(".")[0] == zoo for name in _top_level_imports(path)):
                bad.append(f"{module} imports {zoo} at import time: only inside the functions that need it")
    return bad


def loaded_by_clients(root: Path, known: Mapping[str, Path]) -> list[str]:
    """The heavy modules ``import``ing every client module really loads, in a fresh interpreter."""
    targets = [m for m in known if any(m == c or m.startswith(c + ".") for c in CLIENT_MODULES)]
    code = (
        "import importlib, sys\n"
        f"for m in {targets!r}: importlib.import_module(m)\n"
        f"print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


# --------------------------------------------------------------------------- the rules, on this tree

MODULES = modules()
EDGES = graph(MODULES)


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        unit(module)


def test_no_upward_import() -> None:
    bad = upward(EDGES)
    assert not bad, "\n".join(bad)


def test_no_file_cycle() -> None:
    assert not file_cycles(EDGES)


def test_no_package_cycle() -> None:
    assert not package_cycles(EDGES)


def test_model_zoos_only_where_the_table_allows_them() -> None:
    bad = zoo_violations(MODULES)
    assert not bad, "\n".join(bad)


def test_the_client_loads_no_heavy_library() -> None:
    assert loaded_by_clients(ROOT, MODULES) == []


def test_no_private_names_across_packages() -> None:
    bad = [
        f"{e.source}:{e.line} takes {n} from {e.target}"
        for e in EDGES
        if unit(e.source) != unit(e.target)
        for n in e.names
        if n.startswith("_") and not n.endswith("__")
    ]
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------- the rules catch what they should


def _scratch(tmp_path: Path, files: Mapping[str, str]) -> tuple[dict[str, Path], list[Edge]]:
    """A copy of the foundation and the client beside planted files: (modules, edges)."""
    for rel in ("detserve/__init__.py", "detserve/errors.py", "detserve/pipeline.py", "clients/__init__.py", "clients/masks.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((ROOT / rel).read_text())
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    known = modules(tmp_path, ("clients", "detserve", "converters"))
    return known, graph(known)


def test_a_planted_upward_import_is_caught(tmp_path: Path) -> None:
    _, edges = _scratch(tmp_path, {"detserve/specs.py": "def f():\n    from converters import tool\n", "converters/tool.py": ""})
    assert upward(edges) == ["detserve.specs:2 (layer 2) imports converters.tool (layer 7)"]


def test_a_planted_file_cycle_and_package_cycle_are_caught(tmp_path: Path) -> None:
    files = {
        "detserve/ops/__init__.py": "",
        "detserve/ops/a.py": "from detserve.ops import b\n",
        "detserve/ops/b.py": "from . import a\n",
        "detserve/jobs/__init__.py": "",
        "detserve/jobs/c.py": "import detserve.ops.a\n",
        "detserve/ops/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from detserve.jobs import c\n",
    }
    _, edges = _scratch(tmp_path, files)
    assert file_cycles(edges) == [["detserve.ops.a", "detserve.ops.b"]]
    assert package_cycles(edges) == [["detserve.jobs", "detserve.ops"]]


def test_torch_in_the_error_module_is_caught_in_the_client(tmp_path: Path) -> None:
    planted = {
        "detserve/errors.py": (ROOT / "detserve/errors.py").read_text() + "\nimport torch  # planted\n",
        "clients/probe.py": "from detserve.errors import DetserveError\n",  # as every client module does
    }
    known, _ = _scratch(tmp_path, planted)
    assert loaded_by_clients(tmp_path, {m: p for m, p in known.items() if m.startswith("clients")}) == ["torch"]


def test_a_zoo_outside_its_module_or_at_import_time_is_caught(tmp_path: Path) -> None:
    files = {
        "detserve/families/__init__.py": "",
        "detserve/families/yolo/__init__.py": "",
        "detserve/families/yolo/models.py": "import ultralytics\n",
        "detserve/x.py": "def f():\n    import transformers\n",
    }
    known, _ = _scratch(tmp_path, files)
    bad = zoo_violations(known)
    assert "detserve.families.yolo.models imports ultralytics at import time: only inside the functions that need it" in bad
    assert any(b.startswith("detserve.x imports transformers: only") for b in bad)


@pytest.mark.parametrize("module", ["detserve.errors", "detserve.pipeline", "detserve.hashing"])
def test_foundation_modules_import_nothing_of_the_project(module: str) -> None:
    assert not [e for e in EDGES if e.source == module]
