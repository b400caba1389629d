"""Class names for a served model's labels, without the admin API.

The model-config API is closed on the public address without the admin key, so names are read
from what the user has instead, first match wins:

1. ``--classes``: a comma-separated list or a file with one name per line; entry *i* names label *i*
   as the server returns it (torchvision: category ids, label 0 the background -- list it too;
   YOLO: class indices from 0).
2. The repository the model was built into (``--repository``): the served version's labels document
   (``<name>/<version>/labels.json``, converters/labels.py), else its ``spec.json``
   carries YOLO's ``class_names`` (read from the checkpoint at build time); for torchvision, the
   build record's checkpoint may have a provenance file beside it (``<checkpoint>.json`` with
   ``classes``, as the demo detector's weights do), used only when its sha256 matches the record.
3. The server (``url``): the gate's labels document (``detserve.v1.Labels/Get``, clients/labels.py),
   the same file, served on an open path.
4. Otherwise ``class_<label>``: results still carry every label, and the names can be given later
   (``detserve prelabel --classes``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from detserve.errors import DetserveError
from detserve.pipeline import CORE, LABELS_FILE, POSTPROCESS, model_name


def parse_classes(text: str) -> dict[int, str]:
    """``--classes``: 'a,b,c' or a file with one name per line -> {label: name}."""
    path = Path(text)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines()]
        names = [n for n in names if n]
    else:
        names = [n.strip() for n in text.split(",")]
    if not names or any(not n for n in names):
        raise DetserveError(
            f"--classes {text!r}: expected a comma-separated list of names or a file with one name per line",
            hint="entry i names label i, e.g. --classes __background__,circle,square (torchvision counts the background)",
        )
    return dict(enumerate(names))


def class_names(model: str, classes: str | None, repository: Path | None, url: str | None = None) -> tuple[dict[int, str], str]:
    """(names by label, where they came from)."""
    if classes is not None:
        return parse_classes(classes), "--classes"
    if repository is not None:
        found = names_from_repository(repository, model)
        if found is not None:
            return found
    if url is not None:
        from clients.labels import fetch_labels

        document = fetch_labels(url, model)
        if document and document.get("names"):
            return dict(enumerate(str(n) for n in document["names"])), f"the server's labels document ({url})"
    return {}, "none (labels named class_<label>; give --classes or --repository)"


def names_from_repository(repository: Path, model: str) -> tuple[dict[int, str], str] | None:
    from detserve.ops.versions import serving_version

    try:
        version = serving_version(repository, model)
    except DetserveError:
        raise
    except Exception as e:  # a folder that is not a repository (no config.pbtxt, ...): a user error
        raise DetserveError(f"cannot read model {model!r} from repository {repository}: {e}") from e
    document = _read_json(repository / model / str(version) / LABELS_FILE)
    if document and document.get("names"):
        return dict(enumerate(str(n) for n in document["names"])), f"{model}/{version}/{LABELS_FILE}"
    spec = _read_json(repository / model_name(model, POSTPROCESS) / str(version) / "spec.json")
    names = ((spec or {}).get("postprocess") or {}).get("class_names")
    if names:
        return dict(enumerate(str(n) for n in names)), f"{model_name(model, POSTPROCESS)}/{version}/spec.json"
    record = _read_json(repository / model_name(model, CORE) / str(version) / "build.json") or {}
    checkpoint = record.get("checkpoint")
    if not checkpoint:
        return None
    provenance_path = Path(checkpoint).with_suffix(".json")
    provenance = _read_json(provenance_path) or {}
    same_file = (provenance.get("weights") or {}).get("sha256") == record.get("checkpoint_sha256")
    if provenance.get("classes") and same_file:
        return dict(enumerate(str(n) for n in provenance["classes"])), str(provenance_path)
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
