"""detserve stream's reader without a server: a file played as a camera (``--live``: paced by its timestamps,
looped, newest frame first) and the RGB conversion left to the frame the sender takes (issue 25 part 8)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from detserve.video.metrics import StreamStats
from detserve.video.policy import Frame, LatestSlot
from detserve.video.sources import Pacer, Reader, ReaderOptions, parse_sources

FPS = 20
FRAMES = 10


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 frames of 64x48 at 20 FPS (0.5 s), H.264 as the bench's camera file."""
    import av

    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for t in range(FRAMES):
            rgb = np.full((48, 64, 3), 20 * t, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_live_files_are_live_sources(clip: Path) -> None:
    (spec,) = parse_sources([f"cam={clip}"], realtime=True)
    assert spec.kind == "file" and spec.realtime and spec.live
    (plain,) = parse_sources([str(clip)])
    assert not plain.live
    (rtsp,) = parse_sources(["rtsp://127.0.0.1:1/x"], realtime=True)
    assert rtsp.live and not rtsp.realtime  # realtime is a file's mode; network sources are live anyway


def test_pacer_follows_timestamps_across_loops() -> None:
    pacer = Pacer()
    due = [pacer.due(i / 10, 10.0) for i in range(3)]
    pacer.rewind()
    due += [pacer.due(0.5 + i / 10, 10.0) for i in range(2)]  # a pass whose first timestamp is not 0
    gaps = np.diff(due)
    assert np.allclose(gaps, 0.1), gaps  # the second pass continues one frame period after the first


def test_a_file_played_live_is_paced_looped_and_converted_only_when_taken(clip: Path) -> None:
    (spec,) = parse_sources([f"cam={clip}"], realtime=True)
    slot, stats = LatestSlot(), StreamStats(spec.stream, spec.url, spec.live)
    reader = Reader(spec, slot, stats, ReaderOptions())
    started = time.monotonic()
    reader.start()
    try:
        deadline = started + 20.0
        while stats.read <= FRAMES + 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        elapsed = time.monotonic() - started
        taken = slot.take(1.0)
    finally:
        reader.stop()
        reader.join(5.0)
    assert not reader.is_alive() and reader.error is None
    assert stats.read > FRAMES + 2  # looped: the file started again at its end
    # paced like a camera: frame 12 is due 0.6 s after the first (a decoder alone reads 12 frames in milliseconds)
    assert elapsed >= (FRAMES + 2) / FPS - 0.05, elapsed
    assert slot.dropped > 0 and stats.reconnects == 0  # nobody took frames: the stale ones were dropped
    assert isinstance(taken, Frame) and not isinstance(taken.picture, np.ndarray)  # still the decoder's frame
    rgb = taken.converted().picture
    assert isinstance(rgb, np.ndarray) and rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    assert reader.size == (64, 48)


def test_in_flight_total_default_is_one_batch_of_a_default_build() -> None:
    from detserve.tritonconfig import ServingOptions
    from detserve.video.session import IN_FLIGHT_TOTAL, SessionOptions

    assert SessionOptions("u", "m").in_flight_total == IN_FLIGHT_TOTAL == ServingOptions().max_batch_size


def test_a_played_file_stopped_as_a_pass_starts_is_not_an_error(clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C/SIGTERM landing while the file is reopened for its next pass: the pass ends with no frame, which
    must read as stopped, not as an empty file (seen: bench-stream's 8-stream run exited 1, 'has no frame')."""
    from detserve.video import sources

    (spec,) = parse_sources([f"cam={clip}"], realtime=True)
    reader = Reader(spec, LatestSlot(), StreamStats(spec.stream, spec.url, True), ReaderOptions())
    real_open = sources._open

    def open_then_stop(*args: object) -> object:
        reader.stop()  # the signal arrives while the container opens
        return real_open(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(sources, "_open", open_then_stop)
    reader.run()  # in this thread: returns once stopped
    assert reader.error is None
