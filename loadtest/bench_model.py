"""The model ``detserve bench`` measures: the trained demo detector unless the repository holds one.

The demo detector (SSDlite320 trained on the generated shapes, ``training/``) lives here, below the
CLI, because both the bench and the demo (``detserve/app/demo.py``) build it; its weights ship in
``detserve/weights`` with their provenance (dataset seeds, command, metrics).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import detserve
from detserve.pipeline import CORE, model_name

if TYPE_CHECKING:
    from converters.repository import BuildRequest

DEMO_DETECTOR = "ssdlite320_mobilenet_v3_large"
DEMO_NAME = "demo"
DEMO_WEIGHTS = Path(detserve.__file__).resolve().parent / "weights" / "demo_ssdlite320_shapes.pt"


def demo_build_request(repository: Path, name: str = DEMO_NAME) -> BuildRequest:
    """The trained demo detector as ``name`` in ``repository`` (the demo's and the bench's model)."""
    from converters.repository import BuildRequest
    from training.synthetic import NUM_CLASSES

    return BuildRequest(
        detector=DEMO_DETECTOR, repository=repository, name=name, num_classes=NUM_CLASSES, checkpoint=DEMO_WEIGHTS
    )


def ensure_model(repository: Path, model: str, echo: Callable[[str], None]) -> None:
    """Build the trained demo detector as ``model`` when ``repository`` does not hold it yet."""
    if (repository / model).is_dir():
        return
    from converters.repository import build_repository

    echo(f"building the trained demo detector ({DEMO_DETECTOR}) as {model!r} in {repository}")
    build_repository(demo_build_request(repository, model))


def torch_core_repository(repository: Path, dst: Path, model: str) -> Path:
    """``model`` built again into ``dst`` with the same weights and serving options, its cores on the
    python-torch target (torch.export run by torch instead of ONNX Runtime): bench's row (g)."""
    import dataclasses

    from converters.repository import BuildRequest, build_repository
    from detserve.tritonconfig import ServingOptions

    kwargs = flask_kwargs_from_build(repository, model)
    record = _core_record(repository, model)
    options = ServingOptions(**{**record.get("options", {}), "device": "cpu"})
    req = BuildRequest(
        detector=kwargs["detector"], repository=dst, name=model, num_classes=kwargs["num_classes"],
        checkpoint=kwargs["checkpoint"], model_kwargs=kwargs["model_kwargs"] or {},
        spread_init_seed=kwargs["spread_init_seed"], target="python-torch", options=options,
    )  # fmt: skip
    build_repository(dataclasses.replace(req, verify=True))
    return dst


def _core_record(repository: Path, model: str) -> dict[str, Any]:
    from loadtest.inprocess import latest_version

    core = repository / model_name(model, CORE)
    return json.loads((core / str(latest_version(core)) / "build.json").read_text())  # type: ignore[no-any-return]


def flask_kwargs_from_build(repository: Path, model: str) -> dict[str, Any]:
    """The Flask baseline must hold the same weights as the served model: read how it was built."""
    from loadtest.inprocess import latest_version

    core = repository / model_name(model, CORE)
    record = json.loads((core / str(latest_version(core)) / "build.json").read_text())
    return {
        "detector": record["detector"],
        "num_classes": record["num_classes"],
        "checkpoint": Path(record["checkpoint"]) if record.get("checkpoint") else None,
        "model_kwargs": record.get("model_kwargs") or None,
        "spread_init_seed": record.get("spread_init_seed"),
    }
