"""A real RTSP server (GStreamer's gst-rtsp-server) serving one H.264 MP4 file, for tests.

Runs under the SYSTEM python3 (Debian's python3-gst-1.0 and gir1.2-gst-rtsp-server-1.0 bind it, not
the venv's interpreter); started and stopped by tests/rtsp_server.py. Each client gets its own
pipeline from the file's start (the factory is not shared), paced at the file's frame rate like a
camera; at the file's end the client's stream ends (EOS), which a reader sees as the source dropping.

    /usr/bin/python3 tests/rtsp_gst.py --port 8554 --mount /shapes --file video.mp4
Prints ``ready rtsp://127.0.0.1:PORT/MOUNT`` on stdout once it listens.
"""

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mount", default="/stream")
    p.add_argument("--file", required=True)
    args = p.parse_args()
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    location = args.file.replace("\\", "\\\\").replace('"', '\\"')
    # qtdemux takes MP4; config-interval=-1 repeats SPS/PPS with every key frame, so a client that
    # joins late or lost packets can start decoding at the next one
    factory.set_launch(f'( filesrc location="{location}" ! qtdemux ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=-1 )')
    factory.set_shared(False)
    server.get_mount_points().add_factory(args.mount, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
        return 1
    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    print(f"ready rtsp://127.0.0.1:{args.port}{args.mount}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
