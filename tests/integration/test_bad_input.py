"""Bad input on the live server: each bad request fails alone with a clear error; the rest succeed.

Covers the policy of docs/inputs.md end to end: unusual images decode on the server exactly as
in the reference path (bit for bit), bad files are refused with a message naming what is wrong,
and raw tensors of the wrong type or shape are refused by Triton (ensemble) or by the composing
core model, while good requests in flight at the same time still get their results.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from clients.grpc_client import Detections, DetectorClient
from detserve.errors import ClientError
from detserve.ops.server import TritonServer
from detserve.runtime.imaging import decode_image
from detserve.runtime.preprocess import preprocess
from detserve.specs import PreprocessSpec
from tests.bad_images import (
    EPS,
    NOT_AN_IMAGE,
    bomb_gif,
    bomb_jpeg,
    bomb_png,
    bomb_tiff,
    bomb_webp,
    encode,
    of_mode,
    png_bytes,
    truncated_jpeg,
    unusual_images,
)

BAD = {
    "not an image": (NOT_AN_IMAGE, "not a JPEG, PNG, GIF, BMP, TIFF, WEBP, PPM file"),
    "EPS (not accepted)": (EPS, "not a JPEG, PNG"),
    "truncated jpeg": (None, "cannot decode JPEG pixel data"),
    "truncated png": (of_mode("RGB")[:3000], "cannot decode PNG pixel data"),
    "png header cut short": (b"\x89PNG\r\n\x1a\n", "starts like PNG, but its header is invalid"),
    "zero-width png": (bomb_png(0, 10), "starts like PNG"),
    "empty payload": (b"", "empty image payload"),
    "declared too large (png)": (
        bomb_png(10_000, 10_000),
        "PNG image declares 10000x10000 = 100000000 pixels, over the limit of 20000000",
    ),
    "declared too large (jpeg)": (bomb_jpeg(10_000, 10_000), "JPEG image declares 10000x10000"),
    "declared too large (gif)": (bomb_gif(10_000, 10_000), "GIF image declares 10000x10000"),
    "declared too large (tiff)": (bomb_tiff(10_000, 10_000), "TIFF image declares 10000x10000"),
    "past Pillow's own limit (webp)": (bomb_webp(16_000, 16_000), "over the limit of 20000000"),
    "float pixels": (None, "floating-point pixels (mode F)"),
    "32-bit pixels": (None, "32-bit integer pixels in 70000..70000"),
}


def _payloads(samples: dict[str, bytes]) -> dict[str, tuple[bytes, str]]:
    from PIL import Image

    built = {
        "truncated jpeg": truncated_jpeg(samples["astronaut.jpg"]),
        "float pixels": encode(Image.fromarray(np.full((4, 4), 0.5, np.float32)), "TIFF"),
        "32-bit pixels": encode(Image.fromarray(np.full((4, 4), 70_000, np.int32)), "TIFF"),
    }
    return {k: (v if v is not None else built[k], msg) for k, (v, msg) in BAD.items()}


@pytest.mark.parametrize("model", ["ssdlite", "fcos"])
def test_bad_requests_fail_alone_in_a_batch(model: str, server: TritonServer, samples: dict[str, bytes]) -> None:
    bad = _payloads(samples)
    good = list(samples.values())
    # interleave so the dynamic batcher hands good and bad requests to the same execute()
    blobs: list[bytes] = []
    expected: list[str | None] = []
    for i, (payload, msg) in enumerate(bad.values()):
        blobs += [good[i % len(good)], payload]
        expected += [None, msg]
    with DetectorClient(server.options.grpc_url, model) as client:
        results = client.detect_many(blobs, max_in_flight=len(blobs))
        for res, msg in zip(results, expected, strict=True):
            if msg is None:
                assert isinstance(res, Detections), res
            else:
                assert isinstance(res, ClientError) and msg in res.message, (msg, res)
                assert "internal error" not in res.message, res
        client.check_ready()  # the server and the model are still up
        assert isinstance(client.detect(good[0]), Detections)


def test_bad_image_inside_a_multi_image_request_names_its_position(server: TritonServer, samples: dict[str, bytes]) -> None:
    with DetectorClient(server.options.grpc_url, "ssdlite") as client:
        with pytest.raises(ClientError, match="image 2 of 3: empty image payload"):
            client.detect_batch([samples["astronaut.jpg"], b"", samples["chelsea.png"]])
        assert len(client.detect_batch([samples["astronaut.jpg"], samples["chelsea.png"]])) == 2


@pytest.mark.parametrize(
    "controls, fragment",
    [
        ({"score_threshold": 1.5}, "score_threshold must be in [0, 1]"),
        ({"iou_threshold": 0.0}, "iou_threshold must be in (0, 1]"),
        ({"max_det": 0}, "max_det must be in [1,"),
    ],
)
def test_out_of_range_controls_get_a_clear_error(
    controls: dict[str, float], fragment: str, server: TritonServer, samples: dict[str, bytes]
) -> None:
    with DetectorClient(server.options.grpc_url, "ssdlite") as client:
        with pytest.raises(ClientError) as e:
            client.detect(samples["astronaut.jpg"], **controls)  # type: ignore[arg-type]
        assert fragment in e.value.message
        assert isinstance(client.detect(samples["astronaut.jpg"]), Detections)


# --- unusual but valid images: the server decodes them exactly as the reference path does ---------

UNUSUAL = unusual_images()


def _served_spec(server: TritonServer, model: str) -> PreprocessSpec:
    """The spec of the served model, as the server loaded it (its own socket: the model-config API is
    closed on the public address of a server without an admin key)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.internal_url) as client:
        config = client.get_model_config(f"{model}_preprocess", as_json=True)["config"]
    return PreprocessSpec.from_json(config["parameters"]["preprocess_spec"]["string_value"])


@pytest.mark.parametrize("model", ["ssdlite", "fcos"])
def test_unusual_images_preprocess_bit_exact_with_the_reference(model: str, grpc_url: str, server: TritonServer) -> None:
    spec = _served_spec(server, model)
    with DetectorClient(grpc_url, model) as client:
        for name, blob in UNUSUAL.items():
            served, info = client.preprocessed(blob)
            ref = preprocess(decode_image(blob, spec.max_image_pixels), spec)
            assert served.shape == tuple(ref.tensor.shape), name
            assert np.array_equal(served, ref.tensor.numpy()), f"{name}: max diff {np.abs(served - ref.tensor.numpy()).max()}"
            assert np.array_equal(info, ref.info()), name
        # EXIF orientation 6 says "display rotated": the server still sees the stored 20x40
        assert tuple(client.preprocessed(UNUSUAL["EXIF-rotated jpeg"])[1][:2]) == (20, 40)
        results = client.detect_many(list(UNUSUAL.values()), max_in_flight=8)
    for name, res in zip(UNUSUAL, results, strict=True):
        assert isinstance(res, Detections), (name, res)


def test_elongated_image_fails_alone(grpc_url: str, samples: dict[str, bytes]) -> None:
    """1x1000 on a torchvision min/max resize: the short side would resize to 0 rows; refused clearly."""
    elongated = png_bytes(1000, 1)
    with DetectorClient(grpc_url, "fcos") as client:
        results = client.detect_many([samples["astronaut.jpg"], elongated, samples["chelsea.png"]], max_in_flight=3)
        assert isinstance(results[0], Detections) and isinstance(results[2], Detections)
        assert isinstance(results[1], ClientError), results[1]
        assert "aspect ratio" in results[1].message and "internal error" not in results[1].message
    with DetectorClient(grpc_url, "ssdlite") as client:  # a fixed-size model stretches it and serves it
        assert isinstance(client.detect(elongated), Detections)


# --- raw tensors of the wrong type or shape ------------------------------------------------------


@pytest.fixture
def triton(grpc_url: str) -> Iterator[Any]:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(grpc_url) as client:
        yield client


def _input(name: str, array: np.ndarray, datatype: str) -> Any:
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    return inp


def _image(blob: bytes) -> np.ndarray:
    return np.array([[blob]], dtype=np.object_)


def _refusal(triton: Any, model: str, inputs: list[Any]) -> tuple[str, str]:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as e:
        triton.infer(model, inputs)
    return str(e.value.status()), str(e.value.message())


ENSEMBLE_TENSORS = [
    (
        "IMAGE",
        np.zeros((1, 1), np.float32),
        "FP32",
        "inference input 'IMAGE' data-type is 'FP32', but model 'ssdlite' expects 'BYTES'",
    ),
    ("IMAGE", np.zeros((1, 1), np.uint8), "UINT8", "data-type is 'UINT8', but model 'ssdlite' expects 'BYTES'"),
    ("IMAGE", np.zeros((1, 48, 64, 3), np.uint8), "UINT8", "data-type is 'UINT8', but model 'ssdlite' expects 'BYTES'"),
    ("IMAGE", np.array([[b"a", b"b"]], dtype=np.object_), "BYTES", "Expected [-1,1], got [1,2]"),
    ("IMAGE", np.array([b"a"], dtype=np.object_), "BYTES", "Expected [-1,1], got [1]"),
    ("IMAGE", np.array([[b"a"]] * 9, dtype=np.object_), "BYTES", "batch-size must be <= 8"),
    ("IMAGE", np.zeros((0, 1), dtype=np.object_), "BYTES", "expected 1 string elements for inference input 'IMAGE'"),
    ("PIXELS", np.array([[b"a"]], dtype=np.object_), "BYTES", "unexpected inference input 'PIXELS' for model 'ssdlite'"),
]


@pytest.mark.parametrize("name, array, datatype, fragment", ENSEMBLE_TENSORS, ids=lambda v: v if isinstance(v, str) else None)
def test_ensemble_refuses_wrong_tensors(
    name: str, array: np.ndarray, datatype: str, fragment: str, triton: Any, samples: dict[str, bytes]
) -> None:
    status, message = _refusal(triton, "ssdlite", [_input(name, array, datatype)])
    assert "INVALID_ARGUMENT" in status and fragment in message, (status, message)
    good = triton.infer("ssdlite", [_input("IMAGE", _image(samples["astronaut.jpg"]), "BYTES")])
    assert int(good.as_numpy("num_detections")[0, 0]) > 0


CORE_TENSORS = [
    (
        "ssdlite_core",
        np.zeros((1, 3, 320, 320), np.float64),
        "FP64",
        "data-type is 'FP64', but model 'ssdlite_core' expects 'FP32'",
    ),
    (
        "ssdlite_core",
        np.zeros((1, 3, 320, 320), np.uint8),
        "UINT8",
        "data-type is 'UINT8', but model 'ssdlite_core' expects 'FP32'",
    ),
    ("ssdlite_core", np.zeros((1, 3, 320, 320), np.float16), "FP16", "data-type is 'FP16'"),
    ("ssdlite_core", np.zeros((1, 3, 100, 100), np.float32), "FP32", "Expected [-1,3,320,320], got [1,3,100,100]"),
    ("ssdlite_core", np.zeros((1, 320, 320, 3), np.float32), "FP32", "Expected [-1,3,320,320], got [1,320,320,3]"),
    ("ssdlite_core", np.zeros((3, 320, 320), np.float32), "FP32", "Expected [-1,3,320,320], got [3,320,320]"),
    ("fcos_core", np.zeros((1, 4, 64, 64), np.float32), "FP32", "Expected [-1,3,-1,-1], got [1,4,64,64]"),
]


@pytest.mark.parametrize("model, array, datatype, fragment", CORE_TENSORS, ids=lambda v: v if isinstance(v, str) else None)
def test_core_model_refuses_wrong_tensors(model: str, array: np.ndarray, datatype: str, fragment: str, triton: Any) -> None:
    status, message = _refusal(triton, model, [_input("images", array, datatype)])
    assert "INVALID_ARGUMENT" in status and fragment in message, (status, message)
    shape = (1, 3, 320, 320) if model == "ssdlite_core" else (1, 3, 64, 64)
    good = triton.infer(model, [_input("images", np.zeros(shape, np.float32), "FP32")])
    assert good.as_numpy("cls_logits").shape[0] == 1


def test_core_shape_that_onnxruntime_refuses_fails_alone(triton: Any) -> None:
    """[1, 3, 0, 5] passes Triton's dims [3, -1, -1]; ONNX Runtime refuses it; same-time requests still run."""
    good = np.random.default_rng(0).standard_normal((1, 3, 64, 96)).astype(np.float32)
    expected = triton.infer("fcos_core", [_input("images", good, "FP32")]).as_numpy("cls_logits")
    arrays = [good, np.zeros((1, 3, 0, 5), np.float32)] * 6
    results: list[Any] = [None] * len(arrays)
    done = threading.Semaphore(0)

    def callback(i: int, result: Any, error: Any) -> None:
        results[i] = error if error is not None else result
        done.release()

    for i, array in enumerate(arrays):
        triton.async_infer(
            "fcos_core", [_input("images", array, "FP32")], callback=lambda result, error, i=i: callback(i, result, error)
        )
    for _ in arrays:
        done.acquire()
    for i, res in enumerate(results):
        if i % 2 == 0:
            assert np.array_equal(res.as_numpy("cls_logits"), expected), i
        else:
            assert "Invalid input shape: {0,5}" in str(res.message()), res
    assert triton.is_model_ready("fcos_core") and triton.is_server_live()


@pytest.mark.parametrize(
    "model, name, datatype, shape, content, fragment",
    [
        ("ssdlite_core", "images", "FP32", [1, 3, 320, 320], b"\0" * 12, "input byte size mismatch for input 'images'"),
        (
            "ssdlite",
            "IMAGE",
            "BYTES",
            [1, 1],
            b"\xff\xff\x00\x00abc",
            "expecting string of length 65535 but only 3 bytes available",
        ),
        ("ssdlite", "IMAGE", "BYTES", [1, 1], b"\x01\x00", "incomplete string length indicator for inference input 'IMAGE'"),
        ("ssdlite", "IMAGE", "BYTES", [2, 1], b"\x03\x00\x00\x00abc", "expected 2 string elements for inference input 'IMAGE'"),
        ("ssdlite", "IMAGE", "BYTES", [1, 1], None, "unable to find data for input tensor 'IMAGE'"),
    ],
    ids=["short FP32 content", "BYTES length past the end", "BYTES length cut", "fewer BYTES elements", "no content"],
)
def test_malformed_raw_grpc_requests_are_refused(
    model: str, name: str, datatype: str, shape: list[int], content: bytes | None, fragment: str, grpc_url: str, triton: Any
) -> None:
    """What tritonclient cannot send: raw contents that disagree with the declared tensor."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = name, datatype
    tensor.shape.extend(shape)
    if content is not None:
        request.raw_input_contents.append(content)
    with grpc.insecure_channel(grpc_url) as channel, pytest.raises(grpc.RpcError) as e:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in e.value.details(), e.value.details()
    assert triton.is_server_live() and triton.is_model_ready(model)


def test_a_bad_image_is_invalid_argument_not_internal(grpc_url: str) -> None:
    """The request's fault gets gRPC INVALID_ARGUMENT (clients never retry it); only bugs are INTERNAL."""
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[b"garbage"]], dtype=np.object_))
    with grpcclient.InferenceServerClient(grpc_url) as client, pytest.raises(Exception) as info:
        client.infer("ssdlite", [inp])
    assert "INVALID_ARGUMENT" in str(info.value.status()) and "not a decodable image" in info.value.message()


@pytest.mark.parametrize(
    "params, fragment",
    [
        (
            {"score_thresh": "0.3"},
            "unknown request parameter(s) 'score_thresh': accepted are score_threshold, iou_threshold, max_det",
        ),
        ({"conf": "0.3", "max_det": 5}, "unknown request parameter(s) 'conf'"),
        ({"max_det": "3.5"}, "max_det must be an integer, got '3.5'"),
    ],
    ids=["spec field name", "another library's name", "fractional max_det"],
)
def test_unknown_or_mistyped_parameters_are_refused_over_grpc_and_http(
    params: dict[str, Any], fragment: str, server: TritonServer, samples: dict[str, bytes]
) -> None:
    """A misspelt control returned every detection with no error; a client in another language could not notice."""
    import http.client
    import json
    import struct

    import tritonclient.grpc as grpcclient

    blob = samples["astronaut.jpg"]
    inp = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[blob]], dtype=np.object_))
    with grpcclient.InferenceServerClient(server.options.grpc_url) as client, pytest.raises(Exception) as info:
        client.infer("ssdlite", [inp], parameters=params)
    assert "INVALID_ARGUMENT" in str(info.value.status()) and fragment in info.value.message(), info.value.message()

    # HTTP with the binary-data extension (parameters are strings or ints there)
    element = struct.pack("<I", len(blob)) + blob
    header = json.dumps(
        {"inputs": [{"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": len(element)}}],
         "parameters": params}
    ).encode()  # fmt: skip
    conn = http.client.HTTPConnection(server.options.host, server.options.http_port, timeout=60)
    conn.request("POST", "/v2/models/ssdlite/infer", header + element, {"Inference-Header-Content-Length": str(len(header))})
    response = conn.getresponse()
    body = response.read().decode(errors="replace")
    conn.close()
    assert response.status == 400 and fragment in body, (response.status, body)


def test_tritonclient_http_without_named_outputs_is_served(server: TritonServer, samples: dict[str, bytes]) -> None:
    """tritonclient's HTTP client adds the request parameter binary_data_output when no outputs are named: accepted."""
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("IMAGE", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[samples["astronaut.jpg"]]], dtype=np.object_), binary_data=True)
    with httpclient.InferenceServerClient(f"{server.options.host}:{server.options.http_port}") as client:
        result = client.infer("ssdlite", [inp], parameters={"score_threshold": "0.3", "max_det": 7})
    assert 0 < int(result.as_numpy("num_detections")[0][0]) <= 7
