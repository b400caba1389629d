"""Fuzz the live server with mutated PNG/JPEG files, sent concurrently; it must answer every one.

Each mutated file is also decoded and preprocessed locally with the served spec: the server must
give detections exactly where the local reference decodes the file, and otherwise an error that
carries the reference's own ImageError message (never an "internal error"). Afterwards the server
is live, the model ready, and a good image gets the same detections as before the fuzz.

Counts: ``DETSERVE_SERVER_FUZZ`` (default 400, about a minute here) for the default run; the
``slow`` test sends ``DETSERVE_SERVER_FUZZ_SLOW`` (default 3000). Each run writes its counts to
out/reports/fuzz-server-<n>.json.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from clients.grpc_client import Detections, DetectorClient
from detserve.errors import ClientError, ImageError
from detserve.families.torchvision.spec import PostprocessSpec
from detserve.ops.server import TritonServer
from detserve.runtime.imaging import decode_image
from detserve.runtime.preprocess import preprocess
from detserve.specs import PreprocessSpec
from detserve.verification.matching import check_parity
from tests.bad_images import mutate, png_and_jpeg_seeds, random_mutations

MODEL = "ssdlite"  # the CPU-fast detector: most of the time goes to files that decode
BATCH = 200  # files per detect_many call, 16 requests in flight
REPORTS = Path(__file__).resolve().parents[2] / "out" / "reports"


def _served_specs(server: TritonServer) -> tuple[PreprocessSpec, PostprocessSpec]:
    """The specs of the served models, as the server loaded them (through its own socket)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.internal_url) as client:
        pre, post = (client.get_model_config(f"{MODEL}_{step}", as_json=True)["config"] for step in ("preprocess", "postprocess"))
    return (
        PreprocessSpec.from_json(pre["parameters"]["preprocess_spec"]["string_value"]),
        PostprocessSpec.from_json(post["parameters"]["postprocess_spec"]["string_value"]),
    )


def _reference(blob: bytes, spec: PreprocessSpec) -> str | None:
    """None where the reference path decodes and preprocesses the file, else its error message."""
    try:
        preprocess(decode_image(blob, spec.max_image_pixels), spec)
    except ImageError as e:
        return e.message
    return None


def _mutated(seeds: dict[str, bytes], count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    names = sorted(seeds)
    return [mutate(seeds[rng.choice(names)], random_mutations(rng), fix_crc=rng.random() < 0.5) for _ in range(count)]


def _check_answer(i: int, result: Detections | ClientError, expected_error: str | None, max_det: int) -> str:
    if expected_error is None:
        assert isinstance(result, Detections), (i, result)
        assert len(result) <= max_det and np.isfinite(result.boxes).all() and np.isfinite(result.scores).all()
        return "detections"
    assert isinstance(result, ClientError), (i, expected_error, result)
    assert expected_error in result.message and "internal error" not in result.message, (i, expected_error, result)
    return "refused: " + expected_error.split(" (")[0].split(":")[0][:40]


def run_fuzz(server: TritonServer, samples: dict[str, bytes], count: int, seed: int) -> Counter[str]:
    grpc_url = server.options.grpc_url
    spec, post = _served_specs(server)
    blobs = _mutated(png_and_jpeg_seeds(samples), count, seed)
    outcomes: Counter[str] = Counter()
    good = samples["astronaut.jpg"]
    with DetectorClient(grpc_url, MODEL, timeout_s=300) as client:
        before = client.detect(good)
        for start in range(0, count, BATCH):
            chunk = blobs[start : start + BATCH]
            results = client.detect_many(chunk, max_in_flight=16)
            assert len(results) == len(chunk)
            for j, (blob, result) in enumerate(zip(chunk, results, strict=True)):
                outcomes[_check_answer(start + j, result, _reference(blob, spec), post.detections_per_img)] += 1
        client.check_ready()
        after = client.detect(good)
    parity = check_parity(
        (after.boxes, after.scores, after.labels), (before.boxes, before.scores, before.labels), 0.0, 0.999, 1e-5
    )
    assert parity.ok, parity.failures[:5]
    REPORTS.mkdir(parents=True, exist_ok=True)
    report = {"model": MODEL, "sent": count, "seed": seed, "outcomes": dict(outcomes.most_common())}
    (REPORTS / f"fuzz-server-{count}.json").write_text(json.dumps(report, indent=2))
    return outcomes


def test_server_answers_every_mutated_file(server: TritonServer, samples: dict[str, bytes]) -> None:
    count = int(os.environ.get("DETSERVE_SERVER_FUZZ", "400"))
    outcomes = run_fuzz(server, samples, count, seed=1)
    assert sum(outcomes.values()) == count
    assert outcomes["detections"] > 0 and outcomes["detections"] < count  # both paths were exercised


@pytest.mark.slow
def test_server_answers_thousands_of_mutated_files(server: TritonServer, samples: dict[str, bytes]) -> None:
    count = int(os.environ.get("DETSERVE_SERVER_FUZZ_SLOW", "3000"))
    outcomes = run_fuzz(server, samples, count, seed=2)
    assert sum(outcomes.values()) == count
