"""Every family has the same layout (issue 22 part 2), and its runtime half stays light.

``detserve/families/<name>/``: ``__init__.py`` (the Family object), ``spec.py`` (decode spec and
declared tensors), ``decode.py`` (the torch half the serving step runs), ``models.py`` (the zoo
half). Read from the source with ``ast`` (every import, also inside functions) and, for what an
import really loads, in a fresh interpreter.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from detserve import families

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ROOT / "detserve" / "families"
PACKAGES = sorted({type(families.family(n)).__module__.split(".")[2] for n in families.names()})
FILES = ("__init__.py", "spec.py", "decode.py", "models.py")
ZOOS = {"ultralytics", "transformers", "huggingface_hub", "mmdet", "mmcv", "mmengine"}


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports (``from a import b`` counts as a.b and a), inside functions too."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return out


def test_the_registry_names_one_package_per_family() -> None:
    assert PACKAGES == ["detr", "mmdet", "rcnn", "torchvision", "yolo"]
    for name in PACKAGES:
        assert sorted(p.name for p in (FAMILIES / name).glob("*.py") if p.name in FILES) == sorted(FILES), name
    assert not [p.name for p in FAMILIES.glob("*.py") if p.stem not in ("__init__", "base", "spread")], (
        "a family is a package, not a module beside the registry"
    )


@pytest.mark.parametrize("name", PACKAGES)
def test_spec_and_decode_never_import_the_zoo_half_or_the_package(name: str) -> None:
    package = f"detserve.families.{name}"
    for half in ("spec", "decode"):
        imported = _imports(FAMILIES / name / f"{half}.py")
        assert f"{package}.models" not in imported, f"{half}.py imports models.py"
        assert not [m for m in imported if m == package], f"{half}.py imports the package's __init__"
        assert not [m for m in imported if m.split(".")[0] in ZOOS], f"{half}.py imports a model zoo"
    assert not [m for m in _imports(FAMILIES / name / "spec.py") if m.split(".")[0] in ("torch", "torchvision")]
    assert package not in _imports(FAMILIES / name / "models.py"), "models.py imports the package's __init__"


def test_no_family_module_imports_the_runtime_or_above() -> None:
    above = ("detserve.runtime", "detserve.ops", "detserve.tritonconfig", "detserve.verification", "detserve.app")
    for path in FAMILIES.rglob("*.py"):
        assert not [m for m in _imports(path) if m.startswith(above)], path.relative_to(ROOT)
    assert not [m for m in _imports(ROOT / "detserve" / "specs.py") if m.startswith("detserve.families")]


def test_asking_for_every_family_loads_neither_torch_nor_a_model_zoo() -> None:
    """The registry, each family's object, its spec and decode modules: torch is imported by the
    decode functions when they run, not by asking which family builds what."""
    code = (
        "import sys\n"
        "from detserve.families import family, names\n"
        "for n in names(): family(n).detectors()\n"
        "heavy = {'torch', 'torchvision', 'ultralytics', 'transformers'}\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == []


@pytest.mark.parametrize("name", PACKAGES)
def test_the_family_object_holds_its_spec_and_decode_functions(name: str) -> None:
    """No one-line method that only forwards to spec.py / decode.py: the object holds the function."""
    package = importlib.import_module(f"detserve.families.{name}")
    spec = importlib.import_module(f"detserve.families.{name}.spec")
    decode = importlib.import_module(f"detserve.families.{name}.decode")
    for fam in (getattr(package, "FAMILIES", None) or {name: package.FAMILY}).values():
        assert fam.outputs is spec.outputs
        if name == "rcnn":  # multi-step: its python steps instead of one decode
            assert fam.run_step is decode.run_step and fam.steps is spec.steps
        else:
            assert fam.decode in (getattr(decode, "decode", None), getattr(decode, "postprocess_batch", None))
