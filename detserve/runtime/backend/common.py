"""What every detserve python-backend model shares: config parameters, per-request errors, and
dropping requests nobody waits for any more.

Abandoned requests: Triton 2.51 cancels an ensemble request when its gRPC client cancels or its
deadline passes, and checks that between ensemble steps (core PR #263), so the core and
post-processing steps of a cancelled request are rejected by Triton's own scheduler. The *first*
step never learns of it: its request was created before the cancellation, and
``request.is_cancelled()`` stays false there (server issue #6739; checked here with 2.51: ten 60 MB
requests whose 1 s deadline had passed were all still decoded). So besides ``is_cancelled()`` the
preprocess step reads the client's deadline from request parameters (``request_deadline``):
``detserve_deadline`` (seconds since the epoch, set by the client), or ``detserve-arrival`` +
``detserve-timeout`` (the arrival time and the client's ``grpc-timeout`` header, stamped by a
gate in front of Triton and forwarded as parameters with ``--grpc-header-forward-pattern``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from detserve.errors import DetserveError

if TYPE_CHECKING:
    from detserve.specs import PreprocessSpec

DEADLINE_PARAMETER = "detserve_deadline"
ARRIVAL_PARAMETER = "detserve-arrival"
TIMEOUT_PARAMETER = "detserve-timeout"
# the per-request pixel budget set by the server (detserve serve --max-request-pixels), over the build's
MAX_REQUEST_PIXELS_ENV = "DETSERVE_MAX_REQUEST_PIXELS"
# gRPC's wire format for grpc-timeout: up to 8 digits and a unit (gRPC over HTTP2, "Timeout")
_GRPC_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


class Abandoned(Exception):
    """The client cancelled the request or its deadline passed: answer CANCELLED, do no work."""


def grpc_timeout_seconds(text: str) -> float | None:
    """A ``grpc-timeout`` header value ("300m", "2S") in seconds; None when it is not one."""
    text = text.strip()
    if len(text) < 2 or not text[:-1].isdigit() or len(text) > 9 or text[-1] not in _GRPC_TIMEOUT_UNITS:
        return None
    return int(text[:-1]) * _GRPC_TIMEOUT_UNITS[text[-1]]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def request_deadline(params: Mapping[str, Any]) -> float | None:
    """The client's deadline (seconds since the epoch) from request parameters, or None.

    The earlier of the client's own ``detserve_deadline`` and the gate's arrival + grpc-timeout.
    A value that cannot be read is ignored: a deadline only ever drops work, it never fails a request.
    """
    deadlines = []
    if (own := _number(params.get(DEADLINE_PARAMETER))) is not None:
        deadlines.append(own)
    arrival = _number(params.get(ARRIVAL_PARAMETER))
    timeout = params.get(TIMEOUT_PARAMETER)
    if arrival is not None and isinstance(timeout, str) and (seconds := grpc_timeout_seconds(timeout)) is not None:
        deadlines.append(arrival + seconds)
    return min(deadlines, default=None)


def request_parameters(request: Any) -> dict[str, Any]:
    """``request``'s parameters; an unknown name or a control of the wrong type is its error (specs.request_controls).

    The first step checks them, so a misspelt control fails before any image is decoded."""
    from detserve.specs import request_controls

    params: dict[str, Any] = json.loads(request.parameters() or "{}")
    request_controls(params)
    return params


def check_wanted(request: Any, params: Mapping[str, Any] | None = None, now: float | None = None) -> None:
    """Raise :class:`Abandoned` when nobody waits for ``request`` any more (call before expensive work)."""
    if request.is_cancelled():
        raise Abandoned("request cancelled by the client")
    deadline = request_deadline(json.loads(request.parameters() or "{}") if params is None else params)
    if deadline is None:
        return
    late = (now if now is not None else time.time()) - deadline
    if late > 0:
        raise Abandoned(
            f"deadline exceeded: the client's deadline passed {late:.1f} s before processing started; dropped undecoded"
        )


def preprocess_spec(args: dict[str, Any], environ: Mapping[str, str] | None = None) -> PreprocessSpec:
    """The model's stored ``preprocess_spec``, its pixel budget replaced by the server's override.

    ``detserve serve --max-request-pixels N`` puts N in tritonserver's environment, which its python
    stubs inherit (in a container: set the variable in the container's environment). An override
    that is not a positive integer fails the model's load: a typo must not silently keep the default.
    """
    import dataclasses
    import os

    from detserve.specs import PreprocessSpec

    spec = PreprocessSpec.from_json(config_parameter(args, "preprocess_spec"))
    raw = (os.environ if environ is None else environ).get(MAX_REQUEST_PIXELS_ENV, "").strip()
    if not raw:
        return spec
    if not raw.isdigit() or int(raw) <= 0:
        raise DetserveError(f"{MAX_REQUEST_PIXELS_ENV}={raw!r} is not a positive number of pixels")
    return dataclasses.replace(spec, max_request_pixels=int(raw))


def config_parameter(args: dict[str, Any], key: str, default: str | None = None) -> str:
    """A ``parameters { key: ... string_value }`` entry of the model's config (``default`` for
    settings added after a repository was built)."""
    config = json.loads(args["model_config"])
    try:
        return str(config["parameters"][key]["string_value"])
    except KeyError as e:
        if default is not None:
            return default
        raise DetserveError(f"model {config.get('name')!r} has no config parameter {key!r}") from e


# glibc mallopt parameters (malloc.h) and the stubs' values: the steady state glibc's dynamic
# threshold reaches by itself (mmap above 32 MiB, trim when 64 MiB are free at the heap's top)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
STUB_MMAP_THRESHOLD = 32 * 2**20
STUB_TRIM_THRESHOLD = 64 * 2**20


def tune_stub_malloc() -> None:
    """Give this stub heap-friendly malloc thresholds again (call once, from ``initialize``).

    The stubs inherit tritonserver's environment, whose 64 KiB ``MALLOC_MMAP_THRESHOLD_`` lets
    tritonserver return request buffers (detserve.ops.embedded.server_environment). Here it would map
    and fault in every MB-sized tensor of every request: serving ran ~35% slower on 2 cores. The
    stubs' large buffers (encoded images, decoded pixels) are above 32 MiB and still mapped.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, STUB_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, STUB_TRIM_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: nothing inherited to undo
        return


def release_free_heap() -> None:
    """Hand the heap glibc keeps free back to the system (call once, at the end of ``initialize``).

    Building an onnxruntime session parses the whole ONNX file and copies its weights; the parse's
    buffers are freed but stay in the heap below the stubs' 64 MiB trim threshold (``tune_stub_malloc``)
    and were never reused: a ResNet50-FPN core stub (128 MB file) held 344 MB after its session was
    built and 129 MB after ``malloc_trim`` (419 vs 236 MB after a few runs, same CPU per image).
    """
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return


def apply_torch_threads(args: dict[str, Any]) -> None:
    """Limit torch's intra-op threads in this stub process (config parameter ``torch_threads``)."""
    import torch

    config = json.loads(args["model_config"])
    raw = config.get("parameters", {}).get("torch_threads", {}).get("string_value", "0")
    if int(raw) > 0:
        torch.set_num_threads(int(raw))


def error_response(pb_utils: Any, exc: BaseException) -> Any:
    """One failed request -> its own error response; the rest of the batch is unaffected."""
    if isinstance(exc, Abandoned):  # nobody reads it: CANCELLED, as Triton answers for its own drops
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.CANCELLED))
    # a bug (not a DetserveError) keeps its type so it can be found in the logs
    if isinstance(exc, DetserveError):  # the request's fault: INVALID_ARGUMENT, never retried by clients
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"internal error: {type(exc).__name__}: {exc}"))


def respond_each(pb_utils: Any, requests: Sequence[Any], handle: Callable[[Any], Any]) -> list[Any]:
    """Run ``handle`` per request, turning each failure into that request's error response."""
    responses = []
    for request in requests:
        try:
            responses.append(handle(request))
        except Exception as e:
            responses.append(error_response(pb_utils, e))
    return responses


class EarlySender:
    """Each request's response handed to Triton as soon as it is made, not with its batch's last one.

    The pre-processing decodes a batch image by image; returning the responses together kept every
    request waiting for the batch's slowest image while the core had nothing to run (quiet A/B on 2
    cores, docs/performance.md: sent early, 1.20x the requests and 1.04x per CPU-second). Sending
    through each request's response sender keeps the dynamic batcher, and with it
    the queue bound and timeouts (ServingOptions.max_queue_size), while the next step starts on each
    request as it comes. A python backend without response senders in non-decoupled models (before
    Triton 24.xx) refuses the first send; nothing has been sent then, and this instance answers the
    batch the old way from there on.
    """

    def __init__(self, pb_utils: Any) -> None:
        self.pb_utils = pb_utils
        self.works: bool | None = None if hasattr(pb_utils, "TRITONSERVER_RESPONSE_COMPLETE_FINAL") else False

    def execute(self, requests: Sequence[Any], handle: Callable[[Any], Any]) -> list[Any] | None:
        """``respond_each``'s answers, sent one by one (returns None) where the backend can."""
        if self.works is False:
            return respond_each(self.pb_utils, requests, handle)
        final = self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for i, request in enumerate(requests):
            try:
                response = handle(request)
            except Exception as e:
                response = error_response(self.pb_utils, e)
            try:
                request.get_response_sender().send(response, flags=final)
            except Exception as e:
                if self.works is None and i == 0:  # this backend cannot: nothing sent yet, answer as before
                    self.works = False
                    self.pb_utils.Logger.log_warn(f"detserve: responses go back per batch (cannot send early: {e})")
                    return [response, *respond_each(self.pb_utils, requests[1:], handle)]
                # this request only (its client is gone, say): the others are answered all the same
                self.pb_utils.Logger.log_warn(f"detserve: a response could not be sent: {type(e).__name__}: {e}")
                continue
            self.works = True
        return None


def group_by(keys: Sequence[Any]) -> dict[Any, list[int]]:
    """Indices grouped by key, in first-seen order (requests of one shape run together)."""
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def run_grouped(
    pb_utils: Any,
    parsed: Mapping[int, Any],
    key: Callable[[Any], Any],
    run: Callable[[list[Any]], Sequence[Any]],
    respond: Callable[[Any], Any],
    responses: list[Any],
) -> list[Any]:
    """Run the parsed requests (index -> request) one batch per ``key`` (e.g. the padded size) and
    fill ``responses[index]``: ``run`` returns one result per member, ``respond`` makes its
    response; a batch that fails answers the error to its members only, the other batches still run."""
    indices = list(parsed)
    for _, idxs in group_by([key(parsed[i]) for i in indices]).items():
        members = [indices[j] for j in idxs]
        try:
            results = run([parsed[i] for i in members])
        except Exception as e:
            for i in members:
                responses[i] = error_response(pb_utils, e)
            continue
        for i, result in zip(members, results, strict=True):
            responses[i] = respond(result)
    return responses


def run_per_image(
    pb_utils: Any,
    parsed: Mapping[int, Any],
    key: Callable[[Any, int], Any],
    run: Callable[[list[tuple[Any, int]]], Sequence[Any]],
    respond: Callable[[Any, list[Any]], Any],
    responses: list[Any],
) -> list[Any]:
    """Like ``run_grouped``, image by image (runtime/canvas.py): every image of the parsed requests
    (index -> request with ``n`` images) joins the batch of its ``key(request, j)`` (its canvas,
    its inputs' shapes), whatever request it came in; ``run`` gets ``(request, j)`` pairs and returns
    one result per image; ``respond(request, results)`` makes a request's response from its images'
    results, in order. A batch that fails fails every request with an image in it, no other."""
    images = [(i, j) for i, p in parsed.items() for j in range(p.n)]
    results: dict[int, list[Any]] = {i: [None] * p.n for i, p in parsed.items()}
    failed: dict[int, BaseException] = {}
    for _, idxs in group_by([key(parsed[i], j) for i, j in images]).items():
        members = [images[k] for k in idxs if images[k][0] not in failed]
        if not members:
            continue
        try:
            outs = run([(parsed[i], j) for i, j in members])
        except Exception as e:
            failed.update((i, e) for i, _ in members)
            continue
        for (i, j), out in zip(members, outs, strict=True):
            results[i][j] = out
    for i, p in parsed.items():
        try:
            responses[i] = error_response(pb_utils, failed[i]) if i in failed else respond(p, results[i])
        except Exception as e:
            responses[i] = error_response(pb_utils, e)
    return responses


def detections_response(pb_utils: Any, per_image: Sequence[Mapping[str, Any]], names: Sequence[str]) -> Any:
    """One request's response: each named output stacked over the request's images."""
    import numpy as np

    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, np.stack([d[n] for d in per_image])) for n in names])
