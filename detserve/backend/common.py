"""What every detserve python-backend model shares: config parameters and per-request errors."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from detserve.errors import DetserveError


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


def apply_torch_threads(args: dict[str, Any]) -> None:
    """Limit torch's intra-op threads in this stub process (config parameter ``torch_threads``)."""
    import torch

    config = json.loads(args["model_config"])
    raw = config.get("parameters", {}).get("torch_threads", {}).get("string_value", "0")
    if int(raw) > 0:
        torch.set_num_threads(int(raw))


def error_response(pb_utils: Any, exc: BaseException) -> Any:
    """One failed request -> its own error response; the rest of the batch is unaffected."""
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


def group_by(keys: Sequence[Any]) -> dict[Any, list[int]]:
    """Indices grouped by key, in first-seen order (requests of one shape run together)."""
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups
