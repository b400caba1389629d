"""The live view and the metrics, over HTTP on loopback only.

``/``                     a page with every stream's live picture
``/stream/<id>.mjpg``     the stream's annotated frames as MJPEG (multipart/x-mixed-replace), which
                          browsers show in an <img>
``/stream/<id>.jpg``      the newest annotated frame
``/view/<id>``            a page with only that stream's live picture, at its own size
``/metrics``              Prometheus text (detserve_stream_*)
``/streams.json``         every stream's summary

Read-only: nothing here changes what runs (streams are added and removed through the control file,
whose file permissions say who may). Bound to 127.0.0.1: the pictures are the camera's.
"""

from __future__ import annotations

import html
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from detserve.errors import DetserveError
from detserve.video.metrics import StreamStats, prometheus_text
from detserve.video.sinks import LatestJpeg

log = logging.getLogger(__name__)
BOUNDARY = "detserveframe"


class ViewServer:
    """Serves ``views()`` (stream id -> LatestJpeg) and ``stats()`` until ``close()``."""

    def __init__(self, port: int, views: Callable[[], dict[str, LatestJpeg]], stats: Callable[[], list[StreamStats]]) -> None:
        handler = _handler(views, stats)
        try:
            self._httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        except OSError as e:
            raise DetserveError(
                f"cannot serve the live view on 127.0.0.1:{port}: {e.strerror or e}", hint="another --view-port"
            ) from e
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="liveview", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _index(ids: list[str]) -> bytes:
    cells = "".join(
        f'<figure><img id="{html.escape(i)}" src="/stream/{html.escape(i)}.mjpg"><figcaption>{html.escape(i)}</figcaption></figure>'
        for i in ids
    )
    style = (
        "body{margin:0;background:#000;color:#ccc;font:12px sans-serif}figure{margin:0;display:inline-block}img{display:block}"
    )
    return f"<!doctype html><html><head><title>detserve stream</title><style>{style}</style></head><body>{cells}</body></html>".encode()


def _handler(views: Callable[[], dict[str, LatestJpeg]], stats: Callable[[], list[StreamStats]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("liveview: " + format, *args)

        def _reply(self, body: bytes, ctype: str, code: int = 200) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = unquote(self.path.split("?")[0])
            if path == "/":
                return self._reply(_index(sorted(views())), "text/html; charset=utf-8")
            if path == "/metrics":
                return self._reply(prometheus_text(stats()).encode(), "text/plain; version=0.0.4; charset=utf-8")
            if path == "/streams.json":
                return self._reply(json.dumps([s.summary() for s in stats()]).encode(), "application/json")
            if path.startswith("/view/"):
                stream = html.escape(path[len("/view/") :])
                page = f'<!doctype html><html><body style="margin:0"><img src="/stream/{stream}.mjpg"></body></html>'
                return self._reply(page.encode(), "text/html; charset=utf-8")
            if path.startswith("/stream/") and path.endswith((".jpg", ".mjpg")):
                stream, _, ext = path[len("/stream/") :].rpartition(".")
                view = views().get(stream)
                if view is None:
                    return self._reply(b"no such stream\n", "text/plain", 404)
                return self._mjpeg(view) if ext == "mjpg" else self._jpeg(view)
            return self._reply(b"not found\n", "text/plain", 404)

        def _jpeg(self, view: LatestJpeg) -> None:
            jpeg, _ = view.wait_newer(0, 5.0)
            if jpeg is None:
                return self._reply(b"no frame yet\n", "text/plain", 503)
            return self._reply(jpeg, "image/jpeg")

        def _mjpeg(self, view: LatestJpeg) -> None:
            self.send_response(200)
            self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            seq = 0
            try:
                while True:
                    jpeg, new = view.wait_newer(seq, 1.0)
                    if new == seq or jpeg is None:
                        if view.closed:
                            return
                        continue
                    seq = new
                    head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode()
                    self.wfile.write(head + jpeg + b"\r\n")
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return  # the viewer went away

    return Handler
