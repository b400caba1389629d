"""Raw frames through a real Triton (issue 25 part 3): the ensemble's second input ``FRAMES``.

The same pixels sent as ``FRAMES`` (uint8 [N, H, W, 3]) and as lossless PNG files through ``IMAGE``
give the core the same tensor, bit for bit, through the served pre-processing (the trained demo
detector's fixed resize and FCOS's torchvision resize; every mode without a server in
tests/unit/test_frames.py), and the ensemble the same detections; a request with both inputs or
neither is refused with a clear message. Slow: a
repository built before FRAMES existed still serves IMAGE, and the fused layout takes FRAMES.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import SHAPES

SERVED = (SHAPES, "fcos")  # fixed and torchvision resizing; every mode: tests/unit/test_frames.py
OUTPUTS = ("num_detections", "boxes", "scores", "labels")


@pytest.fixture(scope="module")
def triton(grpc_url: str) -> Iterator[Any]:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(grpc_url) as client:
        yield client


def _frames(samples: dict[str, bytes], n: int = 2, size: tuple[int, int] = (181, 243)) -> np.ndarray:
    """``n`` crops of the sample photos, one odd size (h, w): real content, so detections are not empty."""
    from detserve.runtime.imaging import decode_image

    photos = [decode_image(b, 10**8) for b in list(samples.values())[:n]]
    return np.stack([p[: size[0], : size[1]] for p in photos])


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _inputs(image: np.ndarray | None = None, frames: np.ndarray | None = None) -> list[Any]:
    import tritonclient.grpc as grpcclient

    inputs = []
    if image is not None:
        inputs.append(grpcclient.InferInput("IMAGE", list(image.shape), "BYTES"))
        inputs[-1].set_data_from_numpy(image)
    if frames is not None:
        inputs.append(grpcclient.InferInput("FRAMES", list(frames.shape), "UINT8"))
        inputs[-1].set_data_from_numpy(frames)
    return inputs


def _as_files(frames: np.ndarray) -> np.ndarray:
    return np.array([[_png(f)] for f in frames], dtype=np.object_)


def _infer(client: Any, model: str, inputs: list[Any], outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
    import tritonclient.grpc as grpcclient

    result = client.infer(model, inputs, outputs=[grpcclient.InferRequestedOutput(o) for o in outputs])
    return {o: result.as_numpy(o) for o in outputs}


def test_frames_equal_lossless_files_bit_for_bit_then_errors(triton: Any, samples: dict[str, bytes]) -> None:
    from tritonclient.utils import InferenceServerException

    frames = _frames(samples)
    for model in SERVED:  # each step called directly: its tensor, not only the detections
        pre = f"{model}_preprocess"
        want = _infer(triton, pre, _inputs(image=_as_files(frames)), ("images", "image_info"))
        got = _infer(triton, pre, _inputs(frames=frames), ("images", "image_info"))
        assert np.array_equal(want["image_info"], got["image_info"]), model
        assert want["images"].shape == got["images"].shape and float(np.abs(want["images"] - got["images"]).max()) == 0.0, model
    want = _infer(triton, SHAPES, _inputs(image=_as_files(frames)), OUTPUTS)
    got = _infer(triton, SHAPES, _inputs(frames=frames), OUTPUTS)
    assert int(want["num_detections"].sum()) > 0
    for name in OUTPUTS:
        assert np.array_equal(want[name], got[name]), name
    for inputs, message in (
        (_inputs(image=_as_files(frames), frames=frames), "both IMAGE and FRAMES"),
        ([], "request has 0 inputs"),  # Triton's own refusal, before the pre-processing
    ):
        with pytest.raises(InferenceServerException) as e:
            triton.infer(SHAPES, inputs)
        assert message in str(e.value.message()), e.value.message()


def _without_frames(config_path: Path) -> None:
    """The config as a build before FRAMES wrote it: IMAGE only, required."""
    from detserve.tritonconfig import parse, render

    config = parse(config_path.read_text())
    kept = [t for t in config.input if t.name != "FRAMES"]
    config.ClearField("input")
    for t in kept:
        config.input.add().CopyFrom(t)
        config.input[-1].optional = False
    for step in config.ensemble_scheduling.step:
        if "FRAMES" in step.input_map:
            del step.input_map["FRAMES"]
    config_path.write_text(render(config))


@pytest.mark.slow
def test_a_repository_built_before_frames_keeps_serving(demo_built: Path, tmp_path: Path, samples: dict[str, bytes]) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from detserve.ops.server import running_server

    repo = Path(shutil.copytree(demo_built, tmp_path / "repo"))
    for name in ("demo", "demo_preprocess"):
        _without_frames(repo / name / "config.pbtxt")
    frames = _frames(samples, 1)
    with running_server(repo) as server, grpcclient.InferenceServerClient(server.options.grpc_url) as client:
        got = _infer(client, "demo", _inputs(image=_as_files(frames)), OUTPUTS)
        with pytest.raises(InferenceServerException, match="unexpected inference input 'FRAMES'"):
            client.infer("demo", _inputs(frames=frames))
    assert int(got["num_detections"][0, 0]) > 0


@pytest.mark.slow
def test_the_fused_layout_takes_frames(demo_built: Path, tmp_path: Path, samples: dict[str, bytes]) -> None:
    import tritonclient.grpc as grpcclient

    from converters.fused import FusedOptions, fused_repository
    from detserve.ops.server import running_server

    repo = fused_repository(demo_built, tmp_path / "fused", "demo", FusedOptions(instances=1))
    frames = _frames(samples)
    with running_server(repo) as server, grpcclient.InferenceServerClient(server.options.grpc_url) as client:
        want = _infer(client, "demo", _inputs(image=_as_files(frames)), OUTPUTS)
        got = _infer(client, "demo", _inputs(frames=frames), OUTPUTS)
    assert int(want["num_detections"].sum()) > 0
    for name in OUTPUTS:
        assert np.array_equal(want[name], got[name]), name
