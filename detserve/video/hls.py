"""HLS playlists, as ``detserve stream`` needs them: what a playlist says (a recording or live, how long its
segments are) and which frames of a reopened live playlist were read before.

FFmpeg's hls demuxer does the reading; these answer what it does not tell: a VOD playlist
(``#EXT-X-ENDLIST``) is a recording, read as a file; a live one is a camera whose frames come a segment at a
time (``#EXT-X-TARGETDURATION`` apart at worst, plus a reload), and which, reopened, lists segments already read.
"""

from __future__ import annotations

import time
import urllib.parse
import urllib.request
from dataclasses import dataclass

from detserve.errors import DetserveError

PLAYLIST_MAX_BYTES = 4 << 20  # a playlist listing a day of 2 s segments is ~3 MB
HTTP = ("http://", "https://")


@dataclass(frozen=True)
class Playlist:
    vod: bool  # #EXT-X-ENDLIST: FFmpeg reads it from its first segment to its last, then stops
    target_s: float | None  # #EXT-X-TARGETDURATION: the longest segment, in seconds

    @property
    def quiet_s(self) -> float:
        """The longest a live playlist's reader can wait for its next frame while all is well: a segment is
        listed only once complete, then read in a burst; FFmpeg sees it at its next reload (up to a target
        duration later) -- two target durations, and a second to download it."""
        return 2 * self.target_s + 1 if self.target_s else 0.0


def _fetch(url: str, timeout_s: float) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # http(s) only: the callers check
            body: bytes = response.read(PLAYLIST_MAX_BYTES + 1)
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts, refusals, a malformed URL
        raise DetserveError(f"HLS playlist {url}: {getattr(e, 'reason', None) or e}", hint="is the origin up?") from e
    if len(body) > PLAYLIST_MAX_BYTES or not body.lstrip().startswith(b"#EXTM3U"):
        raise DetserveError(f"{url} is not an HLS playlist", hint="an .m3u8 URL starts with #EXTM3U")
    return body.decode("utf-8", "replace")


def _first_variant(lines: list[str]) -> str | None:
    """A master playlist's first variant (the URI line after the first #EXT-X-STREAM-INF), else None."""
    for i, line in enumerate(lines):
        if line.startswith("#EXT-X-STREAM-INF"):
            return next((x for x in lines[i + 1 :] if x and not x.startswith("#")), None)
    return None


def _target_s(lines: list[str]) -> float | None:
    for line in lines:
        if line.startswith("#EXT-X-TARGETDURATION:"):
            try:
                return float(line.partition(":")[2])
            except ValueError:
                return None
    return None


def read_playlist(url: str, timeout_s: float = 10.0) -> Playlist:
    """What the origin serves now, not what the URL looks like: the same path can be live during an event and a
    recording after it. A master playlist is decided by its first variant (the variants of one presentation are
    all live or all not)."""
    lines = [x.strip() for x in _fetch(url, timeout_s).splitlines()]
    variant = _first_variant(lines)
    if variant is not None:
        variant = urllib.parse.urljoin(url, variant)
        if not variant.startswith(HTTP):
            raise DetserveError(f"HLS playlist {url}: its variant {variant!r} is not http(s)")
        lines = [x.strip() for x in _fetch(variant, timeout_s).splitlines()]
    return Playlist("#EXT-X-ENDLIST" in lines, _target_s(lines))


# How far behind the last frame read a reopened live playlist's frames count as already read. FFmpeg restarts a
# live playlist 3 segments before its end (its live_start_index): ~30 s at 10 s segments, long ones included.
# A frame further back is new: an origin restarted its timestamps (a restarted encoder starts near 0).
REPLAY_WINDOW_S = 60.0


class ReplayFilter:
    """Frames of a live HLS playlist already read before it was reopened, told apart by timestamp.

    A live playlist keeps listing its last segments; reopened (after a stall, or a drop), FFmpeg decodes them
    again. They are pictures already read: sent again they would be answered as new frames, and the frame-age
    watchdog would never see a playlist that stopped updating. Only the frames at the start of a reopening are
    compared: once a new frame came, a later jump back (``#EXT-X-DISCONTINUITY``) is the stream's own."""

    def __init__(self) -> None:
        self.last: float | None = None  # the timestamp of the last frame read
        self.skipped = 0
        self._upto: float | None = None
        self._finished = False

    def reopened(self, finished: bool) -> None:
        """``finished``: the playlist now ends (#EXT-X-ENDLIST): FFmpeg reads it from its first segment, so every
        frame up to the last one read is a repeat, however far back."""
        self._upto, self._finished = self.last, finished

    def new(self, pts_s: float | None) -> bool:
        upto = self._upto
        if pts_s is not None and upto is not None and pts_s <= upto and (self._finished or pts_s > upto - REPLAY_WINDOW_S):
            self.skipped += 1
            return False
        self._upto = None
        if pts_s is not None:
            self.last = pts_s
        return True


class SegmentPacer:
    """A live playlist's frames released at their own pace. They arrive a segment at a time: 25 frames within a
    few milliseconds every second (1 s segments), and a newest-frame slot keeps the last of each burst -- a
    server that could answer 10 frames a second was given 2 (measured). Released by timestamp, they reach the
    slot as a camera's would. A frame late by more than ``late_s`` (the playlist stalled, its origin restarted)
    or due more than ``ahead_s`` from now (a jump in its timestamps) sets the pace from itself."""

    def __init__(self, late_s: float = 0.5, ahead_s: float = 2.0) -> None:
        self.late_s, self.ahead_s = late_s, ahead_s
        self._offset: float | None = None  # monotonic time - source time

    def due(self, pts_s: float | None, rate: float | None = None) -> float:
        """The monotonic time at which this frame is released (now, for a frame without a timestamp)."""
        now = time.monotonic()
        if pts_s is None:
            return now
        due = now if self._offset is None else self._offset + pts_s
        if self._offset is None or due < now - self.late_s or due > now + self.ahead_s:
            self._offset, due = now - pts_s, now
        return due
