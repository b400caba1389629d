"""``detserve stream``: video files and live sources through a served ensemble (issue 25)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from detserve.app.cli_base import app, terminate_as_interrupt, user_errors
from detserve.errors import DetserveError

if TYPE_CHECKING:
    from detserve.video.session import Session


@app.command()
@user_errors
def stream(
    source: Annotated[
        list[str], typer.Argument(help="[ID=]SOURCE: a video file, rtsp://, http(s):// (HLS, MJPEG), /dev/videoN")
    ] = [],  # noqa: B006
    model: Annotated[str, typer.Option(help="ensemble name")] = "",
    url: Annotated[str, typer.Option(help="gRPC HOST:PORT")] = "127.0.0.1:8001",
    max_fps: Annotated[
        float | None, typer.Option(help="files: at most this many frames per second of video (default: every frame)")
    ] = None,
    live: Annotated[
        bool,
        typer.Option(
            help="play files as live cameras: at their real-time pace, newest frame first (stale ones dropped), "
            "looped until Ctrl-C"
        ),
    ] = False,
    track: Annotated[bool, typer.Option(help="persistent track ids per stream")] = False,
    jsonl: Annotated[Path | None, typer.Option(help="write one JSON line per frame here")] = None,
    video_out: Annotated[Path | None, typer.Option(help="write an annotated MP4 per stream into this folder")] = None,
    view_port: Annotated[int | None, typer.Option(help="live view + /metrics on 127.0.0.1:PORT (0: any free port)")] = None,
    transport: Annotated[
        str,
        typer.Option(
            help="auto (raw to a server on this host that has FRAMES, else jpeg) | jpeg (IMAGE input) | raw (FRAMES input, uint8 RGB)"
        ),
    ] = "auto",
    control: Annotated[
        Path | None, typer.Option(help="file of [ID=]SOURCE lines, re-read when it changes: add/remove streams")
    ] = None,
    in_flight: Annotated[int, typer.Option(help="requests in flight per stream")] = 2,
    in_flight_total: Annotated[
        int,
        typer.Option(
            help="requests in flight over all streams, at most one per stream + 2 spare (8: one batch of a default detserve build)"
        ),
    ] = 8,
    stall: Annotated[
        float, typer.Option(help="seconds without a frame before a live source counts as stalled and is reopened")
    ] = 5.0,
    score_threshold: Annotated[float | None, typer.Option(help="sent with every request")] = None,
    out: Annotated[Path, typer.Option(help="report folder (stream.md, stream.json, stream.png)")] = Path("out/stream"),
    quiet: Annotated[bool, typer.Option(help="no live table")] = False,
) -> None:
    """Detect on video: every frame of a file in order, the newest frame of a live source; per-stream figures live,
    JSONL, annotated MP4s, an MJPEG live view and Prometheus metrics; a report at the end."""
    from detserve.video.session import Session, SessionOptions
    from detserve.video.sources import parse_sources

    if not model:
        raise DetserveError("--model is required", hint="the ensemble name, e.g. --model demo")
    if not source and control is None:
        raise DetserveError("no source", hint="give SOURCE arguments, or --control FILE")
    if live and max_fps is not None:
        raise DetserveError(
            "--max-fps samples files read in order; --live plays them as cameras", hint="drop one of the two options"
        )
    _check_limits(in_flight, in_flight_total, max_fps, stall)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    opts = SessionOptions(
        url=url, model=model, transport=transport, max_fps=max_fps, live_files=live, track=track, jsonl=jsonl, video_out=video_out,
        view_port=view_port, control=control, in_flight_per_stream=in_flight, in_flight_total=in_flight_total,
        stall_s=stall, score_threshold=score_threshold,
    )  # fmt: skip
    specs = parse_sources(source, realtime=live)
    # Ctrl-C (SIGINT) is how a run ends and writes its report, even where it was started in the background of a
    # script (`detserve stream ... &`): the shell sets SIGINT to ignored there, and Python then never raises
    # KeyboardInterrupt — `kill -INT` would do nothing and the run would never end.
    terminate_as_interrupt(sigint=True)
    session = Session(opts)
    if session.view is not None:
        typer.echo(f"live view: {session.view.url}  metrics: {session.view.url}metrics", err=True)
    try:
        session.add(specs)
        _run(session, quiet)
    except KeyboardInterrupt:
        typer.echo("interrupted: finishing what is in flight", err=True)
    finally:
        session.close()
    _report(session, out)


def _check_limits(in_flight: int, in_flight_total: int, max_fps: float | None, stall: float) -> None:
    """Before anything connects: the session would otherwise rewrite these silently (0 in flight ran as 1,
    --max-fps 0 or below as every frame) or reopen every live source at once (--stall 0)."""
    for option, value in (("--in-flight", in_flight), ("--in-flight-total", in_flight_total)):
        if value < 1:
            raise DetserveError(f"{option} must be at least 1, got {value}")
    if max_fps is not None and max_fps <= 0:
        raise DetserveError(f"--max-fps must be above 0, got {max_fps:g}", hint="leave it out for every frame")
    if stall <= 0:
        raise DetserveError(f"--stall must be above 0 seconds, got {stall:g}")


def _run(session: Session, quiet: bool) -> None:
    from rich.console import Console
    from rich.live import Live

    from detserve.video.metrics import live_table

    if quiet:
        session.run()
        return
    console = Console(stderr=True)
    with Live(live_table(session.all_stats()), console=console, refresh_per_second=2, transient=False) as live:
        session.run(lambda: live.update(live_table(session.all_stats())))
        live.update(live_table(session.all_stats()))


def _report(session: Session, out: Path) -> None:
    import time

    from detserve.video.report import build, write_report

    stats = session.all_stats()
    o = session.opts
    doc = build(
        stats,
        o.model,
        o.url,
        session.outputs.sender.transport,
        time.monotonic() - session.started,
        session.outputs.sender.bytes_sent,
    )
    files = write_report(doc, stats, out)
    typer.echo(files["md"].read_text())
    typer.echo(f"report: {', '.join(str(p) for p in files.values())}")
    failed = session.failed_streams()
    if failed:
        raise DetserveError(
            "some streams failed: " + "; ".join(failed), hint="a frame's error is in the JSONL (--jsonl) and the log above"
        )
