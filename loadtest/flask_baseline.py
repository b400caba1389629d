"""The baseline teams build first: Flask's threaded server around the eager torchvision model.

    python -m loadtest.flask_baseline --port 5000 --detector ssdlite320_mobilenet_v3_large --spread-init-seed 0
    curl --data-binary @photo.jpg 'http://127.0.0.1:5000/detect?score_threshold=0.3&max_det=10'

Deliberately naive — one eager ``model([image])`` per request, no batching, every request thread
sharing torch's intra-op pool — because that is what the served ensemble is compared against.
Pixels come from the same decoder as the server's, so both see the same image.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from detserve.errors import DetserveError, ServerError

MAX_IMAGE_PIXELS = 40_000_000  # PreprocessSpec's default: refused before decoding
ROOT = Path(__file__).resolve().parent.parent
LOG = logging.getLogger("detserve.flask_baseline")
QUERY_PARAMETERS = ("score_threshold", "max_det")
LIMITS = "the eager model has already applied its own limits; to go past them, start the service with --kw"


def load_eager_model(
    detector: str,
    num_classes: int = 91,
    checkpoint: Path | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    spread_init_seed: int | None = None,
) -> Any:
    """The eager torchvision detector in eval mode, weights as ``detserve build`` makes them.

    With ``spread_init_seed`` the random initialisation is seeded too (without touching the
    caller's global RNG), so two services started with the same seed hold the same weights.
    """
    from detserve.families import family_for_detector

    if spread_init_seed is not None and checkpoint is not None:
        raise DetserveError("spread_init_seed replaces the heads' weights; it cannot be combined with a checkpoint")
    # by the detector's family, as ``detserve build`` does (a two-stage R-CNN as well as torchvision's single-stage)
    family = family_for_detector(detector)
    return family.build(detector, num_classes, checkpoint, dict(model_kwargs or {}), spread_init_seed)


def model_limits(detector: str, model: Any) -> tuple[float, int]:
    """The eager model's own score threshold and detections cap, from its family's decode spec
    (a single-stage torchvision model keeps them on the model, a two-stage one on its RoI heads)."""
    from detserve.families import family_for_detector

    family = family_for_detector(detector)
    spec = family.decode_spec(model, family.preprocess_spec(model))
    return float(spec.score_thresh), int(spec.detections_per_img)


def _query_number(name: str, cast: type, low: float, high: float, hint: str) -> Any:
    """An optional query parameter within [low, high], or None; a bad one is the client's error."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = cast(raw)
    except ValueError as e:
        raise DetserveError(f"{name} must be {'an integer' if cast is int else 'a number'}, got {raw!r}") from e
    if not low <= value <= high:  # also refuses NaN
        raise DetserveError(f"{name} must be in [{low:g}, {high:g}] for this service, got {raw}", hint=hint)
    return value


def _refuse_unknown_parameters() -> None:
    """A parameter this service cannot honour (iou_threshold: NMS runs inside the model) fails loudly."""
    unknown = sorted(set(request.args) - set(QUERY_PARAMETERS))
    if unknown:
        raise DetserveError(
            f"unsupported query parameter(s): {', '.join(unknown)}", hint=f"supported: {', '.join(QUERY_PARAMETERS)}"
        )


def _detect(model: Any, blob: bytes) -> dict[str, Any]:
    """One eager forward pass on the decoded image, as ``model([image])`` is documented to be used."""
    import torch
    from torchvision.transforms.functional import to_tensor

    from detserve.runtime.imaging import decode_image

    image = to_tensor(decode_image(blob, MAX_IMAGE_PIXELS))
    with torch.inference_mode():
        return model([image])[0]  # type: ignore[no-any-return]


def _filtered(det: dict[str, Any], score_threshold: float | None, max_det: int | None) -> dict[str, list[Any]]:
    """Tighter thresholds applied after the model: exact, as NMS keeps a box only for higher-scored ones."""
    keep = det["scores"] > score_threshold if score_threshold is not None else slice(None)
    boxes, scores, labels = det["boxes"][keep], det["scores"][keep], det["labels"][keep]
    if max_det is not None:
        boxes, scores, labels = boxes[:max_det], scores[:max_det], labels[:max_det]
    return {"boxes": boxes.tolist(), "scores": scores.tolist(), "labels": labels.tolist()}


def _error(status: int, message: str) -> tuple[Response, int]:
    return jsonify({"error": message}), status


def create_app(
    detector: str,
    num_classes: int = 91,
    checkpoint: Path | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    spread_init_seed: int | None = None,
) -> Flask:
    """A Flask app serving ``POST /detect`` (raw encoded image as the body) and ``GET /health``.

    ``score_threshold`` may only tighten the model's own threshold and ``max_det`` only lower its
    cap: both are applied to the eager output, since the model object is shared by all threads.
    """
    model = load_eager_model(detector, num_classes, checkpoint, model_kwargs, spread_init_seed)
    min_score, cap = model_limits(detector, model)
    info = {"detector": detector, "num_classes": num_classes, "score_thresh": min_score, "detections_per_img": cap}
    app = Flask("detserve-flask-baseline")

    @app.get("/health")
    def health() -> Response:
        return jsonify({"status": "ok", **info})

    @app.post("/detect")
    def detect() -> Response | tuple[Response, int]:
        try:
            _refuse_unknown_parameters()
            score_threshold = _query_number("score_threshold", float, min_score, 1.0, hint=f"{LIMITS} score_thresh=VALUE")
            max_det = _query_number("max_det", int, 1, cap, hint=f"{LIMITS} detections_per_img=VALUE")
            det = _detect(model, request.get_data(cache=False))
        except DetserveError as e:  # bad image or parameter: the client can fix it
            return _error(400, str(e))
        return jsonify(_filtered(det, score_threshold, max_det))

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> tuple[Response, int]:
        return _error(e.code or 500, f"{e.name}: {e.description}")

    return app


def require_loopback(host: str) -> str:
    """The baseline has no authentication: it listens on loopback only."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ServerError(f"the Flask baseline listens on loopback only, not {host!r}", hint="use 127.0.0.1")
    return host


def serve_flask(host: str = "127.0.0.1", port: int = 5000, **app_kwargs: Any) -> None:
    """Flask's own threaded development server, one thread per request (the naive service); blocks."""
    require_loopback(host)  # before minutes of model loading
    create_app(**app_kwargs).run(host=host, port=port, threaded=True, debug=False, use_reloader=False)


class FlaskService:
    """``python -m loadtest.flask_baseline`` as a subprocess on loopback, ready once ``GET /health`` answers."""

    def __init__(
        self,
        port: int,
        detector: str,
        num_classes: int = 91,
        checkpoint: Path | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        spread_init_seed: int | None = None,
        startup_timeout_s: float = 180.0,
        log_path: Path | None = None,
    ) -> None:
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self.command = [sys.executable, "-m", "loadtest.flask_baseline", "--port", str(port), "--detector", detector]
        self.command += ["--num-classes", str(num_classes)]
        if checkpoint is not None:
            self.command += ["--checkpoint", str(checkpoint)]
        for key, value in (model_kwargs or {}).items():
            self.command += ["--kw", f"{key}={json.dumps(value)}"]
        if spread_init_seed is not None:
            self.command += ["--spread-init-seed", str(spread_init_seed)]
        self.log_path = log_path
        self._own_log = log_path is None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FlaskService:
        if self.log_path is None:  # a file, not a pipe: a full pipe would stall the server
            fd, name = tempfile.mkstemp(prefix="detserve-flask-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"the Flask baseline exited with code {self.process.returncode} while starting:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise ServerError(f"the Flask baseline did not answer /health within {self.startup_timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float = 10.0) -> None:
        """Terminate, then kill what does not stop within ``grace_s``; remove the log this service created."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.flask_baseline", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--detector", required=True)
    parser.add_argument("--num-classes", type=int, default=91)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--kw", action="append", default=[], help="model keyword KEY=VALUE (repeatable)")
    parser.add_argument("--spread-init-seed", type=int, help="test fixture: untrained heads with a score spread")
    parser.add_argument("--access-log", action="store_true", help="log every request (off: logging would be measured too)")
    args = parser.parse_args(argv)
    from detserve.kwargs import parse_model_kwargs

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.INFO if args.access_log else logging.WARNING)
    try:
        LOG.info("loading %s (%d classes) on http://%s:%d", args.detector, args.num_classes, args.host, args.port)
        serve_flask(
            args.host, args.port, detector=args.detector, num_classes=args.num_classes, checkpoint=args.checkpoint,
            model_kwargs=parse_model_kwargs(args.kw), spread_init_seed=args.spread_init_seed,
        )  # fmt: skip
    except DetserveError as e:
        LOG.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
