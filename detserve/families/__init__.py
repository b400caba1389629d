"""Detector families behind one small registry (the seam: detserve/families/base.py).

The registry maps a family's name -- the ``family`` field of its decode spec, stored in every
repository -- to the package that provides it (``detserve/families/<name>/``: ``spec``,
``decode``, ``models``; docs/families.md). Packages load lazily: asking for the torchvision
family does not import the YOLO package, and no family imports a model zoo at import time.
:class:`ModelSpec` (a repository build's record of one detector) lives here because it decodes
its stored decode spec through the registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from detserve.errors import SpecError
from detserve.families.base import Family, TensorDecl
from detserve.specs import PreprocessSpec, Spec

__all__ = [
    "Family",
    "ModelSpec",
    "TensorDecl",
    "decode_spec_from_dict",
    "family",
    "family_for_detector",
    "family_of_spec",
    "known_detectors",
    "names",
    "output_names",
    "outputs_of",
]

# family name -> package; the package has FAMILIES: dict[str, Family] (or FAMILY for one)
_REGISTRY: dict[str, str] = {
    "ssd": "detserve.families.torchvision",
    "retinanet": "detserve.families.torchvision",
    "fcos": "detserve.families.torchvision",
    "yolo": "detserve.families.yolo",
    "detr": "detserve.families.detr",
    "rcnn": "detserve.families.rcnn",
    "mmdet": "detserve.families.mmdet",
}


def names() -> list[str]:
    return sorted(_REGISTRY)


def family(name: str) -> Family:
    """The family called ``name`` (as stored in a decode spec)."""
    if name not in _REGISTRY:
        raise SpecError(f"unknown detector family {name!r}", hint=f"known families: {', '.join(names())}")
    module = importlib.import_module(_REGISTRY[name])
    found = getattr(module, "FAMILIES", None) or {module.FAMILY.name: module.FAMILY}
    return found[name]  # type: ignore[no-any-return]


def _loadable() -> list[Family]:
    out: list[Family] = []
    for name in names():
        try:
            out.append(family(name))
        except ImportError:  # a family whose optional extra is not installed
            continue
    return out


def known_detectors() -> dict[str, str]:
    """Every detector name a loadable family builds -> its family."""
    return {d: f.name for f in _loadable() for d in f.detectors()}


def family_for_detector(detector: str) -> Family:
    """The family that builds ``detector`` (a name such as ``ssdlite320_mobilenet_v3_large`` or ``yolov8n``)."""
    for fam in _loadable():
        if fam.accepts(detector):
            return fam
    raise SpecError(f"unknown detector {detector!r}", hint=f"choose one of: {', '.join(sorted(known_detectors()))}")


def family_of_spec(decode_spec: Any) -> Family:
    """The family a decode spec belongs to (its ``family`` field)."""
    return family(str(decode_spec.family))


def outputs_of(decode_spec: Any) -> list[TensorDecl]:
    """The core's declared raw outputs for this decode spec, in order."""
    return list(family_of_spec(decode_spec).outputs(decode_spec))


def output_names(decode_spec: Any) -> tuple[str, ...]:
    return tuple(t.name for t in outputs_of(decode_spec))


def decode_spec_from_dict(data: Any) -> Any:
    """A stored decode spec (JSON object with a ``family`` key) as its family's frozen dataclass."""
    if not isinstance(data, dict) or "family" not in data:
        raise SpecError("a decode spec needs a 'family' key", hint=f"known families: {', '.join(names())}")
    spec_type: Any = family(str(data["family"])).decode_spec_type()
    return spec_type.from_dict(data)


def decode_spec_from_json(text: str) -> Any:
    import json

    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"decode spec is not valid JSON: {e}") from e
    return decode_spec_from_dict(data)


@dataclass(frozen=True)
class ModelSpec(Spec):
    """Everything a repository build needs to know about one detector."""

    detector: str
    num_classes: int
    preprocess: PreprocessSpec
    postprocess: Any  # the family's decode spec (PostprocessSpec for torchvision, YoloDecodeSpec, ...)
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.preprocess, Mapping):
            object.__setattr__(self, "preprocess", PreprocessSpec.from_dict(self.preprocess))
        if isinstance(self.postprocess, Mapping):
            object.__setattr__(self, "postprocess", decode_spec_from_dict(dict(self.postprocess)))
