"""Video sources decoded with PyAV (FFmpeg inside the wheel; no system FFmpeg): files, ``rtsp://``,
``http(s)://`` (HLS playlists, MJPEG streams) and V4L2 devices (``/dev/video*``).

One reader thread per stream decodes and hands the decoder's frames to the stream's policy slot (the
RGB conversion waits until the sender takes a frame: see policy.Frame). A live
source that fails or ends is reopened with exponential backoff (logged, counted); a live source that
stops sending is caught by the frame-age watchdog (FFmpeg's read timeout interrupts the blocked
read, the stall is counted and the source reopened). A file ends cleanly after its last frame. A
packet that does not decode (a corrupt segment) is counted and skipped; the stream goes on.

HLS (an ``http(s)://`` URL whose path ends ``.m3u8``/``.m3u``): the playlist is fetched once when the source
is parsed. A VOD playlist (``#EXT-X-ENDLIST``; a master playlist: its first variant's) is a recording, read as a
file: every frame once, in order, then it ends. A live one is a camera: newest frame first; a reopened playlist
still lists segments already read (FFmpeg starts 3 segments before its end), whose frames are skipped by timestamp
rather than sent again; a live playlist that ends (``#EXT-X-ENDLIST`` appears) ends the stream.

A file given with ``realtime`` (``detserve stream FILE --live``) is played as a camera would send it: each
frame released at its own timestamp's pace, newest frame first, from the start again at its end, until
stopped -- to rehearse a camera, and the live source of ``detserve bench-stream``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detserve.errors import DetserveError
from detserve.video.hls import ReplayFilter, SegmentPacer, read_playlist
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
    kind: str  # file | rtsp | hls | http | v4l2 | lavfi | live (any other network URL)
    realtime: bool = False  # a file played as a live camera: at its real-time pace, looped, newest frame first
    vod: bool = False  # an HLS recording (its playlist has #EXT-X-ENDLIST): read as a file
    quiet_s: float = 0.0  # a live HLS playlist's longest wait between frames while all is well (hls.Playlist)

    @property
    def live(self) -> bool:
        return (self.kind != "file" and not self.vod) or self.realtime


def _kind(url: str) -> str:
    if url.startswith(("rtsp://", "rtsps://")):
        return "rtsp"
    if url.startswith(("http://", "https://")):
        path = urllib.parse.urlsplit(url).path.lower()
        return "hls" if path.endswith((".m3u8", ".m3u")) else "http"
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


def parse_sources(texts: list[str], taken: set[str] | None = None, realtime: bool = False) -> list[SourceSpec]:
    """``[ID=]SOURCE`` each; the default id is the file/URL stem, made unique with ``-2``, ``-3``...
    ``realtime``: files are played as live cameras (other sources are live anyway)."""
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
        playlist = read_playlist(url) if kind == "hls" else None
        vod, quiet = (playlist.vod, playlist.quiet_s) if playlist else (False, 0.0)
        specs.append(SourceSpec(stream, url, kind, realtime and kind == "file", vod, 0.0 if vod else quiet))
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
    # (open, read) timeouts: FFmpeg's interrupt callback ends a read blocked longer than stall_s -- or than a live
    # playlist's segments take to come (2 target durations + 1 s: a timeout below it reopened the playlist after
    # every segment; seen with 4 s segments and --stall 2: 4 reconnects in 20 s, frames 7.9 s apart)
    timeout = None if spec.kind == "file" else (opts.open_timeout_s, max(opts.stall_s, spec.quiet_s))
    try:
        return av.open(url, format=fmt, options=options, timeout=timeout)
    except av.error.FFmpegError as e:
        raise DetserveError(f"stream {spec.stream}: cannot open {spec.url}: {e}") from e


class Pacer:
    """A file's frames at their real-time pace, by timestamp, as a camera sends them; each pass of a looped
    file continues the clock one frame period after the previous pass's last frame."""

    def __init__(self) -> None:
        self._origin: float | None = None  # monotonic time of source time 0
        self._offset = 0.0  # source time at which this pass started
        self._first: float | None = None  # this pass's first timestamp
        self._next = 0.0  # source time just after the last frame released
        self._count = 0

    def due(self, pts_s: float | None, rate: float | None) -> float:
        """The monotonic time at which this frame is released."""
        period = 1.0 / (rate or 25.0)
        pts = pts_s if pts_s is not None else self._count * period
        self._count += 1
        if self._first is None:
            self._first = pts
        t = self._offset + pts - self._first
        if self._origin is None:
            self._origin = time.monotonic() - t
        self._next = t + period
        return self._origin + t

    def rewind(self) -> None:
        """The file starts again: its first frame follows the last one by one frame period."""
        self._offset, self._first, self._count = self._next, None, 0


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
        self._replay = ReplayFilter()
        self._segment_pacer = SegmentPacer()
        self._playlist_ended = False  # the last container read was an HLS playlist with #EXT-X-ENDLIST
        self._ends_at: float | None = None  # that playlist's last timestamp, s
        self._last_pts: float | None = None
        if spec.live and spec.quiet_s > opts.stall_s:
            stats.stall_s = spec.quiet_s  # the watchdog's limit for this stream (session.tick)
            log.warning(
                "stream %s: a live playlist's frames come a segment at a time, up to %.0f s apart: stalled after "
                "that long without a frame (not --stall %g)", spec.stream, spec.quiet_s, opts.stall_s,
            )  # fmt: skip

    def stop(self) -> None:
        self._halt.set()

    @property
    def stopped(self) -> bool:
        return self._halt.is_set()

    def run(self) -> None:
        try:
            if self.spec.realtime:
                self._run_replay()
            elif self.spec.live:
                self._run_live()
            else:
                self._read_once()
        except DetserveError as e:
            self.error = e
            log.error("%s", e.message)
        except Exception as e:  # anything else FFmpeg or a source throws: this stream fails, named; the run goes on
            log.exception("stream %s: reading %s failed", self.spec.stream, self.spec.url)
            self.error = DetserveError(f"stream {self.spec.stream}: reading {self.spec.url} failed: {type(e).__name__}: {e}")
        finally:
            self.slot.end()

    def _run_live(self) -> None:
        wait = self.opts.backoff_s
        first = True
        while not self._halt.is_set():
            before = self.stats.read
            try:
                self._decode(_open(self.spec, self.opts), FpsSampler(None))
                if self._playlist_ended:
                    log.warning("stream %s: the live playlist ended (#EXT-X-ENDLIST)", self.spec.stream)
                    return  # a broadcast that ended, not a drop: reopened, it would be read again from its start
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

    def _read_once(self) -> None:
        """A file, or an HLS recording: every frame once, in order. A recording over the network can fail mid-way:
        the stream then ends as failed, with FFmpeg's reason, not with a thread's traceback."""
        import av

        try:
            self._decode(_open(self.spec, self.opts), FpsSampler(self.opts.max_fps))
        except (av.error.FFmpegError, OSError) as e:
            raise DetserveError(f"stream {self.spec.stream}: reading {self.spec.url} failed: {e}") from e
        end, last = self._ends_at, self._last_pts
        # FFmpeg skips a segment it cannot fetch and ends at the playlist's end all the same: a recording whose
        # origin went away mid-way "ended" quietly (seen: 75 frames of 250); its last frame tells. The last frame
        # starts one frame before the end; 0.5 s more for an audio track that outlasts the video (segments are
        # longer: a lost one is seen)
        if end is not None and not self._halt.is_set() and (last is None or last < end - 0.5 - 1.0 / (self.rate or 25)):
            raise DetserveError(
                f"stream {self.spec.stream}: {self.spec.url} ended at {last or 0:.1f} s of its {end:.1f} s: "
                "its last segments could not be read",
                hint="is the origin up? (FFmpeg skips a segment it cannot fetch)",
            )

    def _run_replay(self) -> None:
        """A file as a camera: paced by its timestamps, from the start again at its end, until stopped."""
        pacer = Pacer()
        while not self._halt.is_set():
            before = self._index
            self._decode(_open(self.spec, self.opts), FpsSampler(None), pacer)
            if self._halt.is_set():
                return  # stopped inside the pass (it may have had no frame yet): not an empty file
            if self._index == before:
                raise DetserveError(f"stream {self.spec.stream}: {self.spec.url} has no frame to play")
            pacer.rewind()

    def _decode(self, container: Any, sampler: FpsSampler, pacer: Pacer | SegmentPacer | None = None) -> None:
        import av

        with container:
            if not container.streams.video:  # an audio-only file or stream: before, an IndexError traceback and "ended"
                raise DetserveError(
                    f"stream {self.spec.stream}: {self.spec.url} has no video track",
                    hint="give a video file or stream (FFmpeg found only: "
                    f"{', '.join(s.type for s in container.streams) or 'nothing'})",
                )
            video = container.streams.video[0]
            if self.spec.live:
                # one decoding thread per live source: FFmpeg's default (frame threads, one per core + 1) gives
                # each source 3 threads on 2 cores -- 48 for 16 cameras -- and holds frames back (a frame leaves
                # the decoder only when the next thread-count - 1 packets arrived: +80 ms at 25 FPS); the sources
                # themselves are the parallelism
                video.codec_context.thread_count = 1
            else:
                video.thread_type = "AUTO"  # a file is read as fast as it is answered: frame threads add throughput
            self.rate = float(video.average_rate) if video.average_rate else self.rate
            # an HLS playlist (whatever its URL says): whether it ends, and on a live one, frames read before
            hls = container.format.name == "hls"
            self._playlist_ended = hls and container.duration is not None  # FFmpeg sets it only with the end tag
            self._ends_at = ((container.start_time or 0) + container.duration) / 1e6 if self._playlist_ended else None
            replay = self._replay if hls and self.spec.live else None
            if replay is not None:
                replay.reopened(self._playlist_ended)
                pacer = pacer or self._segment_pacer  # a live playlist's bursts, released at the frames' pace
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
                    if replay is not None and not replay.new(_pts(vf)):
                        continue  # read before this reopening: not a new picture, not a sign of life
                    if pacer is not None and not self._wait(pacer.due(_pts(vf), self.rate)):
                        return
                    self._deliver(vf, sampler)

    def _wait(self, due_mono: float) -> bool:
        """Until ``due_mono`` (at once when late: a camera's frames queued meanwhile arrive together); False when stopped."""
        delay = due_mono - time.monotonic()
        return not (self._halt.wait(delay) if delay > 0 else self._halt.is_set())

    def _deliver(self, vf: Any, sampler: FpsSampler) -> None:
        index = self._index
        self._index += 1
        pts_s = _pts(vf)
        self.stats.on_read()
        self._last_pts = pts_s
        if not sampler.keep(pts_s, index, self.rate):
            self.stats.sampled_out += 1
            return
        self.size = (vf.width, vf.height)
        # the decoder's frame as it is: converted to RGB only if the sender takes it (policy.Frame)
        self.slot.put(Frame(self.spec.stream, index, pts_s, time.time(), time.monotonic(), vf))


def _pts(vf: Any) -> float | None:
    return float(vf.time) if vf.time is not None else None
