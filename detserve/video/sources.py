"""Video sources decoded with PyAV (FFmpeg inside the wheel; no system FFmpeg): files, ``rtsp://``,
``http(s)://`` (HLS playlists, MJPEG streams) and V4L2 devices (``/dev/video*``).

One reader thread per stream decodes to RGB and hands frames to the stream's policy slot. A live
source that fails or ends is reopened with exponential backoff (logged, counted); a live source that
stops sending is caught by the frame-age watchdog (FFmpeg's read timeout interrupts the blocked
read, the stall is counted and the source reopened). A file ends cleanly after its last frame. A
packet that does not decode (a corrupt segment) is counted and skipped; the stream goes on.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detserve.errors import DetserveError
from detserve.video.metrics import StreamStats
from detserve.video.policy import FpsSampler, Frame, LatestSlot, OrderedSlot

log = logging.getLogger(__name__)

LIVE_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "rtmp://", "udp://", "srt://")
_ID = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,63})=(.+)$")


@dataclass(frozen=True)
class SourceSpec:
    """What to read: ``stream`` (the id in every output), ``url`` (what FFmpeg opens), ``kind``."""

    stream: str
    url: str
    kind: str  # file | rtsp | http | v4l2 | lavfi | live (any other network URL)

    @property
    def live(self) -> bool:
        return self.kind != "file"


def _kind(url: str) -> str:
    if url.startswith(("rtsp://", "rtsps://")):
        return "rtsp"
    if url.startswith(("http://", "https://")):
        return "http"
    if url.startswith(LIVE_SCHEMES):
        return "live"
    if url.startswith("/dev/video"):
        return "v4l2"
    if url.startswith("lavfi:"):
        return "lavfi"  # FFmpeg's generated pictures, e.g. lavfi:testsrc2=size=640x480:rate=25,realtime (a live test source)
    return "file"


def _default_id(url: str) -> str:
    if url.startswith("lavfi:"):
        return "lavfi"
    stem = Path(url.split("?")[0].rstrip("/")).stem or "stream"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem)[:64] or "stream"


def parse_sources(texts: list[str], taken: set[str] | None = None) -> list[SourceSpec]:
    """``[ID=]SOURCE`` each; the default id is the file/URL stem, made unique with ``-2``, ``-3``..."""
    used = set(taken or ())
    specs = []
    for text in texts:
        text = text.strip()
        m = _ID.match(text)
        stream, url = (m.group(1), m.group(2)) if m and "://" not in m.group(1) else (None, text)
        kind = _kind(url)
        if kind == "file" and not Path(url).is_file():
            raise DetserveError(f"source {url!r}: no such file", hint="a video file, rtsp://..., http(s)://... or /dev/videoN")
        if stream is None:
            base, n, stream = _default_id(url), 1, _default_id(url)
            while stream in used:
                n += 1
                stream = f"{base}-{n}"
        elif stream in used:
            raise DetserveError(f"stream id {stream!r} is used twice", hint="give each source its own ID=SOURCE")
        used.add(stream)
        specs.append(SourceSpec(stream, url, kind))
    return specs


@dataclass(frozen=True)
class ReaderOptions:
    stall_s: float = 5.0  # a live source silent this long is stalled: reopened
    open_timeout_s: float = 10.0
    backoff_s: float = 0.5  # first wait before reopening; doubles up to backoff_max_s
    backoff_max_s: float = 10.0
    max_fps: float | None = None  # files: sample by source time


def _open(spec: SourceSpec, opts: ReaderOptions) -> Any:
    import av

    options = {"rtsp_transport": "tcp"} if spec.kind == "rtsp" else {}
    fmt = {"v4l2": "v4l2", "lavfi": "lavfi"}.get(spec.kind)
    url = spec.url.removeprefix("lavfi:")
    # (open, read) timeouts: FFmpeg's interrupt callback ends a read blocked longer than stall_s
    timeout = None if spec.kind == "file" else (opts.open_timeout_s, opts.stall_s)
    try:
        return av.open(url, format=fmt, options=options, timeout=timeout)
    except av.error.FFmpegError as e:
        raise DetserveError(f"stream {spec.stream}: cannot open {spec.url}: {e}") from e


class Reader(threading.Thread):
    """Decodes one source into its slot until it ends (file) or ``stop()`` is called."""

    def __init__(self, spec: SourceSpec, slot: LatestSlot | OrderedSlot, stats: StreamStats, opts: ReaderOptions) -> None:
        super().__init__(name=f"reader-{spec.stream}", daemon=True)
        self.spec, self.slot, self.stats, self.opts = spec, slot, stats, opts
        self._halt = threading.Event()
        self.error: DetserveError | None = None
        self.rate: float | None = None  # the source's nominal frame rate, where it says
        self.size: tuple[int, int] | None = None  # (width, height)
        self._index = 0

    def stop(self) -> None:
        self._halt.set()

    @property
    def stopped(self) -> bool:
        return self._halt.is_set()

    def run(self) -> None:
        try:
            if self.spec.live:
                self._run_live()
            else:
                self._decode(_open(self.spec, self.opts), FpsSampler(self.opts.max_fps))
        except DetserveError as e:
            self.error = e
            log.error("%s", e.message)
        finally:
            self.slot.end()

    def _run_live(self) -> None:
        wait = self.opts.backoff_s
        first = True
        while not self._halt.is_set():
            before = self.stats.read
            try:
                self._decode(_open(self.spec, self.opts), FpsSampler(None))
                reason = "ended"
            except DetserveError as e:
                if first:
                    raise  # a source that never opened is the user's to fix (wrong URL)
                reason = e.message
            except Exception as e:  # FFmpeg's read timeout (stall) and network errors alike
                reason = f"{type(e).__name__}: {e}"
                if "timed out" in reason.lower() or isinstance(e, TimeoutError):
                    self.stats.stalls += 1
            first = False
            if self._halt.is_set():
                return
            if self.stats.read > before:
                wait = self.opts.backoff_s  # it delivered frames: a fresh drop, start the backoff again
            self.stats.reconnects += 1
            log.warning("stream %s: source lost (%s); reconnecting in %.1f s", self.spec.stream, reason, wait)
            self._halt.wait(wait)
            wait = min(wait * 2, self.opts.backoff_max_s)

    def _decode(self, container: Any, sampler: FpsSampler) -> None:
        import av

        with container:
            video = container.streams.video[0]
            video.thread_type = "AUTO"
            self.rate = float(video.average_rate) if video.average_rate else self.rate
            for packet in container.demux(video):
                if self._halt.is_set():
                    return
                try:
                    frames = packet.decode()
                except av.error.FFmpegError as e:  # a corrupt segment: count it, keep the stream
                    self.stats.decode_errors += 1
                    log.warning("stream %s: decode error (%s); skipped", self.spec.stream, e)
                    continue
                for vf in frames:
                    self._deliver(vf, sampler)

    def _deliver(self, vf: Any, sampler: FpsSampler) -> None:
        index = self._index
        self._index += 1
        pts_s = float(vf.time) if vf.time is not None else None
        self.stats.on_read()
        if not sampler.keep(pts_s, index, self.rate):
            self.stats.sampled_out += 1
            return
        rgb = vf.to_ndarray(format="rgb24")
        self.size = (rgb.shape[1], rgb.shape[0])
        self.slot.put(Frame(self.spec.stream, index, pts_s, time.time(), time.monotonic(), rgb))
