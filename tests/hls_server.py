"""A real HLS origin for tests (issue 25 part 1): FFmpeg's own ``hls`` muxer (through PyAV, FFmpeg inside its
wheel) cuts a video into MPEG-TS segments and writes the ``.m3u8``; a loopback ``http.server`` thread serves the
folder. Nothing is re-encoded: the H.264 packets of a generated moving-shapes video are remuxed.

- ``write_vod``: a VOD playlist (``#EXT-X-PLAYLIST-TYPE:VOD`` ... ``#EXT-X-ENDLIST``), every segment listed;
- ``LivePlaylist``: a thread muxing the packets at their real-time pace (looping the video, timestamps
  continuing), a sliding window of ``window`` segments, older ones deleted, no end tag -- as a live origin
  publishes; ``pause()`` stops updating the playlist (a stalled encoder), ``resume()`` goes on;
- ``HlsServer``: ``http://127.0.0.1:PORT/<name>`` for a folder; ``stop()`` takes it away (connections refused).
"""

from __future__ import annotations

import functools
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SEGMENT_S = 1  # the shapes videos have a key frame every 25 frames (1 s): one segment a second


def _packets(video: Path) -> tuple[list[Any], Any, float]:
    """The video's packets (demuxed once, kept), its stream (a template for the muxer) and its duration in s."""
    import av

    container = av.open(str(video))
    stream = container.streams.video[0]
    packets = [p for p in container.demux(stream) if p.dts is not None]
    duration = float((packets[-1].pts + packets[-1].duration) * stream.time_base)
    return packets, container, duration


def _hls_output(playlist: Path, segment_s: float = SEGMENT_S, **options: str) -> Any:
    import av

    return av.open(
        str(playlist), mode="w", format="hls",
        options={"hls_time": str(segment_s), "hls_segment_filename": str(playlist.with_suffix("")) + "%05d.ts", **options},
    )  # fmt: skip


def write_vod(video: Path, playlist: Path) -> Path:
    """``video`` (H.264) as a VOD HLS playlist beside its segments."""
    packets, source, _ = _packets(video)
    with source, _hls_output(playlist, hls_list_size="0", hls_playlist_type="vod") as out:
        stream = out.add_stream_from_template(source.streams.video[0])
        for packet in packets:
            packet.stream = stream
            out.mux(packet)
    return playlist


class LivePlaylist(threading.Thread):
    """``video`` published live at ``playlist``: real-time pace, ``window`` segments listed, older ones deleted;
    segments of ``segment_s`` (cut at the video's key frames)."""

    def __init__(self, video: Path, playlist: Path, window: int = 4, segment_s: float = SEGMENT_S) -> None:
        super().__init__(name="hls-live", daemon=True)
        self.video, self.playlist, self.window, self.segment_s = video, playlist, window, segment_s
        self._running = threading.Event()
        self._running.set()
        self._closed = threading.Event()
        self.published = 0  # packets muxed so far
        self.error: BaseException | None = None

    def pause(self) -> None:
        """Stop updating the playlist (its last segments stay listed, nothing new comes)."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def close(self) -> None:
        self._closed.set()
        self._running.set()
        self.join(10)

    def run(self) -> None:
        try:
            self._publish()
        except BaseException as e:  # seen by the test, not lost in a thread
            self.error = e

    def _publish(self) -> None:
        packets, source, duration = _packets(self.video)
        flags = "delete_segments+omit_endlist+temp_file"  # a live origin: sliding window, no end, no torn files
        with source, _hls_output(self.playlist, self.segment_s, hls_list_size=str(self.window), hls_flags=flags) as out:
            stream = out.add_stream_from_template(source.streams.video[0])
            base, loop, clock = source.streams.video[0].time_base, 0, time.monotonic()
            while not self._closed.is_set():
                for packet in packets:
                    if not self._running.is_set():
                        paused = time.monotonic()
                        self._running.wait()
                        clock += time.monotonic() - paused  # the pace goes on from where it stopped
                    if self._closed.is_set():
                        return
                    offset = int(loop * duration / base)  # each loop continues the timestamps
                    due = clock + float((packet.pts + offset) * base)
                    time.sleep(max(0.0, due - time.monotonic()))
                    copy = type(packet)(bytes(packet))
                    copy.pts, copy.dts, copy.time_base = packet.pts + offset, packet.dts + offset, base
                    copy.is_keyframe, copy.stream = packet.is_keyframe, stream
                    out.mux(copy)
                    self.published += 1
                loop += 1


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a reader that closes mid-segment (it was stopped, or reopens): not the test's failure


class HlsServer:
    """A loopback HTTP server thread for ``directory``; a context manager that stops it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._httpd = _Server(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(directory)))
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hls-http", daemon=True)
        self._thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        """The origin goes away: the port closes, every later request is refused."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(10)

    def __enter__(self) -> HlsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
