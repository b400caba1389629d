"""EarlySender (runtime/backend/common.py): the pre-processing step's responses go out one by one.

The stand-ins carry only what Triton's python backend exposes for this (``get_response_sender().send(response,
flags=...)``, ``TRITONSERVER_RESPONSE_COMPLETE_FINAL``, ``Logger``); every integration test that serves a model
runs the real thing, since every ensemble's first step answers this way.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from detserve.errors import ImageError
from detserve.runtime.backend.common import EarlySender


class _Error:
    INVALID_ARG, CANCELLED = "INVALID_ARG", "CANCELLED"

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        self.message, self.code = message, code


def _pb(warnings: list[str], early: bool = True) -> SimpleNamespace:
    pb = SimpleNamespace(
        InferenceResponse=lambda output_tensors=None, error=None: {"out": output_tensors, "error": error},
        TritonError=_Error,
        Logger=SimpleNamespace(log_warn=warnings.append),
    )
    if early:
        pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    return pb


class _Request:
    def __init__(self, name: str, sent: list[tuple[str, Any]], refuse: str | None = None) -> None:
        self.name, self.sent, self.refuse = name, sent, refuse

    def get_response_sender(self) -> Any:
        def send(response: Any, flags: int) -> None:
            if self.refuse:
                raise RuntimeError(self.refuse)
            assert flags == 1
            self.sent.append((self.name, response))

        return SimpleNamespace(send=send)


def _handle(request: _Request) -> Any:
    if request.name == "bad":
        raise ImageError("not an image")
    return [request.name]


def test_each_response_is_sent_as_it_is_made_and_a_bad_request_fails_alone() -> None:
    sent: list[tuple[str, Any]] = []
    order: list[str] = []
    sender = EarlySender(_pb([]))

    def handle(request: _Request) -> Any:
        order.append(f"handle {request.name} after {len(sent)} sent")
        return _handle(request)

    assert sender.execute([_Request(n, sent) for n in ("a", "bad", "c")], handle) is None
    assert order == ["handle a after 0 sent", "handle bad after 1 sent", "handle c after 2 sent"]
    assert [n for n, _ in sent] == ["a", "bad", "c"]
    assert sent[0][1] == ["a"] and sent[2][1] == ["c"]
    assert sent[1][1]["error"].code == "INVALID_ARG" and "not an image" in sent[1][1]["error"].message


def test_a_backend_that_cannot_send_early_gets_the_list() -> None:
    sent: list[tuple[str, Any]] = []
    warnings: list[str] = []
    sender = EarlySender(_pb(warnings))
    refusing = "Unable to send response. Response sender has no reference to the decoupled state of the model."
    out = sender.execute([_Request("a", sent, refusing), _Request("bad", sent, refusing)], _handle)
    assert sent == [] and out is not None and out[0] == ["a"] and out[1]["error"].code == "INVALID_ARG"
    assert sender.works is False and len(warnings) == 1 and "cannot send early" in warnings[0]  # said, once
    assert sender.execute([_Request("c", sent)], _handle) == [["c"]]  # stays on the list
    no_constant = EarlySender(_pb([], early=False))  # an older pb_utils: the list from the start
    assert no_constant.execute([_Request("d", sent)], _handle) == [["d"]] and sent == []


def test_one_response_that_cannot_be_sent_does_not_stop_the_others() -> None:
    sent: list[tuple[str, Any]] = []
    warnings: list[str] = []
    sender = EarlySender(_pb(warnings))
    assert sender.execute([_Request("a", sent)], _handle) is None  # works: later refusals are per request
    assert sender.execute([_Request("b", sent, "client gone"), _Request("c", sent)], _handle) is None
    assert [n for n, _ in sent] == ["a", "c"] and len(warnings) == 1 and "client gone" in warnings[0]


@pytest.mark.parametrize("first_refused", [True, False])
def test_the_first_send_decides_only_once(first_refused: bool) -> None:
    sent: list[tuple[str, Any]] = []
    sender = EarlySender(_pb([]))
    out = sender.execute([_Request("a", sent, "no" if first_refused else None), _Request("b", sent)], _handle)
    assert (out is not None) is first_refused and sender.works is (not first_refused)
