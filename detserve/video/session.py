"""A ``detserve stream`` run: streams added and removed while it runs, shared sender and slots, the
live view, a once-a-second tick (watchdog + timeline) and the control file.

Control file (``--control FILE``): one ``[ID=]SOURCE`` a line (``#`` comments); the file is re-read
when it changes: a new line starts a stream, a removed line stops it (what it has in flight is still
answered and written), a line whose source changed under the same id restarts it (plan_control). The
file must belong to the user running ``detserve stream`` and be writable by nobody else: whoever can
write it chooses what this process opens. With a control file the run
lasts until Ctrl-C/SIGTERM; without, until every source has ended.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients.labels import label_names
from detserve.errors import DetserveError
from detserve.video.liveview import ViewServer
from detserve.video.metrics import StreamStats
from detserve.video.policy import Slots
from detserve.video.sender import Sender
from detserve.video.sinks import JsonlSink, LatestJpeg
from detserve.video.sources import ReaderOptions, SourceSpec, parse_sources
from detserve.video.stream import Outputs, Stream

log = logging.getLogger(__name__)


# Requests in flight over all streams by default: one full batch of what `detserve build` makes (max_batch_size
# 8; the server's own config is an admin API, closed to this client). More only wait in Triton's queue: the
# throughput stays and every answer is about an older frame (latency = in flight / frames per second, Little's
# law). Measured, demo, 8 cameras on 2 cores, same run: 16 in flight (2 a stream) 13.0 frames/s at p99 1839 ms,
# 8 (1 a stream) 20.0 frames/s at p99 1092 ms.
IN_FLIGHT_TOTAL = 8


@dataclass(frozen=True)
class SessionOptions:
    url: str
    model: str
    transport: str = "auto"  # sender.py: raw to this host, jpeg elsewhere
    max_fps: float | None = None
    live_files: bool = False  # files (control-file lines too) played as cameras: real-time pace, looped, newest first
    track: bool = False
    jsonl: Path | None = None
    video_out: Path | None = None
    view_port: int | None = None  # 0: any free port
    control: Path | None = None
    in_flight_per_stream: int = 2
    in_flight_total: int = IN_FLIGHT_TOTAL
    stall_s: float = 5.0
    timeout_s: float = 30.0
    score_threshold: float | None = None


def tracker_factory() -> Callable[[], Any]:
    """A new tracker per stream from detserve/video/tracking.py (``Tracker().update(boxes, scores, labels)``)."""
    try:
        from detserve.video import tracking  # type: ignore[attr-defined,unused-ignore]
    except ImportError as e:
        raise DetserveError(
            f"--track needs detserve/video/tracking.py, which this install lacks ({e})",
            hint="run without --track, or update detserve",
        ) from e
    return tracking.Tracker  # type: ignore[no-any-return]


@dataclass(frozen=True)
class ControlPlan:
    wanted: dict[str, SourceSpec]  # the control file's streams by id
    by_line: dict[str, SourceSpec]  # each line's source (kept, so an unchanged line is not parsed again)
    stop: list[str]
    start: list[SourceSpec]


def plan_control(
    lines: list[str], known: dict[str, SourceSpec], running: dict[str, SourceSpec], owned: set[str], live_files: bool
) -> ControlPlan:
    """What a changed control file asks for. ``known``: each line's source from the last reading; ``running``: every
    stream by id (the command line's too); ``owned``: the ids the control file started. An unchanged line keeps its
    source as parsed (a live HLS line's playlist is not fetched again at every edit of the file, and its stream is
    not restarted); a line whose source changed under the same id restarts that stream on the new source (before:
    ignored while the id ran); a line naming an id the command line started is refused, not taken over."""
    others = set(running) - owned
    wanted: dict[str, SourceSpec] = {}
    by_line: dict[str, SourceSpec] = {}
    for line in lines:
        spec = known.get(line)
        if spec is None or spec.stream in wanted or spec.stream in others:
            try:
                spec = parse_sources([line], others | set(wanted), live_files)[0]
            except DetserveError as e:
                log.error("control file line %r ignored: %s", line, e.message)
                continue
        wanted[spec.stream] = by_line[line] = spec
    changed = [i for i, spec in wanted.items() if i in owned and i in running and running[i] != spec]
    stop = sorted((owned - set(wanted)) | set(changed))
    start = [spec for i, spec in wanted.items() if i not in running or i in changed]
    return ControlPlan(wanted, by_line, stop, start)


def check_control_file(path: Path) -> None:
    """Whoever can write the control file decides what this process opens: it must be ours alone."""
    try:
        st = path.stat()
    except OSError as e:
        raise DetserveError(f"control file {path}: {e.strerror or e}", hint="create it (one [ID=]SOURCE a line)") from e
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise DetserveError(
            f"control file {path} must belong to you and be writable by nobody else",
            hint=f"chmod go-w {path}",
        )


class Session:
    def __init__(self, opts: SessionOptions) -> None:
        self.opts = opts
        self.streams: dict[str, Stream] = {}
        self.retired: list[StreamStats] = []  # removed streams, kept for the report
        self._lock = threading.Lock()
        self._stop = threading.Event()
        sender = Sender(opts.url, opts.model, opts.transport, opts.timeout_s, opts.score_threshold)
        sender.check()
        factory = tracker_factory() if opts.track else None
        if opts.control is not None:
            check_control_file(opts.control)
        self.outputs = Outputs(
            sender, Slots(opts.in_flight_total), label_names(opts.url, opts.model),
            JsonlSink(opts.jsonl) if opts.jsonl else None, opts.video_out, opts.view_port is not None, factory,
        )  # fmt: skip
        self.reader_opts = ReaderOptions(stall_s=opts.stall_s, max_fps=opts.max_fps)
        self.view = ViewServer(opts.view_port, self.views, self.all_stats) if opts.view_port is not None else None
        self._control_seen: tuple[float, int] | None = None
        self._control_ids: set[str] = set()
        self._control_specs: dict[str, SourceSpec] = {}  # each control line as parsed when it appeared
        self.started = time.monotonic()

    # --------------------------------------------------------------------------- streams
    def add(self, specs: list[SourceSpec]) -> None:
        with self._lock:
            for spec in specs:
                if spec.stream in self.streams:
                    raise DetserveError(f"stream {spec.stream!r} is already running")
                stream = Stream(spec, self.outputs, self.reader_opts, self.opts.in_flight_per_stream)
                self.streams[spec.stream] = stream
                stream.start()
                log.info("stream %s: started (%s, %s)", spec.stream, spec.kind, spec.url)

    def remove(self, stream_id: str) -> None:
        with self._lock:
            stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.stop()
        stream.join(self.opts.timeout_s + 5)
        stream.stats.state = "removed"
        with self._lock:
            self.streams.pop(stream_id, None)
            self.retired.append(stream.stats)
        log.info("stream %s: removed", stream_id)

    def views(self) -> dict[str, LatestJpeg]:
        with self._lock:
            return {k: s.view for k, s in self.streams.items()}

    def all_stats(self) -> list[StreamStats]:
        with self._lock:
            return [*self.retired, *(s.stats for s in self.streams.values())]

    # --------------------------------------------------------------------------- the run
    def tick(self) -> None:
        """Once a second: the frame-age watchdog, the timeline points, the control file."""
        for s in self.all_stats():
            if s.state in ("running", "stalled"):
                s.sample_timeline()
                age = s.frame_age_s()
                stalled = age is not None and age > max(self.opts.stall_s, s.stall_s) and s.live
                if stalled and s.state == "running":
                    s.stalls += 1
                    log.warning("stream %s: no frame for %.1f s (stalled)", s.stream, age)
                s.state = "stalled" if stalled else "running"
        if self.opts.control is not None:
            self._poll_control(self.opts.control)

    def _poll_control(self, path: Path) -> None:
        try:
            st = path.stat()
        except OSError:
            return  # being replaced: next tick
        if self._control_seen == (st.st_mtime, st.st_size):
            return
        self._control_seen = (st.st_mtime, st.st_size)
        try:
            check_control_file(path)
            lines = [x.strip() for x in path.read_text().splitlines() if x.strip() and not x.strip().startswith("#")]
        except (DetserveError, OSError) as e:
            log.error("control file ignored: %s", getattr(e, "message", e))
            return
        with self._lock:
            running = {i: stream.spec for i, stream in self.streams.items()}
        plan = plan_control(lines, self._control_specs, running, self._control_ids, self.opts.live_files)
        for gone in plan.stop:
            self.remove(gone)  # a removed line, or a line whose source changed: stopped before its new one starts
        self.add(plan.start)
        self._control_specs, self._control_ids = plan.by_line, set(plan.wanted)

    def finished(self) -> bool:
        with self._lock:
            return self.opts.control is None and all(s.finished for s in self.streams.values())

    def run(self, on_tick: Callable[[], None] | None = None) -> None:
        """Until every stream ended (no control file) or ``stop()``/Ctrl-C."""
        next_tick = time.monotonic()
        while not self._stop.is_set() and not self.finished():
            now = time.monotonic()
            if now >= next_tick:
                self.tick()
                if on_tick:
                    on_tick()
                next_tick = now + 1.0
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Stop every stream, let what is in flight be answered and written, close the sinks."""
        with self._lock:
            streams = list(self.streams.values())
        for s in streams:
            s.stop()
        for s in streams:
            s.join(self.opts.timeout_s + 5)
            s.stats.sample_timeline()
        if self.outputs.jsonl is not None:
            self.outputs.jsonl.close()
        if self.view is not None:
            self.view.close()
        self.outputs.sender.close()

    def failed_streams(self) -> list[str]:
        """Sources that could not be read, and files with frames that got no answer: a file is a job, and a job
        that lost frames must not exit 0 (before: a file whose every frame the server refused ended `ended`, exit
        0). A live source's failed requests are counted and reported; a camera has no "every frame" to lose."""
        with self._lock:
            streams = list(self.streams.items())
        failed = [f"{k}: {s.reader.error.message}" for k, s in streams if s.reader.error is not None]
        for k, s in streams:
            if s.reader.error is None and not s.spec.live and s.stats.failed:
                failed.append(f"{k}: {s.stats.failed} of {s.stats.sent} frames got no answer (first: {s.stats.first_error})")
        return failed
