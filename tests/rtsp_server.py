"""A real RTSP camera for tests (issue 25 part 7): GStreamer's RTSP server serving a generated
moving-shapes video, and the videos themselves (plain, corrupt in the middle, faster than real time).

The server runs tests/rtsp_gst.py under the system python3 (Debian's python3-gst-1.0 and
gir1.2-gst-rtsp-server-1.0, plus gstreamer1.0-plugins-{base,good,bad} for qtdemux / h264parse /
rtph264pay; scripts/setup.sh installs them when missing). Nothing is downloaded; everything listens
on 127.0.0.1. ``RtspServer.stop()`` / ``start()`` kill and restart the camera on the same port and
mount (a source that drops and comes back). Fixtures (imported by tests/integration/conftest.py):

- ``shapes_video``: a 10 s 640x480 25 FPS H.264 MP4 of moving shapes (seed 0) and its truth;
- ``corrupt_shapes_video``: the same with packets 60-69 (P frames; key frames every 25) garbled
  past their first NAL header: those frames fail to decode or decode wrong, the stream goes on;
- ``fast_shapes_video``: the same frames at 100 FPS (a live source faster than any CPU server);
- ``rtsp_camera``: a started server on a free port serving ``shapes_video`` (stopped after the test).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SYSTEM_PYTHON = "/usr/bin/python3"
SERVER_SCRIPT = HERE / "rtsp_gst.py"
MISSING = "GStreamer's RTSP server is not installed (scripts/setup.sh installs gir1.2-gst-rtsp-server-1.0, python3-gst-1.0)"


@cache
def rtsp_available() -> bool:
    """The system python3 imports GStreamer's RTSP server and the elements the pipeline needs."""
    probe = (
        "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0');"
        "from gi.repository import Gst, GstRtspServer; Gst.init(None);"
        "assert all(Gst.ElementFactory.find(e) for e in ('qtdemux', 'h264parse', 'rtph264pay'))"
    )
    if not Path(SYSTEM_PYTHON).is_file():
        return False
    return subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, timeout=60).returncode == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RtspServer:
    """One RTSP server process serving ``file`` at ``url``; a context manager that stops it."""

    file: Path
    port: int
    mount: str = "/shapes"
    process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}{self.mount}"

    def start(self, timeout_s: float = 30.0) -> RtspServer:
        if self.process is not None:
            raise RuntimeError("already started")
        # its own session: stop() signals the whole group, nothing of it outlives the test
        self.process = subprocess.Popen(
            [SYSTEM_PYTHON, str(SERVER_SCRIPT), "--port", str(self.port), "--mount", self.mount, "--file", str(self.file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            env={k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))},
        )
        assert self.process.stdout is not None
        # "ready ..." once it listens; "" if it died
        line = self.process.stdout.readline() if select.select([self.process.stdout], [], [], timeout_s)[0] else ""
        if not line.startswith("ready"):
            self.stop()
            raise RuntimeError(f"the RTSP server did not start within {timeout_s:.0f} s: {line!r}")
        return self

    def stop(self) -> None:
        """SIGKILL, as a camera that loses power: clients see the connection drop, no teardown."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def __enter__(self) -> RtspServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def corrupt_packets(src: Path, dst: Path, first: int, count: int) -> Path:
    """A copy of ``src`` (H.264 in MP4) with packets ``first .. first + count - 1`` garbled after their
    first 8 bytes (the NAL length and header stay, its payload is noise); timing and container intact."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    with av.open(str(src)) as inp, av.open(str(dst), mode="w") as out:
        s_in = inp.streams.video[0]
        s_out = out.add_stream_from_template(s_in)
        for i, packet in enumerate(p for p in inp.demux(s_in) if p.dts is not None):
            if first <= i < first + count:
                data = bytearray(bytes(packet))
                data[8:] = rng.integers(0, 256, size=len(data) - 8, dtype=np.uint8).tobytes()
                garbled = av.Packet(bytes(data))
                garbled.pts, garbled.dts, garbled.time_base = packet.pts, packet.dts, packet.time_base
                packet = garbled
            packet.stream = s_out
            out.mux(packet)
    return dst


@dataclass(frozen=True)
class ShapesVideo:
    path: Path
    truth: Path  # MOTChallenge gt.txt
    frames: int
    fps: int


def write_shapes_video(directory: Path, frames: int = 250, fps: int = 25, seed: int = 0) -> ShapesVideo:
    from training.moving_shapes import MovingShapes, VideoConfig, write_truth, write_video

    video = MovingShapes(VideoConfig(seed=seed, frames=frames, fps=fps))
    directory.mkdir(parents=True, exist_ok=True)
    path = write_video(video, directory / f"shapes_{seed}_{fps}fps.mp4")
    truth = write_truth(video.truth(), directory / f"shapes_{seed}_gt.txt")
    return ShapesVideo(path, truth, frames, fps)


@pytest.fixture(scope="session")
def shapes_video(tmp_path_factory: pytest.TempPathFactory) -> ShapesVideo:
    return write_shapes_video(tmp_path_factory.mktemp("shapes_video"))


@pytest.fixture(scope="session")
def corrupt_shapes_video(shapes_video: ShapesVideo, tmp_path_factory: pytest.TempPathFactory) -> ShapesVideo:
    dst = tmp_path_factory.mktemp("corrupt_video") / "shapes_corrupt.mp4"
    return replace(shapes_video, path=corrupt_packets(shapes_video.path, dst, 60, 10))


@pytest.fixture(scope="session")
def fast_shapes_video(tmp_path_factory: pytest.TempPathFactory) -> ShapesVideo:
    return write_shapes_video(tmp_path_factory.mktemp("fast_video"), frames=500, fps=100)


@pytest.fixture
def rtsp_camera(shapes_video: ShapesVideo) -> Iterator[RtspServer]:
    if not rtsp_available():
        pytest.skip(MISSING)
    with RtspServer(shapes_video.path, free_port()) as server:
        yield server
