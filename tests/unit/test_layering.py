"""Imports go one way (DESIGN.md, issue 11): clients <- core runtime <- converters <- loadtest, reports, CLI.

Read from the source with ``ast`` (every import, also those inside functions), so a lazy import
cannot hide an upward dependency. Also: no private names across packages, no torch in the
client, and the AGPL model zoo (ultralytics) nowhere near the serving runtime.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("clients", "detserve", "converters", "loadtest", "training")
# stdlib-only modules every layer may use: the error root, the composing-model names, content hashes
FOUNDATION = ("detserve.errors", "detserve.pipeline", "detserve.hashing")


def layer(module: str) -> int:
    if module in FOUNDATION:
        return 0
    if module.startswith("clients"):
        return 1
    if module.startswith("detserve.app"):
        return 4  # the CLI and the reports on top
    if module.startswith("detserve"):
        return 2  # the core runtime: specs, families, runtime, verification, ops
    if module.startswith("converters"):
        return 3
    return 4  # loadtest, training


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            out[".".join(p for p in rel.parts if p != "__init__")] = path
    return out


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import statement in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names], node.lineno))
    return out


MODULES = _modules()


def _package(module: str) -> str:
    """The unit a private name must not leave: a top-level package, or a sub-package of detserve."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "detserve" and len(parts) > 2 else parts[0]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module: str) -> None:
    bad = [
        f"line {line}: {module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        for target, _, line in _imports(MODULES[module])
        if target.split(".")[0] in PACKAGES and layer(target) > layer(module)
    ]
    assert not bad, "\n".join(bad)


def test_no_private_names_across_packages() -> None:
    bad = []
    for module, path in MODULES.items():
        for target, names, line in _imports(path):
            if target.split(".")[0] in PACKAGES and _package(target) != _package(module):
                bad += [
                    f"{path.relative_to(ROOT)}:{line} takes {n} from {target}"
                    for n in names
                    if n.startswith("_") and not n.endswith("__")
                ]
    assert not bad, "\n".join(bad)


def test_foundation_modules_import_nothing_of_the_project() -> None:
    for module in FOUNDATION:
        assert not [t for t, _, _ in _imports(MODULES[module]) if t.split(".")[0] in PACKAGES], module


def test_the_client_and_the_runtime_stay_light() -> None:
    heavy = {"torch", "torchvision", "onnxruntime", "tensorrt", "ultralytics", "transformers"}
    for module, path in MODULES.items():
        roots = {t.split(".")[0] for t, _, _ in _imports(path)}
        if module.startswith(("clients", "detserve.jobs")):
            assert not roots & heavy, f"{module} imports {roots & heavy}: the client install has no torch"
        if module.startswith(("detserve.runtime", "detserve.ops", "detserve.verification", "clients")):
            assert "ultralytics" not in roots, f"{module}: the serving runtime never imports ultralytics (AGPL-3.0)"


def test_ultralytics_is_imported_only_inside_the_yolo_familys_functions() -> None:
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.split(".")[0] == "ultralytics"], f"{module} imports ultralytics at import time"
        if any(t.split(".")[0] == "ultralytics" for t, _, _ in _imports(path)):
            assert module in ("detserve.families.yolo.models",), f"{module} uses ultralytics: only the YOLO family may"


def test_transformers_is_imported_only_inside_the_detr_familys_build_functions() -> None:
    """transformers (and huggingface_hub) only in detserve.families.detr.models, inside functions that
    first keep the Hub offline; the family's runtime half (spec, decode) never imports it."""
    zoo = {"transformers", "huggingface_hub"}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.split(".")[0] in zoo], f"{module} imports transformers at import time"
        if any(t.split(".")[0] in zoo for t, _, _ in _imports(path)):
            assert module == "detserve.families.detr.models", f"{module} uses transformers: only the DETR family's builder may"
