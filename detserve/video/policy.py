"""Which decoded frame goes to the server next, with nothing growing without bound.

Live sources: a reader keeps only the newest decoded frame (:class:`LatestSlot`); the sender takes it
when it has a free slot, and every frame overwritten before that is dropped and counted. A camera
faster than the server therefore costs a constant amount of memory and the answer is always about
the newest picture. Files: every frame in order (:class:`OrderedSlot`, a small bounded queue the
reader blocks on), optionally sampled to ``--max-fps`` by source timestamp (:class:`FpsSampler`).
In-flight requests are bounded per stream and overall (:class:`Slots`).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Frame:
    """One decoded picture. ``captured`` is the wall clock when decoding finished (epoch seconds),
    ``captured_mono`` the same instant on the monotonic clock (latencies are measured on it).

    ``picture`` is what the decoder gave (an ``av.VideoFrame``, in the decoder's YUV) until the sender takes
    the frame and calls :meth:`converted`: a live slot overwrites most frames of a fast camera (~90 % at 16
    streams on 2 cores), and a frame never sent never pays the RGB conversion (swscale)."""

    stream: str
    index: int  # position in the source, from 0; sampled/dropped frames leave gaps
    pts_s: float | None  # the source's own timestamp, seconds
    captured: float
    captured_mono: float
    picture: Any = field(repr=False)  # numpy uint8 [H, W, 3], or the decoder's av.VideoFrame

    @property
    def rgb(self) -> np.ndarray:
        """The pixels as uint8 RGB [H, W, 3] (converted on each call while ``picture`` is a decoder frame)."""
        if isinstance(self.picture, np.ndarray):
            return self.picture
        return self.picture.to_ndarray(format="rgb24")  # type: ignore[no-any-return]

    def converted(self) -> Frame:
        """This frame with its pixels as RGB, converted once (for the request, the drawing and the sinks)."""
        return self if isinstance(self.picture, np.ndarray) else replace(self, picture=self.rgb)


END = None  # what ``take`` returns once a source has ended and everything it gave was taken


class LatestSlot:
    """Holds only the newest frame; a frame replaced before it was taken counts as dropped."""

    def __init__(self) -> None:
        self._frame: Frame | None = None
        self._ended = False
        self._cond = threading.Condition()
        self.dropped = 0

    def put(self, frame: Frame) -> None:
        with self._cond:
            if self._frame is not None:
                self.dropped += 1  # stale: a newer picture exists, the old one is never sent
            self._frame = frame
            self._cond.notify_all()

    def end(self) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def ready(self, timeout_s: float) -> bool:
        """Whether a frame (or the end) is there to take, waiting up to ``timeout_s``."""
        with self._cond:
            return self._cond.wait_for(lambda: self._frame is not None or self._ended, timeout_s)

    def take(self, timeout_s: float) -> Frame | bool | None:
        """The newest frame; False when none came within ``timeout_s``; END (None) when ended."""
        with self._cond:
            if self._frame is None and not self._ended:
                self._cond.wait(timeout_s)
            frame, self._frame = self._frame, None
            if frame is not None:
                return frame
            return END if self._ended else False


class OrderedSlot:
    """Every frame in order through a queue of ``depth`` frames; the reader waits when it is full."""

    def __init__(self, depth: int, stopped: Callable[[], bool]) -> None:
        self.depth = max(1, depth)
        self._frames: collections.deque[Frame | None] = collections.deque()  # None: the end marker
        self._cond = threading.Condition()
        self._stopped = stopped
        self.dropped = 0  # a file drops nothing; kept for one interface

    def __len__(self) -> int:
        with self._cond:
            return len(self._frames)

    def put(self, frame: Frame) -> None:
        with self._cond:
            while len(self._frames) >= self.depth:
                if self._stopped():
                    return
                self._cond.wait(0.2)
            self._frames.append(frame)
            self._cond.notify_all()

    def end(self) -> None:
        # the end marker goes past a full queue (it costs nothing): it must not be lost, nor block a stopped stream
        with self._cond:
            self._frames.append(END)
            self._cond.notify_all()

    def ready(self, timeout_s: float) -> bool:
        """Whether a frame (or the end) is there to take, waiting up to ``timeout_s``."""
        with self._cond:
            return self._cond.wait_for(lambda: bool(self._frames) or self._stopped(), timeout_s)

    def take(self, timeout_s: float) -> Frame | bool | None:
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._frames), timeout_s):
                return END if self._stopped() else False
            frame = self._frames.popleft()
            self._cond.notify_all()
            return frame


class FpsSampler:
    """Keeps a file's frames at most ``max_fps`` per second of source time (None/0: every frame)."""

    def __init__(self, max_fps: float | None) -> None:
        self.period = 1.0 / max_fps if max_fps else 0.0
        self._next: float | None = None

    def keep(self, pts_s: float | None, index: int, rate: float | None) -> bool:
        if not self.period:
            return True
        t = pts_s if pts_s is not None else index / (rate or 25.0)
        if self._next is not None and t + 1e-9 < self._next:
            return False
        # the next due time follows the schedule, not this frame, so the average rate is max_fps exactly
        self._next = t + self.period if self._next is None else max(self._next + self.period, t)
        return True


# Requests in flight beyond one per stream (Slots): a spare request fills the gap between a stream's answer and
# its next send (client decode/encode, the network) while the server would otherwise idle; past that a request
# only waits in Triton's queue and its answer is about an older frame (latency ~ requests in flight / frames per
# second). Measured on the demo, 640x480 25 FPS cameras, quiet machine, 20 s rows (docs/video.md): 2 a stream up
# to 8 (before): 4 cameras p99 2.0x the single-image p99 with 4 users; 1 spare: 2 cameras 0.83x the capacity;
# 2 spare: 2 cameras 0.93x at p99 1.98x, 4 cameras 0.96x at p99 1.75x.
SPARE = 2


class Slots:
    """Bounded in-flight requests: ``per_stream`` for each stream (its own semaphore) and, over all streams,
    at most ``min(total, streams + SPARE)``: one request per stream plus a few spare for whichever stream
    is ready first. ``streams`` counts the streams sending now (``join``/``leave``)."""

    def __init__(self, total: int, spare: int = SPARE) -> None:
        self.total, self.spare = max(1, total), max(0, spare)
        self.in_use = 0
        self.streams = 0
        self._cond = threading.Condition()

    @property
    def limit(self) -> int:
        return min(self.total, max(1, self.streams + self.spare))

    def join(self) -> None:
        with self._cond:
            self.streams += 1
            self._cond.notify_all()

    def leave(self) -> None:
        with self._cond:
            self.streams = max(0, self.streams - 1)

    def acquire(self, stream: threading.BoundedSemaphore, timeout_s: float, ready: Callable[[float], bool] | None = None) -> bool:
        """The stream's own request, then -- once ``ready`` says the stream has a frame to send -- one of the
        requests shared by all streams. Taken before the frame was there, a shared request sat idle while its
        stream waited for its next picture and other streams' frames waited for a request."""
        if not stream.acquire(timeout=timeout_s):
            return False
        if ready is not None and not ready(timeout_s):
            stream.release()
            return False
        with self._cond:
            if not self._cond.wait_for(lambda: self.in_use < self.limit, timeout_s):
                stream.release()
                return False
            self.in_use += 1
        return True

    def release(self, stream: threading.BoundedSemaphore) -> None:
        with self._cond:
            self.in_use -= 1
            self._cond.notify()
        stream.release()
