"""The names of an ensemble's composing models, said once.

A served detector ``<name>`` is an ensemble of steps ``<name>_<role>``: by default a python
``preprocess`` step, a ``core`` step (the exported network) and a python ``postprocess`` step. A
family may declare more (two-stage: preprocess, core, roi step, second core, postprocess); the
steps of a built ensemble are read from its config, these names only say how a role is spelled.
No torch here: clients import it.
"""

from __future__ import annotations

# the ensemble contract's tensor names (DESIGN: clients send IMAGE, read the detections) and the
# preprocessing step's outputs, said once for the config writer, the stubs and the clients
IMAGE = "IMAGE"
# the second way in (issue 25): raw uint8 RGB pixels, [N, H, W, 3], for video frames; same pre-processing
FRAMES = "FRAMES"
CORE_INPUT = "images"
IMAGE_INFO = "image_info"
OUTPUTS = ("num_detections", "boxes", "scores", "labels")
# outputs a family may add after the detections (instance-mask families: masks [max_det, 28, 28])
EXTRA_OUTPUTS = ("masks",)
# the class names a build records in the ensemble's version directory (converters/labels.py; the gate serves it)
LABELS_FILE = "labels.json"

DEFAULT_ROLES: tuple[str, ...] = ("preprocess", "core", "postprocess")
PREPROCESS, CORE, POSTPROCESS = DEFAULT_ROLES


def model_name(ensemble: str, role: str) -> str:
    """The composing model of ``ensemble`` that plays ``role``."""
    return f"{ensemble}_{role}"


def composing_models(ensemble: str, roles: tuple[str, ...] = DEFAULT_ROLES) -> list[str]:
    return [model_name(ensemble, r) for r in roles]


def all_models(ensemble: str, roles: tuple[str, ...] = DEFAULT_ROLES) -> list[str]:
    """The ensemble and its composing models (the directories a build writes)."""
    return [ensemble, *composing_models(ensemble, roles)]


def role_of(model: str, ensemble: str) -> str | None:
    """``model``'s role in ``ensemble``, or None when it is not one of its steps' names."""
    prefix = f"{ensemble}_"
    return model[len(prefix) :] if model.startswith(prefix) and len(model) > len(prefix) else None
