"""One stream: a reader thread (decode), a pump thread (take a frame when a slot is free, send it)
and an output thread (answers back in frame order -> tracker -> sinks, then the slot is freed).

A slot is freed only after the sinks had the frame, so answers waiting for a slow sink, answers
waiting for an earlier frame's answer, and frames in flight together never exceed the stream's
bound: nothing queues without limit, whatever the source, server or disk do.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from clients.grpc_client import Detections
from detserve.video.metrics import StreamStats
from detserve.video.policy import END, Frame, LatestSlot, OrderedSlot, Slots
from detserve.video.sender import Sender, encode_jpeg
from detserve.video.sinks import JsonlSink, LatestJpeg, VideoSink, annotate, detections_json
from detserve.video.sources import Reader, ReaderOptions, SourceSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outputs:
    """What the session shares with every stream."""

    sender: Sender
    slots: Slots
    names: list[str]
    jsonl: JsonlSink | None
    video_dir: Any  # Path | None
    live_view: bool
    tracker_factory: Any  # Callable[[], tracker] | None


@dataclass(frozen=True)
class _Answer:
    seq: int
    frame: Frame
    sent_mono: float
    answered_mono: float
    detections: Detections | None
    error: Exception | None


class Stream:
    def __init__(self, spec: SourceSpec, out: Outputs, reader_opts: ReaderOptions, in_flight: int) -> None:
        self.spec, self.out = spec, out
        self.stats = StreamStats(spec.stream, spec.url, spec.live)
        self._stop = threading.Event()
        self._sem = threading.BoundedSemaphore(max(1, in_flight))
        self.slot: LatestSlot | OrderedSlot = LatestSlot() if spec.live else OrderedSlot(in_flight, self._stop.is_set)
        self.reader = Reader(spec, self.slot, self.stats, reader_opts)
        self.view = LatestJpeg()
        self.video = VideoSink(out.video_dir / f"{spec.stream}.mp4", None) if out.video_dir else None
        self.tracker = out.tracker_factory() if out.tracker_factory else None
        self._answers: queue.Queue[_Answer | int] = queue.Queue()  # bounded by the slots (see the module doc)
        self._pump = threading.Thread(target=self._pump_loop, name=f"pump-{spec.stream}", daemon=True)
        self._output = threading.Thread(target=self._output_loop, name=f"out-{spec.stream}", daemon=True)

    def start(self) -> None:
        self.stats.state = "running"
        for t in (self.reader, self._pump, self._output):
            t.start()

    def stop(self) -> None:
        """Stop reading and sending; what is in flight is still answered and written."""
        self._stop.set()
        self.reader.stop()

    @property
    def finished(self) -> bool:
        return not self._output.is_alive() and not self._pump.is_alive()

    def join(self, timeout_s: float | None = None) -> None:
        for t in (self.reader, self._pump, self._output):
            t.join(timeout_s)

    def _pump_loop(self) -> None:
        seq = 0
        self.out.slots.join()  # counts toward the spare requests in flight (policy.Slots)
        try:
            while True:
                if not self.out.slots.acquire(self._sem, 0.2, self.slot.ready):
                    if self._stop.is_set() and self.spec.live:
                        break  # stopped, and nothing to send (a stalled source may never end its slot)
                    continue
                item = self.slot.take(0.2)
                self.stats.dropped_live = self.slot.dropped
                if item is END or item is False:
                    self.out.slots.release(self._sem)
                    if item is END:
                        break
                    if self._stop.is_set() and self.spec.live:
                        break
                    continue
                assert isinstance(item, Frame)
                self._send(seq, item.converted())  # only a frame that is sent pays its RGB conversion
                seq += 1
        finally:
            self.out.slots.leave()
            self._answers.put(seq)  # how many answers the output thread is to wait for

    def _send(self, seq: int, frame: Frame) -> None:
        sent = time.monotonic()
        self.stats.sent += 1

        def done(dets: list[Detections] | None, error: Exception | None) -> None:
            self._answers.put(_Answer(seq, frame, sent, time.monotonic(), dets[0] if dets else None, error))

        self.out.sender.send(frame.rgb, done)

    def _output_loop(self) -> None:
        pending: dict[int, _Answer] = {}
        next_seq, total = 0, None
        while total is None or next_seq < total:
            item = self._answers.get()
            if isinstance(item, int):
                total = item
                continue
            pending[item.seq] = item
            while next_seq in pending:
                answer = pending.pop(next_seq)
                try:
                    self._write(answer)
                except Exception:  # a sink failing must not leave the slot taken forever
                    log.exception("stream %s: writing frame %d failed", self.spec.stream, answer.frame.index)
                finally:
                    self.out.slots.release(self._sem)
                next_seq += 1
        self._close()

    def _write(self, a: _Answer) -> None:
        f = a.frame
        latency_ms = (a.answered_mono - f.captured_mono) * 1000.0 if a.error is None else None
        self.stats.on_answer(latency_ms)
        tracks = None
        if a.detections is not None and self.tracker is not None:
            d = a.detections
            tracks = [int(t) for t in self.tracker.update(d.boxes, d.scores, d.labels)]
        record: dict[str, Any] = {
            "stream": f.stream,
            "frame": f.index,
            "pts_s": None if f.pts_s is None else round(f.pts_s, 6),
            "captured": round(f.captured, 6),
            "sent": round(f.captured + (a.sent_mono - f.captured_mono), 6),
            "answered": round(f.captured + (a.answered_mono - f.captured_mono), 6),
            "latency_ms": None if latency_ms is None else round(latency_ms, 3),
            "dropped": self.stats.dropped_live,
        }
        if a.detections is None:
            record["error"] = str(a.error)
            self.stats.first_error = self.stats.first_error or record["error"][:300]
            log.warning("stream %s: frame %d failed: %s", f.stream, f.index, a.error)
        else:
            record["detections"] = detections_json(a.detections, self.out.names, tracks)
        if self.out.jsonl is not None:
            self.out.jsonl.write(record)
        if a.detections is not None and (self.video is not None or self.out.live_view):
            drawn = annotate(f.rgb, a.detections, self.out.names, tracks)
            if self.video is not None:
                if self.video.frames == 0 and self.reader.rate:
                    self.video.rate = type(self.video.rate)(self.reader.rate).limit_denominator(1001)
                self.video.write(drawn)
            if self.out.live_view:
                self.view.put(encode_jpeg(drawn, 80))

    def _close(self) -> None:
        if self.video is not None:
            try:
                self.video.close()
            except Exception:
                log.exception("stream %s: closing %s failed", self.spec.stream, self.video.path)
        self.view.close()
        self.stats.ended_mono = time.monotonic()
        if self.stats.state in ("running", "stalled"):
            self.stats.state = "failed" if self.reader.error else "ended"
