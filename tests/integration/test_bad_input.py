"""Bad input on the live server: each bad request fails alone with a clear error; the rest succeed."""

from __future__ import annotations

import pytest

from clients.grpc_client import Detections, DetectorClient
from detserve.errors import ClientError
from detserve.server import TritonServer
from tests.bad_images import NOT_AN_IMAGE, bomb_png, truncated_jpeg

BAD = {
    "not an image": (NOT_AN_IMAGE, "not a decodable image"),
    "truncated jpeg": (None, "pixel data"),
    "empty payload": (b"", "empty image payload"),
    "declared too large": (bomb_png(10_000, 10_000), "over the limit of 20000000"),
}


def _payloads(samples: dict[str, bytes]) -> dict[str, tuple[bytes, str]]:
    return {k: (v if v is not None else truncated_jpeg(samples["astronaut.jpg"]), msg) for k, (v, msg) in BAD.items()}


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
