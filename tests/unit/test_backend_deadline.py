"""Dropping abandoned requests in the python-backend models: deadlines from request parameters.

The request and ``pb_utils`` stand-ins below only carry what Triton's own objects expose
(``is_cancelled()``, ``parameters()`` as JSON, ``TritonError`` codes); the end-to-end case runs
against a real server in tests/integration/test_hardening.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from detserve.errors import DetserveError, ImageError
from detserve.runtime.backend.common import (
    Abandoned,
    check_wanted,
    error_response,
    grpc_timeout_seconds,
    request_deadline,
    respond_each,
)

NOW = 1_800_000_000.0


@dataclass
class Request:
    params: dict[str, Any] = field(default_factory=dict)
    cancelled: bool = False

    def is_cancelled(self) -> bool:
        return self.cancelled

    def parameters(self) -> str:
        return json.dumps(self.params)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("300m", 0.3), ("2S", 2.0), ("1M", 60.0), ("1H", 3600.0), ("1500000u", 1.5), ("99999999n", 0.099999999)],
)
def test_grpc_timeout_header_values(text: str, seconds: float) -> None:
    assert grpc_timeout_seconds(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "m", "300", "3.5S", "-1S", "300x", "123456789S"])
def test_malformed_grpc_timeout_is_ignored(text: str) -> None:
    assert grpc_timeout_seconds(text) is None


def test_deadline_from_client_or_gate_the_earlier_wins() -> None:
    assert request_deadline({}) is None
    assert request_deadline({"detserve_deadline": NOW + 1}) == NOW + 1
    assert request_deadline({"detserve_deadline": str(NOW + 1)}) == NOW + 1
    gate = {"detserve-arrival": f"{NOW:.3f}", "detserve-timeout": "300m"}
    assert request_deadline(gate) == pytest.approx(NOW + 0.3)
    assert request_deadline({**gate, "detserve_deadline": NOW + 0.1}) == pytest.approx(NOW + 0.1)
    assert request_deadline({**gate, "detserve_deadline": NOW + 5}) == pytest.approx(NOW + 0.3)


@pytest.mark.parametrize(
    "params",
    [
        {"detserve_deadline": "soon"},
        {"detserve_deadline": True},
        {"detserve_deadline": "nan"},
        {"detserve-arrival": "x", "detserve-timeout": "1S"},
        {"detserve-arrival": NOW, "detserve-timeout": "1 second"},
        {"detserve-timeout": "1S"},  # no arrival: nothing to count from
    ],
)
def test_unreadable_deadline_never_drops(params: dict[str, Any]) -> None:
    assert request_deadline(params) is None
    check_wanted(Request(params), now=NOW + 1e6)


def test_check_wanted_drops_cancelled_and_late_requests_only() -> None:
    check_wanted(Request(), now=NOW)
    check_wanted(Request({"detserve_deadline": NOW + 0.5}), now=NOW)
    with pytest.raises(Abandoned, match="deadline"):
        check_wanted(Request({"detserve_deadline": NOW - 0.5}), now=NOW)
    with pytest.raises(Abandoned, match="cancelled"):
        check_wanted(Request(cancelled=True), now=NOW)


class _Error:
    CANCELLED, INVALID_ARG, INTERNAL = "CANCELLED", "INVALID_ARG", "INTERNAL"

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        self.message, self.code = message, code


PB_UTILS = SimpleNamespace(TritonError=_Error, InferenceResponse=lambda error: SimpleNamespace(error=error))


def test_abandoned_request_answers_cancelled_and_the_batch_goes_on() -> None:
    late = Request({"detserve_deadline": 0.0})

    def handle(request: Request) -> str:
        check_wanted(request)
        if request.params.get("bad"):
            raise ImageError("not an image")
        return "ok"

    responses = respond_each(PB_UTILS, [Request(), late, Request({"bad": True})], handle)
    assert responses[0] == "ok"
    assert responses[1].error.code == "CANCELLED" and "deadline" in responses[1].error.message
    assert responses[2].error.code == "INVALID_ARG"
    assert error_response(PB_UTILS, Abandoned("x")).error.code == "CANCELLED"


def test_http_forwarded_headers_arrive_as_strings() -> None:
    # Triton's HTTP front end forwards headers matching --http-header-forward-pattern as string
    # parameters (checked with 2.51 over HTTP, tests/integration/test_request_budget.py); nginx's
    # $msec has milliseconds; a client's JSON "parameters" may be an int, a float or a string
    stamped = {"detserve-arrival": "1800000000.250", "detserve-timeout": "1500m"}
    assert request_deadline(stamped) == pytest.approx(NOW + 1.75)
    for own in (int(NOW), NOW + 0.5, str(NOW)):
        assert request_deadline({"detserve_deadline": own}) == pytest.approx(float(own))
    with pytest.raises(Abandoned, match=r"deadline exceeded: the client's deadline passed 3\.2 s before"):
        check_wanted(Request(stamped), now=NOW + 4.95)


SPEC_ARGS = {"model_config": json.dumps({"name": "m_preprocess", "parameters": {"preprocess_spec": {"string_value": "{}"}}})}


def test_server_override_replaces_the_built_pixel_budget() -> None:
    from detserve.runtime.backend.common import MAX_REQUEST_PIXELS_ENV, preprocess_spec

    assert preprocess_spec(SPEC_ARGS, {}).max_request_pixels == 64_000_000  # the build's (default) value
    assert preprocess_spec(SPEC_ARGS, {MAX_REQUEST_PIXELS_ENV: " 1000 "}).max_request_pixels == 1000
    for bad in ("0", "-5", "1e6", "lots"):
        with pytest.raises(DetserveError, match=MAX_REQUEST_PIXELS_ENV):
            preprocess_spec(SPEC_ARGS, {MAX_REQUEST_PIXELS_ENV: bad})


def test_late_request_is_dropped_before_its_headers_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """The preprocess model: a late request over the budget answers CANCELLED (deadline), not the budget error."""
    import sys

    import numpy as np

    from tests.bad_images import bomb_png

    blobs = np.array([[bomb_png(6000, 6000)]] * 8, dtype=np.object_)
    pb = SimpleNamespace(
        **vars(PB_UTILS), get_input_tensor_by_name=lambda r, n: SimpleNamespace(as_numpy=lambda: blobs) if n == "IMAGE" else None
    )
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.delitem(sys.modules, "detserve.runtime.backend.preprocess_model", raising=False)
    import detserve.runtime.backend.preprocess_model as preprocess_model

    monkeypatch.setattr(preprocess_model, "tune_stub_malloc", lambda: None)  # a stub's setting, not pytest's
    model = preprocess_model.TritonPythonModel()
    model.initialize(SPEC_ARGS)
    late, in_time = Request({"detserve_deadline": 1.0}), Request()
    responses = model.execute([late, in_time])
    assert responses[0].error.code == "CANCELLED" and "deadline exceeded" in responses[0].error.message
    assert responses[1].error.code == "INVALID_ARG" and "per-request budget of 64000000" in responses[1].error.message
