"""The README's main job, end to end: build the demo detector's repository, start the embedded
Triton server, send held-out test images over gRPC, print and draw their detections, load-test it.

The demo detector is SSDlite320 trained on detserve's generated shapes dataset (``training/``); its
weights ship in ``detserve/weights`` with their provenance (dataset seeds, command, metrics)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients.grpc_client import Detections, DetectorClient
from detserve.errors import DetserveError
from loadtest.bench_model import DEMO_DETECTOR, DEMO_NAME, DEMO_WEIGHTS, demo_build_request
from training.synthetic import CLASSES

# the demo detector is defined below the CLI (loadtest/bench_model.py): the bench builds it too
__all__ = ["DEMO_DETECTOR", "DEMO_NAME", "DEMO_WEIGHTS", "DemoResult", "demo_build_request", "demo_images", "run_demo"]

CLASS_NAMES = ["background", *CLASSES]
DEMO_IMAGES = 6  # held-out test-split images detected in step 3


@dataclass(frozen=True)
class DemoResult:
    repository: Path
    grpc_url: str
    detections: dict[str, Detections | DetserveError]
    seconds: dict[str, float]


def run_demo(
    repository: Path, out: Path, echo: Callable[[str], None], score_threshold: float = 0.3, load_seconds: float = 20.0
) -> DemoResult:
    from converters.repository import build_repository
    from detserve.ops.server import running_server

    seconds: dict[str, float] = {}
    t = time.monotonic()
    echo(f"[1/4] building {DEMO_DETECTOR} as {DEMO_NAME!r} in {repository} (ONNX export + ONNX Runtime check)")
    build = build_repository(demo_build_request(repository))
    provenance = json.loads(DEMO_WEIGHTS.with_suffix(".json").read_text())
    test_metrics = provenance["metrics"]["test_max_det_100"]
    echo(f"      weights: {DEMO_WEIGHTS.name} (sha256 {build.record['checkpoint_sha256'][:12]}), trained on generated shapes;")
    echo(f"      held-out test split: mAP@[.5:.95] {test_metrics['mAP']:.3f}, AP50 {test_metrics['AP50']:.3f}")
    for o in build.record["verification"]["core"]["outputs"]:
        echo(f"      {o['name']}: onnxruntime vs PyTorch max abs {o['max_abs']:.2e}")
    seconds["build"] = time.monotonic() - t

    images = demo_images(out / "images")
    t = time.monotonic()
    echo("[2/4] starting the embedded Triton server on loopback")
    with running_server(repository) as server:
        seconds["server_start"] = time.monotonic() - t
        echo(f"      ready at {server.options.grpc_url} after {seconds['server_start']:.1f} s")
        echo(f"[3/4] detecting over gRPC on {len(images)} held-out test images (score >= {score_threshold})")
        t = time.monotonic()
        with DetectorClient(server.options.grpc_url, DEMO_NAME) as client:
            results = client.detect_many([p.read_bytes() for p in images], score_threshold=score_threshold)
        seconds["detect"] = time.monotonic() - t
        _report_detections(images, results, out, echo)
        if load_seconds > 0:
            t = time.monotonic()
            echo(f"[4/4] load test: Locust over gRPC, 8 users for {load_seconds:.0f} s")
            report_md = _load_test(server.options.grpc_url, out / "loadtest", load_seconds, out / "images")
            seconds["load_test"] = time.monotonic() - t
            echo(report_md)
    return DemoResult(repository, server.options.grpc_url, {p.name: r for p, r in zip(images, results, strict=True)}, seconds)


def demo_images(out: Path) -> list[Path]:
    """The first test-split images (generated apart from training: other seed, backgrounds, sizes) as PNG files."""
    from PIL import Image

    from training.synthetic import SPLITS, render

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(DEMO_IMAGES):
        path = out / f"test_{i:06d}.png"
        Image.fromarray(render(SPLITS["test"], i).image).save(path)
        paths.append(path)
    return paths


def _load_test(url: str, out: Path, seconds: float, images: Path) -> str:
    from loadtest.runner import LoadTestConfig, run_loadtest

    cfg = LoadTestConfig(
        grpc_url=url, model=DEMO_NAME, out_dir=out, users=8, duration_s=seconds, window_s=seconds / 5, images=images
    )
    result = run_loadtest(cfg)
    return result.files["markdown"].read_text() + f"\n(report files: {out})"


def _report_detections(images: list[Path], results: list[Any], out: Path, echo: Callable[[str], None]) -> None:
    from clients.draw import draw_detections

    for path, res in zip(images, results, strict=True):
        if isinstance(res, DetserveError):
            raise res
        draw_detections(path.read_bytes(), res, out / "drawn" / f"{path.stem}.png", CLASS_NAMES)
        top = ", ".join(f"{CLASS_NAMES[int(lbl)]}:{float(s):.2f}" for lbl, s in zip(res.labels[:5], res.scores[:5], strict=True))
        echo(f"      {path.name:16s} {len(res):3d} detections  top label:score {top}")
    echo(f"      annotated images in {out / 'drawn'}")
