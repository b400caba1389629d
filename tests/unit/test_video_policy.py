"""detserve stream's parts that need no server: frame policies, slots, sampling, latency quantiles,
Prometheus text, source parsing, the control file's permissions, drawing and the MP4 writer."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from clients.grpc_client import Detections
from detserve.errors import DetserveError
from detserve.video.metrics import LatencyHistogram, StreamStats, prometheus_text
from detserve.video.policy import END, FpsSampler, Frame, LatestSlot, OrderedSlot, Slots
from detserve.video.session import check_control_file
from detserve.video.sinks import VideoSink, annotate, detections_json
from detserve.video.sources import parse_sources


def _frame(i: int) -> Frame:
    return Frame("s", i, i / 25, time.time(), time.monotonic(), np.zeros((4, 4, 3), np.uint8))


def test_latest_slot_keeps_only_the_newest_and_counts_the_stale() -> None:
    slot = LatestSlot()
    for i in range(5):
        slot.put(_frame(i))
    taken = slot.take(0.01)
    assert isinstance(taken, Frame) and taken.index == 4
    assert slot.dropped == 4
    assert slot.take(0.01) is False  # nothing new: the sender waits, it does not resend
    slot.put(_frame(5))
    slot.end()
    taken = slot.take(0.01)
    assert isinstance(taken, Frame) and taken.index == 5  # the last frame before the end is still sent
    assert slot.take(0.01) is END


def test_ordered_slot_is_bounded_and_keeps_every_frame_in_order() -> None:
    stopped = threading.Event()
    slot = OrderedSlot(2, stopped.is_set)
    got: list[int] = []

    def reader() -> None:
        for i in range(20):
            slot.put(_frame(i))
        slot.end()

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.1)
    assert len(slot) == 2  # the reader waits: a file never runs ahead of the sender
    while (item := slot.take(1.0)) is not END:
        assert isinstance(item, Frame)
        got.append(item.index)
    t.join()
    assert got == list(range(20)) and slot.dropped == 0


def test_fps_sampler_keeps_the_asked_rate_by_source_time() -> None:
    sampler = FpsSampler(5.0)
    kept = [i for i in range(100) if sampler.keep(i / 25, i, 25.0)]  # 4 s of 25 fps
    assert kept == list(range(0, 100, 5))
    assert all(FpsSampler(None).keep(i / 25, i, 25.0) for i in range(10))


def test_slots_bound_each_stream_and_the_total() -> None:
    slots = Slots(3)
    a, b = threading.BoundedSemaphore(2), threading.BoundedSemaphore(2)
    slots.join(), slots.join()  # two streams: the limit is min(3, 2 streams + the spare ones)
    assert slots.acquire(a, 0.01) and slots.acquire(a, 0.01)
    assert not slots.acquire(a, 0.01)  # the stream's own bound
    assert slots.acquire(b, 0.01)
    assert not slots.acquire(b, 0.01)  # the total bound; b's own slot is given back
    slots.release(a)
    assert slots.acquire(b, 0.01)


def test_slots_one_request_per_stream_plus_the_spare_ones() -> None:
    """4 cameras, 2 each allowed, 8 over all: 6 in flight (one each + 2 spare), not 8; at 1-2 cameras
    every stream keeps its 2; a stream that leaves gives its share back."""
    slots = Slots(8, spare=2)
    sems = [threading.BoundedSemaphore(2) for _ in range(4)]
    for _ in sems:
        slots.join()
    got = sum(slots.acquire(s, 0.01) for s in sems for _ in range(2))
    assert got == 6 and slots.in_use == 6
    one = Slots(8, spare=2)
    one.join()
    s = threading.BoundedSemaphore(2)
    assert one.acquire(s, 0.01) and one.acquire(s, 0.01) and not one.acquire(s, 0.01)
    slots.leave(), slots.leave()  # two streams ended: limit 4, and 6 are still in flight
    slots.release(sems[0])
    assert not slots.acquire(sems[0], 0.01)


def test_a_stream_without_a_frame_holds_no_shared_request() -> None:
    """Before: a stream's pump took one of the requests shared by all streams and then waited up to 0.2 s for its
    next frame, while other streams' frames waited for a request (2 of the 8 shared requests idle at 16 cameras
    whenever a stream had just sent). Now the shared request is taken only once the stream has a frame."""
    slots = Slots(1, spare=0)
    a, b = threading.BoundedSemaphore(2), threading.BoundedSemaphore(2)
    slots.join(), slots.join()
    empty, full = LatestSlot(), LatestSlot()
    full.put(_frame(0))
    assert not slots.acquire(a, 0.01, empty.ready) and slots.in_use == 0
    assert a.acquire(blocking=False) and a.acquire(blocking=False)  # a gave its own request back too
    a.release(), a.release()
    assert slots.acquire(b, 0.01, full.ready) and slots.in_use == 1
    ordered = OrderedSlot(2, lambda: False)
    assert not ordered.ready(0.01)
    ordered.end()
    assert ordered.ready(0.01) and ordered.take(0.01) is END


def test_latency_quantiles_within_two_percent_in_fixed_memory() -> None:
    rng = np.random.default_rng(0)
    values = rng.lognormal(3.5, 0.6, 20_000)
    h = LatencyHistogram()
    for v in values:
        h.add(float(v))
    for q in (0.5, 0.99):
        assert h.quantile(q) == pytest.approx(float(np.quantile(values, q)), rel=0.025)
    assert len(h.counts) == 601 and LatencyHistogram().quantile(0.5) is None


def test_prometheus_text_names_every_stream() -> None:
    s = StreamStats('cam"1', "rtsp://x", True)
    s.on_read()
    s.on_answer(12.0)
    text = prometheus_text([s])
    assert 'detserve_stream_frames_answered_total{stream="cam\\"1"} 1' in text
    assert 'detserve_stream_latency_ms{stream="cam\\"1",quantile="0.5"}' in text
    assert "# TYPE detserve_stream_reconnects_total counter" in text


def test_parse_sources_ids_kinds_and_errors(tmp_path: Path) -> None:
    video = tmp_path / "cam.mp4"
    video.write_bytes(b"")
    specs = parse_sources([str(video), str(video), "door=rtsp://10.0.0.1/s", "lavfi:testsrc2", "/dev/video0"])
    assert [(s.stream, s.kind, s.live) for s in specs] == [
        ("cam", "file", False), ("cam-2", "file", False), ("door", "rtsp", True), ("lavfi", "lavfi", True),
        ("video0", "v4l2", True),
    ]  # fmt: skip
    with pytest.raises(DetserveError, match="no such file"):
        parse_sources([str(tmp_path / "missing.mp4")])
    with pytest.raises(DetserveError, match="used twice"):
        parse_sources(["a=rtsp://h/1", "a=rtsp://h/2"])


def test_control_file_must_be_ours_alone(tmp_path: Path) -> None:
    control = tmp_path / "streams.txt"
    control.write_text("")
    control.chmod(0o644)
    check_control_file(control)
    control.chmod(0o666)
    with pytest.raises(DetserveError, match="writable by nobody else"):
        check_control_file(control)
    if os.geteuid() == 0:
        control.chmod(0o600)
        os.chown(control, 65534, 65534)  # nobody's file: nobody chooses what we open
        with pytest.raises(DetserveError, match="belong to you"):
            check_control_file(control)


def test_annotate_draws_boxes_and_the_json_names_classes_and_tracks() -> None:
    rgb = np.full((60, 80, 3), 40, np.uint8)
    det = Detections(np.array([[10, 10, 50, 40]], np.float32), np.array([0.9], np.float32), np.array([2], np.int32))
    drawn = annotate(rgb, det, ["background", "circle", "square"], [7])
    assert drawn.shape == rgb.shape and (drawn != rgb).any() and (rgb == 40).all()
    assert detections_json(det, ["background", "circle", "square"], [7]) == [
        {"box": [10.0, 10.0, 50.0, 40.0], "score": 0.9, "label": 2, "class": "square", "track": 7}
    ]
    assert detections_json(det, [], None)[0]["class"] == "class_2"


def test_video_sink_writes_a_readable_mp4_with_every_frame(tmp_path: Path) -> None:
    import av

    sink = VideoSink(tmp_path / "s.mp4", 25.0)
    for i in range(12):
        sink.write(np.full((49, 65, 3), i * 20, np.uint8))  # odd sizes: cropped to even for yuv420p
    for _ in range(3):  # the source changed size (a camera renegotiated): PyAV's encoder scales it to the file's
        sink.write(np.full((30, 40, 3), 200, np.uint8))
    sink.close()
    with av.open(str(tmp_path / "s.mp4")) as c:
        frames = list(c.decode(video=0))
    assert len(frames) == 15 and {(f.width, f.height) for f in frames} == {(64, 48)}


def test_auto_transport_sends_raw_only_to_this_host() -> None:
    """The default transport: raw frames where they cost no network (loopback, localhost, a unix socket), JPEG to
    any other address (raw is ~23x the bytes of a JPEG frame)."""
    from detserve.video.sender import on_this_host

    for url in ("127.0.0.1:8001", "localhost:8001", "[::1]:8001", "unix:/run/detserve/x/grpc.sock", "127.0.0.2:9"):
        assert on_this_host(url), url
    for url in ("10.0.0.5:8001", "triton.example.com:8001", "[2001:db8::1]:8001", "0.0.0.0:8001"):
        assert not on_this_host(url), url
