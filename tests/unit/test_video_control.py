"""The control file's plan (detserve/video/session.plan_control): what starts and stops when the file changes."""

from __future__ import annotations

from pathlib import Path

from detserve.video.session import plan_control
from detserve.video.sources import SourceSpec, parse_sources


def _files(tmp_path: Path, *names: str) -> list[Path]:
    paths = [tmp_path / n for n in names]
    for p in paths:
        p.write_bytes(b"\0")  # parse_sources only checks that a file exists
    return paths


def test_added_and_removed_lines_start_and_stop_streams(tmp_path: Path) -> None:
    a, b = _files(tmp_path, "a.mp4", "b.mp4")
    first = plan_control([f"cam={a}"], {}, {}, set(), False)
    assert [s.stream for s in first.start] == ["cam"] and first.stop == []
    running = dict(first.wanted)
    second = plan_control([f"cam={a}", str(b)], first.by_line, running, set(first.wanted), False)
    assert [s.stream for s in second.start] == ["b"] and second.stop == []
    running.update(second.wanted)
    third = plan_control([str(b)], second.by_line, running, set(second.wanted), False)
    assert third.stop == ["cam"] and third.start == []


def test_a_line_whose_source_changed_restarts_its_stream_on_the_new_source(tmp_path: Path) -> None:
    """Before: a stream id already running was left on its old source, the edit ignored without a word."""
    a, b = _files(tmp_path, "a.mp4", "b.mp4")
    first = plan_control([f"cam={a}"], {}, {}, set(), False)
    plan = plan_control([f"cam={b}"], first.by_line, dict(first.wanted), {"cam"}, False)
    assert plan.stop == ["cam"] and [s.url for s in plan.start] == [str(b)]


def test_an_unchanged_line_is_not_parsed_again() -> None:
    """A live HLS line's playlist was fetched again at every edit of the file (on the tick thread): an origin
    that is slow or gone now held up every other change. Its source as parsed is kept; here the origin is gone
    (nothing listens on port 9), so parsing it again would refuse the line and stop its stream."""
    line = "cam=http://127.0.0.1:9/live.m3u8"
    spec = SourceSpec("cam", "http://127.0.0.1:9/live.m3u8", "hls")
    plan = plan_control([line], {line: spec}, {"cam": spec}, {"cam"}, False)
    assert plan.stop == [] and plan.start == [] and plan.wanted == {"cam": spec}


def test_a_command_line_stream_is_not_taken_over(tmp_path: Path) -> None:
    """A control line whose default id is a command-line stream's gets its own id; removing it later must not
    stop the command line's stream. An explicit id of a command-line stream is refused (logged), not restarted."""
    (a,) = _files(tmp_path, "cam.mp4")
    cli = parse_sources([str(a)])[0]
    plan = plan_control([str(a), f"cam={a}"], {}, {"cam": cli}, set(), False)
    assert [s.stream for s in plan.start] == ["cam-2"] and plan.stop == []
    later = plan_control([], plan.by_line, {"cam": cli, **plan.wanted}, set(plan.wanted), False)
    assert later.stop == ["cam-2"]
