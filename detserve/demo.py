"""The README's main job, end to end: build the demo detector's repository, start the embedded
Triton server, send real photographs over gRPC, print and draw their detections."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clients.grpc_client import Detections, DetectorClient
from detserve.errors import DetserveError

DEMO_DETECTOR = "ssdlite320_mobilenet_v3_large"
DEMO_NAME = "demo"


@dataclass(frozen=True)
class DemoResult:
    repository: Path
    grpc_url: str
    detections: dict[str, Detections]
    drawn: list[Path]
    seconds: dict[str, float]


def run_demo(repository: Path, out: Path, echo: Callable[[str], None], score_threshold: float = 0.3) -> DemoResult:
    from clients.draw import draw_detections
    from detserve.repository import BuildRequest, build_repository
    from detserve.samples import write_samples
    from detserve.server import running_server

    seconds: dict[str, float] = {}
    t = time.monotonic()
    echo(f"[1/3] building {DEMO_DETECTOR} as {DEMO_NAME!r} in {repository} (ONNX export + ONNX Runtime check)")
    build = build_repository(
        BuildRequest(detector=DEMO_DETECTOR, repository=repository, name=DEMO_NAME, num_classes=91, spread_init_seed=0)
    )
    echo(f"      weights: {build.record['weights']}")
    for o in build.record["verification"]["core"]["outputs"]:
        echo(f"      {o['name']}: onnxruntime vs PyTorch max abs {o['max_abs']:.2e}")
    seconds["build"] = time.monotonic() - t

    images = write_samples(out / "samples")
    t = time.monotonic()
    echo("[2/3] starting the embedded Triton server on loopback")
    with running_server(repository) as server:
        seconds["server_start"] = time.monotonic() - t
        echo(f"      ready at {server.options.grpc_url} after {seconds['server_start']:.1f} s")
        echo(f"[3/3] detecting over gRPC on {len(images)} photographs (score >= {score_threshold})")
        t = time.monotonic()
        with DetectorClient(server.options.grpc_url, DEMO_NAME) as client:
            results = client.detect_many([p.read_bytes() for p in images], score_threshold=score_threshold)
        seconds["detect"] = time.monotonic() - t
    detections: dict[str, Detections] = {}
    drawn = []
    for path, res in zip(images, results, strict=True):
        if isinstance(res, DetserveError):
            raise res
        detections[path.name] = res
        drawn.append(draw_detections(path.read_bytes(), res, out / "drawn" / f"{path.stem}.png"))
        top = ", ".join(f"{int(lbl)}:{float(s):.2f}" for lbl, s in zip(res.labels[:5], res.scores[:5], strict=True))
        echo(f"      {path.name:16s} {len(res):3d} detections  top label:score {top}")
    echo(f"      annotated images in {out / 'drawn'}")
    return DemoResult(repository, server.options.grpc_url, detections, drawn, seconds)
