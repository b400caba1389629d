"""What a canary reads from each target's own Prometheus endpoint (``ops/canary.py``): one model's counters.

Each target's metrics endpoint is the one its server names (``fleet.describe``: per replica), so a
replica's counters are that replica's, never the balanced pool's.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from detserve.ops.fleet import Target, describe

_LINE = re.compile(r"^(nv_inference_[a-z_]+)\{([^}]*)\}\s+(\S+)$", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="([^"]*)"')
P99 = "0.99"
_REQUESTS = ("nv_inference_request_success", "nv_inference_request_failure")


@dataclass(frozen=True)
class Sample:
    """One model's cumulative counters on one target (summed over its versions), and its p99 now."""

    success: float
    failure: float
    request_us: float  # nv_inference_request_duration_us: queue + compute of every request, cumulative
    p99_us: float | None  # nv_inference_request_summary_us{quantile="0.99"}: the last minute's (a sliding summary)
    # requests the ensemble's first step received. Failed ensemble requests over a window are its increase minus
    # the successes': Triton 2.51 adds a failed ensemble request to the ensemble's nv_inference_request_failure
    # once more per failing step (measured: 3 failed requests counted 6; upstream's own test expects 2 per
    # failure), and counts a step's error *responses* as its successes (triton-inference-server/server#7713)
    received: float | None = None


def parse_sample(text: str, model: str, entry: str | None = None) -> Sample:
    """``model``'s counters, and with ``entry`` (the ensemble's first step) how many requests that step received."""
    sums = {"nv_inference_request_success": 0.0, "nv_inference_request_failure": 0.0, "nv_inference_request_duration_us": 0.0}
    received = 0.0
    p99: list[float] = []
    for name, labels, value in _LINE.findall(text):
        tags = dict(_LABEL.findall(labels))
        if entry is not None and tags.get("model") == entry and name in _REQUESTS:
            received += float(value)
        if tags.get("model") != model:
            continue
        if name in sums:
            sums[name] += float(value)
        elif name == "nv_inference_request_summary_us" and tags.get("quantile") == P99 and value.lower() != "nan":
            p99.append(float(value))
    return Sample(
        sums["nv_inference_request_success"],
        sums["nv_inference_request_failure"],
        sums["nv_inference_request_duration_us"],
        max(p99) if p99 else None,
        received if entry is not None else None,
    )


def read_sample(url: str | None, model: str, entry: str | None = None, timeout_s: float = 10.0) -> Sample | str:
    """The model's counters at ``url``, or why they could not be read."""
    if url is None:
        return "the server names no metrics endpoint for it"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:
            return parse_sample(answer.read().decode("utf-8", "replace"), model, entry)
    except (OSError, urllib.error.URLError) as e:
        return f"{url}: {e}"


def metrics_urls(fleet: Sequence[Target]) -> list[str | None]:
    """Each target's metrics endpoint, as its server names it (one ``describe`` per URL)."""
    infos = {url: describe(url) for url in {t.url for t in fleet}}
    out: list[str | None] = []
    for t in fleet:
        info = infos[t.url]
        urls = info.metrics_urls(t.url) if info is not None else []
        index = t.replica if t.replica is not None else 0
        out.append(urls[index] if index < len(urls) else None)
    return out
