"""Per-stream figures: source FPS, processed FPS, dropped, latency p50/p99 (capture -> answer),
reconnects; as a rich table (printed live), Prometheus text (``/metrics``) and report rows.

Memory stays flat over any run: latencies go into fixed log-spaced buckets (p50/p99 within 2%),
rates come from per-second counts of the last few seconds, and the timeline for the plot keeps one
point per second up to a cap, halving its resolution when full.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

_BUCKETS = 600  # 1.02^600 ms ~ 146 s: every latency below it lands in a bucket 2% wide
_GROWTH = 1.02
RATE_WINDOW_S = 5
TIMELINE_CAP = 3600


class LatencyHistogram:
    """Latencies in ms, in fixed buckets (bounded memory); quantiles to within a bucket's 2%."""

    def __init__(self) -> None:
        self.counts = [0] * (_BUCKETS + 1)
        self.n = 0
        self.max_ms = 0.0

    def add(self, ms: float) -> None:
        i = 0 if ms <= 1.0 else min(_BUCKETS, int(math.log(ms) / math.log(_GROWTH)) + 1)
        self.counts[i] += 1
        self.n += 1
        self.max_ms = max(self.max_ms, ms)

    def quantile(self, q: float) -> float | None:
        if not self.n:
            return None
        rank, seen = q * self.n, 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                # the bucket's upper edge (never above the largest seen): conservative, like Prometheus
                return min(self.max_ms, 1.0 if i == 0 else _GROWTH**i)
        return self.max_ms


class _Rate:
    """Events per second over the last ``RATE_WINDOW_S`` whole seconds."""

    def __init__(self) -> None:
        self._seconds: deque[list[int]] = deque(maxlen=RATE_WINDOW_S + 1)

    def tick(self, now: float) -> None:
        sec = int(now)
        if not self._seconds or self._seconds[-1][0] != sec:
            self._seconds.append([sec, 0])
        self._seconds[-1][1] += 1

    def per_second(self, now: float) -> float:
        sec = int(now)
        done = [c for s, c in self._seconds if sec - RATE_WINDOW_S <= s < sec]
        return sum(done) / RATE_WINDOW_S if done else 0.0


@dataclass
class StreamStats:
    """Counters of one stream; written by its threads (ints: each += under the GIL is one owner's)."""

    stream: str
    source: str
    live: bool = False
    stall_s: float = 0.0  # this stream's own stall limit where its source needs more than --stall (HLS segments)
    read: int = 0  # frames decoded
    sampled_out: int = 0  # frames skipped by --max-fps (not drops: asked for)
    sent: int = 0
    answered: int = 0
    failed: int = 0
    first_error: str | None = None  # the first failed request's reason (every one is in the JSONL)
    decode_errors: int = 0
    reconnects: int = 0
    stalls: int = 0
    dropped_live: int = 0  # frames replaced by a newer one before a slot was free (live sources)
    state: str = "starting"  # starting | running | stalled | ended | removed | failed
    last_frame_mono: float = 0.0
    ended_mono: float | None = None  # when its last answer was written: rates are over its own life

    def __post_init__(self) -> None:
        self.latency = LatencyHistogram()
        self.started = time.monotonic()
        self._read_rate, self._done_rate = _Rate(), _Rate()
        self._lock = threading.Lock()
        self.timeline: list[dict[str, float]] = []
        self._timeline_step = 1
        self._window: list[float] = []

    def on_read(self) -> None:
        now = time.monotonic()
        self.read += 1
        self.last_frame_mono = now
        self._read_rate.tick(now)

    def on_answer(self, latency_ms: float | None) -> None:
        now = time.monotonic()
        with self._lock:
            if latency_ms is None:
                self.failed += 1
                return
            self.answered += 1
            self.latency.add(latency_ms)
            self._done_rate.tick(now)
            self._window.append(latency_ms)

    def source_fps(self) -> float:
        return self._read_rate.per_second(time.monotonic())

    def processed_fps(self) -> float:
        return self._done_rate.per_second(time.monotonic())

    def frame_age_s(self) -> float | None:
        return time.monotonic() - self.last_frame_mono if self.last_frame_mono else None

    def sample_timeline(self) -> None:
        """One point (called once per second): rates and this second's latency p50/p99, for the plot."""
        with self._lock:
            window, self._window = sorted(self._window), []
        point = {
            "t_s": round(time.monotonic() - self.started, 1),
            "source_fps": self.source_fps(),
            "processed_fps": self.processed_fps(),
            "p50_ms": window[len(window) // 2] if window else float("nan"),
            "p99_ms": window[min(len(window) - 1, int(0.99 * len(window)))] if window else float("nan"),
        }
        self._timeline_step_point(point)

    def _timeline_step_point(self, point: dict[str, float]) -> None:
        if len(self.timeline) >= TIMELINE_CAP:  # keep the whole run at half the resolution
            self.timeline = self.timeline[::2]
            self._timeline_step *= 2
        if int(point["t_s"]) % self._timeline_step == 0:
            self.timeline.append(point)

    def summary(self) -> dict[str, Any]:
        elapsed = max(1e-9, (self.ended_mono or time.monotonic()) - self.started)
        return {
            "stream": self.stream,
            "source": self.source,
            "live": self.live,
            "state": self.state,
            "read": self.read,
            "sent": self.sent,
            "answered": self.answered,
            "failed": self.failed,
            "first_error": self.first_error,
            "dropped": self.dropped_live,
            "sampled_out": self.sampled_out,
            "decode_errors": self.decode_errors,
            "reconnects": self.reconnects,
            "stalls": self.stalls,
            "source_fps_avg": self.read / elapsed,
            "processed_fps_avg": self.answered / elapsed,
            "latency_p50_ms": self.latency.quantile(0.50),
            "latency_p99_ms": self.latency.quantile(0.99),
            "latency_max_ms": self.latency.max_ms if self.latency.n else None,
            "seconds": elapsed,
        }


_PROM = (
    ("read", "detserve_stream_frames_read_total", "counter", "frames decoded from the source"),
    ("sent", "detserve_stream_frames_sent_total", "counter", "frames sent to the server"),
    ("answered", "detserve_stream_frames_answered_total", "counter", "frames answered"),
    ("failed", "detserve_stream_requests_failed_total", "counter", "requests that failed"),
    ("dropped_live", "detserve_stream_frames_dropped_total", "counter", "stale live frames never sent"),
    ("decode_errors", "detserve_stream_decode_errors_total", "counter", "packets that did not decode"),
    ("reconnects", "detserve_stream_reconnects_total", "counter", "times the source was reopened"),
    ("stalls", "detserve_stream_stalls_total", "counter", "times the frame-age watchdog fired"),
)


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(all_stats: list[StreamStats]) -> str:
    """Prometheus exposition format 0.0.4 (prometheus_client is not a dependency: the format is a few lines)."""
    lines: list[str] = []
    gauges = (
        ("detserve_stream_source_fps", "source frames per second (last 5 s)", StreamStats.source_fps),
        ("detserve_stream_processed_fps", "answered frames per second (last 5 s)", StreamStats.processed_fps),
    )
    for attr, name, kind, text in _PROM:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{stream="{_esc(s.stream)}"}} {getattr(s, attr)}' for s in all_stats]
    for name, text, fn in gauges:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge"]
        lines += [f'{name}{{stream="{_esc(s.stream)}"}} {fn(s):.3f}' for s in all_stats]
    name = "detserve_stream_latency_ms"
    lines += [f"# HELP {name} capture-to-answer latency quantiles, ms, whole run", f"# TYPE {name} summary"]
    for s in all_stats:
        for q in (0.5, 0.99):
            v = s.latency.quantile(q)
            lines.append(f'{name}{{stream="{_esc(s.stream)}",quantile="{q}"}} {"NaN" if v is None else f"{v:.3f}"}')
        lines.append(f'{name}_count{{stream="{_esc(s.stream)}"}} {s.latency.n}')
    return "\n".join(lines) + "\n"


def live_table(all_stats: list[StreamStats]) -> Any:
    """The rich table printed live while streams run."""
    from rich.table import Table

    table = Table(title="detserve stream", expand=False)
    for col in ("stream", "state", "src fps", "done fps", "answered", "dropped", "p50 ms", "p99 ms", "reconn", "errors"):
        table.add_column(col, justify="left" if col in ("stream", "state") else "right")
    for s in all_stats:
        p50, p99 = s.latency.quantile(0.5), s.latency.quantile(0.99)
        table.add_row(
            s.stream, s.state, f"{s.source_fps():.1f}", f"{s.processed_fps():.1f}", str(s.answered), str(s.dropped_live),
            "-" if p50 is None else f"{p50:.0f}", "-" if p99 is None else f"{p99:.0f}", str(s.reconnects),
            str(s.failed + s.decode_errors),
        )  # fmt: skip
    return table
