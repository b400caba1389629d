"""``detserve stream`` on HLS (issue 25 part 1) with real parts: FFmpeg's own hls muxer (PyAV) cuts a generated
moving-shapes video into MPEG-TS segments, a loopback HTTP server thread serves them (tests/hls_server.py), and
the CLI streams ``http://127.0.0.1:P/x.m3u8`` against a real tritonserver.

- a VOD playlist (``#EXT-X-ENDLIST``) is read as a file: every frame answered once, in order, then it ends
  (fast: the session's shared server, ~4 s);
- a live playlist (sliding window, old segments deleted, no end tag) is read as a camera, newest frame first;
  when it stops updating the stall is counted and the frames it still lists are not sent again; it resumes;
  when the origin goes away the reconnects are counted and the client neither crashes nor ends (slow).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from detserve.ops.server import TritonServer
from tests.hls_server import HlsServer, LivePlaylist, write_vod
from tests.integration import test_stream_rtsp
from tests.integration.conftest import SHAPES
from tests.integration.test_stream_rtsp import Running, lines_of, wait_for
from tests.rtsp_server import write_shapes_video

running = test_stream_rtsp.running  # the fixture: detserve stream processes, killed after the test

CLIP_FRAMES = 50


@pytest.fixture(scope="module")
def shapes_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2 s moving-shapes clip (50 frames, 640x480, H.264, a key frame a second): two HLS segments. (H.264: an
    MPEG-4 part 2 stream remuxed from MP4 into MPEG-TS loses its global header, and no frame decodes.)"""
    return write_shapes_video(tmp_path_factory.mktemp("hls_clip"), frames=CLIP_FRAMES).path


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[HlsServer]:
    (tmp_path / "hls").mkdir()
    with HlsServer(tmp_path / "hls") as server:
        yield server


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.documents("detserve stream vod=V --model M --url U --quiet --jsonl F --out O")
def test_a_vod_playlist_is_read_as_a_file_every_frame_once_in_order(
    grpc_url: str, shapes_clip: Path, origin: HlsServer, tmp_path: Path
) -> None:
    """Before: an http(s) URL was always a live source -- frames dropped, and at the playlist's end the
    "lost" source was reopened and the whole video replayed, again and again; the run never ended."""
    import subprocess
    import sys

    from tests.integration.test_stream import ROOT

    write_vod(shapes_clip, origin.directory / "pan.m3u8")
    jsonl, out = tmp_path / "f.jsonl", tmp_path / "report"
    run = subprocess.run(
        [sys.executable, "-m", "detserve.app.cli", "stream", f"vod={origin.url('pan.m3u8')}", "--model", SHAPES,
         "--url", grpc_url, "--quiet", "--jsonl", str(jsonl), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr + run.stdout
    lines = _jsonl(jsonl)
    assert [x["frame"] for x in lines] == list(range(CLIP_FRAMES))  # each once, in order, none dropped
    assert all(x["dropped"] == 0 and "error" not in x for x in lines)
    assert sum(len(x["detections"]) for x in lines) >= CLIP_FRAMES  # the demo detector sees the moving shapes
    assert [round(x["pts_s"], 2) for x in lines[:3]] == [0.0, 0.04, 0.08]
    (report,) = json.loads((out / "stream.json").read_text())["streams"]
    assert (report["live"], report["state"], report["answered"]) == (False, "ended", CLIP_FRAMES)
    assert report["reconnects"] == report["decode_errors"] == report["dropped"] == 0, report


# --------------------------------------------------------------------------- slow: a live playlist


@pytest.fixture(scope="module")
def demo_server(demo_copy: Callable[[str], Path]) -> Iterator[TritonServer]:
    from detserve.ops.server import running_server

    with running_server(demo_copy("stream_hls")) as srv:
        yield srv


@pytest.fixture
def live_playlist(shapes_clip: Path, origin: HlsServer) -> Iterator[LivePlaylist]:
    publisher = LivePlaylist(shapes_clip, origin.directory / "live.m3u8")
    publisher.start()
    wait_for(lambda: (origin.directory / "live.m3u8").exists(), 30, "the live playlist's first segment")
    yield publisher
    publisher.close()
    assert publisher.error is None, publisher.error


def _growth(jsonl: Path, seconds: float) -> int:
    import time

    before = len(lines_of(jsonl, "live"))
    time.sleep(seconds)
    return len(lines_of(jsonl, "live")) - before


@pytest.mark.slow
def test_a_live_playlist_newest_frame_first_stall_counted_not_replayed_origin_loss_survived(
    demo_server: TritonServer,
    origin: HlsServer,
    live_playlist: LivePlaylist,
    running: Callable[..., Running],
    tmp_path: Path,
) -> None:
    """Before: a playlist that stopped updating ended FFmpeg's read cleanly; the reopened playlist still listed
    its last segments, which were decoded and sent again as new frames (the same pictures answered over and
    over), so the stream was never seen stalled."""
    jsonl, out = tmp_path / "f.jsonl", tmp_path / "report"
    r = running(f"live={origin.url('live.m3u8')}", "--model", "demo", "--url", demo_server.options.grpc_url,
                "--stall", "2", "--jsonl", str(jsonl), "--out", str(out))  # fmt: skip
    wait_for(lambda: len(lines_of(jsonl, "live")) >= 20, 90, "answers from the live playlist")
    live_playlist.pause()  # the encoder stalls: the playlist keeps listing its last segments
    wait_for(lambda: _growth(jsonl, 6.0) == 0, 60, "no new answers while the playlist is not updated")
    assert r.proc.poll() is None
    stalled = len(lines_of(jsonl, "live"))
    live_playlist.resume()
    wait_for(lambda: len(lines_of(jsonl, "live")) >= stalled + 10, 60, "answers after the playlist resumed")
    origin.stop()  # the origin goes away: refusals, reopened with backoff
    wait_for(lambda: _growth(jsonl, 6.0) == 0, 60, "the answers to stop with the origin gone")
    assert r.proc.poll() is None  # still running: a live source is waited for, not given up
    r.stop()
    lines = lines_of(jsonl, "live")
    pts = [x["pts_s"] for x in lines]
    assert all(b > a for a, b in itertools.pairwise(pts)), "a picture sent twice (a replayed segment)"
    frames = [x["frame"] for x in lines]
    assert frames == sorted(frames) and all("error" not in x for x in lines)
    (report,) = json.loads((out / "stream.json").read_text())["streams"]
    assert report["live"] and report["failed"] == 0 and report["dropped"] > 0, report  # newest frame first
    assert report["stalls"] >= 1 and report["reconnects"] >= 2, report
