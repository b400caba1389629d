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

from detserve.errors import ImageError
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
