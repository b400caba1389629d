"""``detserve stream`` on a real RTSP camera (issue 25 part 7): GStreamer's RTSP server (tests/rtsp_server.py)
serving generated moving-shapes videos, the real demo server answering.

Fast: the camera itself (frames arrive at the file's rate; killed, it refuses; restarted, it serves
again). Slow: the stream client through a camera killed and restarted (reconnects counted, no crash),
a corrupt segment (decode errors counted, the stream goes on past it), 8 concurrent streams, and a
camera faster than the server (newest frame first: dropped > 0, latency bounded).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from detserve.ops.server import TritonServer
from tests.rtsp_server import MISSING, RtspServer, ShapesVideo, free_port, rtsp_available, write_shapes_video


def _read(url: str, frames: int, timeout_s: float = 10) -> list[float]:
    """Decode ``frames`` frames from ``url`` with PyAV -> when the stream was asked for, then when each frame came
    (monotonic seconds)."""
    import av

    times: list[float] = [time.monotonic()]
    with av.open(url, options={"rtsp_transport": "tcp"}, timeout=timeout_s) as container:
        for _ in container.decode(video=0):
            times.append(time.monotonic())
            if len(times) == frames + 1:
                break
    return times


def test_the_rtsp_camera_serves_paced_frames_and_comes_back_after_a_kill(tmp_path: Path) -> None:
    import av

    if not rtsp_available():
        pytest.skip(MISSING)
    video = write_shapes_video(tmp_path, frames=40)
    with RtspServer(video.path, free_port()) as camera:
        asked, *times = _read(camera.url, 36)
        # paced like a camera: frame 35 is produced 1.4 s after the stream starts (25 FPS), less what the pipeline
        # prerolled while the client negotiated; an unpaced file: every frame within ~0.1 s. Measured from the
        # request, not between frames: a client that stalls (a busy machine) reads buffered frames in a burst,
        # which makes gaps between frames shorter but never brings the last frame earlier.
        assert len(times) == 36 and times[35] - asked >= 0.8, (asked, times)
        camera.stop()
        with pytest.raises(av.error.FFmpegError):  # ConnectionRefusedError: nothing listens
            _read(camera.url, 1, timeout_s=3)
        camera.start()
        assert len(_read(camera.url, 5)) == 6  # the request time, then 5 frames


# --------------------------------------------------------------------------- slow: detserve stream

ROOT = Path(__file__).resolve().parents[2]


class Running:
    """``detserve stream`` in the background; ``stop()`` ends it as Ctrl-C does, after which it writes its report."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "detserve.app.cli", "stream", "--quiet", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # SIGABRT dumps every thread: where it hangs
        )

    def stop(self, timeout_s: float = 60) -> None:
        """SIGTERM, which the command handles as Ctrl-C (cli_base.terminate_as_interrupt); it must exit 0
        within ``timeout_s`` (a hang is shown with every thread's stack). Not SIGINT: a process started
        from a background shell job inherits SIGINT ignored, and Python then installs no Ctrl-C handler."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)
            out, err = self.proc.communicate(timeout=30)
            raise AssertionError(f"detserve stream did not exit {timeout_s:.0f} s after Ctrl-C:\n{err[-6000:]}") from None
        assert self.proc.returncode == 0, err + out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def lines_of(path: Path, stream: str) -> list[dict]:
    """The JSON lines of one stream (the file is appended to while we read: a torn last line is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if item.get("stream") == stream:
            out.append(item)
    return out


@pytest.fixture(scope="module")
def demo_server(demo_copy: Callable[[str], Path]) -> Iterator[TritonServer]:
    from detserve.ops.server import running_server

    with running_server(demo_copy("stream_rtsp")) as srv:
        yield srv


@pytest.fixture
def running() -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(*args: str) -> Running:
        started.append(Running(*args))
        return started[-1]

    yield start
    for r in started:
        r.kill()


@pytest.fixture
def camera_of() -> Iterator[Callable[[ShapesVideo], RtspServer]]:
    """A started camera serving a given video, stopped after the test."""
    if not rtsp_available():
        pytest.skip(MISSING)
    started: list[RtspServer] = []

    def start(video: ShapesVideo) -> RtspServer:
        started.append(RtspServer(video.path, free_port()).start())
        return started[-1]

    yield start
    for camera in started:
        camera.stop()


def _stream(running: Callable[..., Running], server: TritonServer, tmp_path: Path, *sources: str) -> tuple[Running, Path]:
    jsonl = tmp_path / "f.jsonl"
    r = running(
        *sources, "--model", "demo", "--url", server.options.grpc_url, "--jsonl", str(jsonl), "--out", str(tmp_path / "report")
    )
    return r, jsonl


def _report(tmp_path: Path) -> dict[str, dict]:
    return {s["stream"]: s for s in json.loads((tmp_path / "report" / "stream.json").read_text())["streams"]}


@pytest.mark.slow
def test_a_camera_killed_and_restarted_is_reconnected_and_counted(
    demo_server: TritonServer,
    shapes_video: ShapesVideo,
    camera_of: Callable[..., RtspServer],
    running: Callable[..., Running],
    tmp_path: Path,
) -> None:
    camera = camera_of(shapes_video)
    r, jsonl = _stream(running, demo_server, tmp_path, f"cam={camera.url}")
    wait_for(lambda: len(lines_of(jsonl, "cam")) >= 10, 90, "answers before the kill")
    camera.stop()  # SIGKILL: the connection drops, no RTSP teardown
    time.sleep(2)
    before = len(lines_of(jsonl, "cam"))
    camera.start()
    wait_for(lambda: len(lines_of(jsonl, "cam")) >= before + 10, 90, "answers after the restart")
    assert r.proc.poll() is None  # still running all along
    r.stop()
    report = _report(tmp_path)["cam"]
    assert report["reconnects"] >= 1 and report["answered"] >= before + 10 and report["failed"] == 0, report


@pytest.mark.slow
def test_a_corrupt_segment_is_counted_and_the_stream_goes_on(
    demo_server: TritonServer,
    corrupt_shapes_video: ShapesVideo,
    camera_of: Callable[..., RtspServer],
    running: Callable[..., Running],
    tmp_path: Path,
) -> None:
    camera = camera_of(corrupt_shapes_video)  # packets 60-69 garbled; the file runs 250 frames
    r, jsonl = _stream(running, demo_server, tmp_path, f"cam={camera.url}")
    wait_for(lambda: any(x["frame"] > 120 for x in lines_of(jsonl, "cam")), 120, "frames past the corrupt segment")
    r.stop()
    report = _report(tmp_path)["cam"]
    assert report["decode_errors"] >= 1 and report["failed"] == 0, report
    assert report["reconnects"] == 0  # the corrupt packets did not drop the connection


@pytest.mark.slow
def test_eight_concurrent_camera_streams(
    demo_server: TritonServer,
    shapes_video: ShapesVideo,
    camera_of: Callable[..., RtspServer],
    running: Callable[..., Running],
    tmp_path: Path,
) -> None:
    camera = camera_of(shapes_video)  # its factory is not shared: each client its own pipeline
    names = [f"cam{i}" for i in range(8)]
    r, jsonl = _stream(running, demo_server, tmp_path, *(f"{n}={camera.url}" for n in names))
    wait_for(lambda: all(len(lines_of(jsonl, n)) >= 5 for n in names), 180, "answers on all 8 streams")
    r.stop()
    report = _report(tmp_path)
    assert sorted(report) == names
    for n in names:
        frames = [x["frame"] for x in lines_of(jsonl, n)]
        assert frames == sorted(frames) and len(set(frames)) == len(frames), n
        assert report[n]["failed"] == 0 and report[n]["answered"] >= 5, report[n]


@pytest.mark.slow
def test_a_camera_faster_than_the_server_sends_the_newest_frame(
    demo_server: TritonServer,
    fast_shapes_video: ShapesVideo,
    camera_of: Callable[..., RtspServer],
    running: Callable[..., Running],
    tmp_path: Path,
) -> None:
    camera = camera_of(fast_shapes_video)  # 100 FPS, far beyond the demo server on a CPU
    r, jsonl = _stream(running, demo_server, tmp_path, f"fast={camera.url}")
    wait_for(lambda: len(lines_of(jsonl, "fast")) >= 40, 90, "answers")
    r.stop()
    lines = lines_of(jsonl, "fast")
    frames = [x["frame"] for x in lines]
    assert frames == sorted(frames) and max(b - a for a, b in itertools.pairwise(frames)) > 1
    report = _report(tmp_path)["fast"]
    assert report["dropped"] > 0 and report["latency_p99_ms"] < 5000, report  # bounded: never a backlog's worth
