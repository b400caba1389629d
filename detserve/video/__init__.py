"""Live video and video files through the detector ensemble (issue 25): ``detserve stream``.

sources (PyAV decoding, reconnects) -> policy (newest frame / every frame, bounded slots) -> sender
(JPEG through ``IMAGE`` or raw pixels through ``FRAMES``) -> sinks (JSONL, annotated video, live view),
with per-stream metrics and a final report. Talks to the server like a client; draws like jobs.
"""
