"""What every ``detserve`` command module shares: the Typer app, the user-error wrapper, common options."""

from __future__ import annotations

import functools
import signal
import time
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from detserve.errors import DetserveError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Serve PyTorch object detectors on Triton.")
F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """A DetserveError is the user's to fix: message + hint, exit 1, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DetserveError as e:
            typer.secho(f"error: {e.message}", fg=typer.colors.RED, err=True)
            if e.hint:
                typer.echo(f"hint: {e.hint}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def seconds(text: str) -> float:
    """'60s', '2m', '90' -> seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    try:
        return float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError as e:
        raise DetserveError(f"not a duration: {text!r}", hint="e.g. 30s, 2m") from e


def load_window(users: int, duration: str) -> float:
    """``--users``/``--duration`` of a command that serves before it loads, checked before anything starts (before: the
    load generator refused them only after the build and the server start)."""
    if users < 1:
        raise DetserveError(f"--users must be at least 1, got {users}")
    if (duration_s := seconds(duration)) <= 0:
        raise DetserveError(f"--duration must be above 0, got {duration!r}", hint="e.g. 10s, 2m")
    return duration_s


URL = Annotated[str, typer.Option(help="gRPC HOST:PORT")]


# A stop signal this soon after the previous one is the same stop sent twice, not a second Ctrl-C
DUPLICATE_STOP_S = 1.0


class _Interrupt:
    """SIGTERM/SIGINT raised as KeyboardInterrupt (Ctrl-C), a duplicate within DUPLICATE_STOP_S ignored.
    ``timeout`` (coreutils) sends its signal to the command and then to the whole process group, so the command
    gets it twice; the second landed while the first one's stop ran and aborted it (seen: ``detserve stream`` ended
    with exit 130 and no report, its MP4s unfinished, with the second SIGTERM 10-200 ms after the first). A signal
    later than that still aborts the stop: a person pressing Ctrl-C again means it."""

    def __init__(self) -> None:
        self.last = -DUPLICATE_STOP_S

    def __call__(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        duplicate = now - self.last < DUPLICATE_STOP_S
        self.last = now
        if not duplicate:
            raise KeyboardInterrupt


_INTERRUPT = _Interrupt()


def terminate_as_interrupt(sigint: bool = False) -> None:
    """SIGTERM handled as Ctrl-C. In a container the command is PID 1, for which the kernel ignores a
    signal without a handler: ``kubectl delete job`` would leave a promote running until SIGKILL,
    skipping the undo that Ctrl-C runs (a canary switched back, an aborted rollout narrowed back), and
    a command that starts its own servers (bench, bench-stream, tune, memory, demo, ops-report) would
    leave them running (seen before they called this: `timeout` left tritonserver and nginx behind).
    SIGINT gets the same handler where Python's own is installed (not where it was ignored: a
    background job), or always with ``sigint`` (a command whose Ctrl-C is how a run ends)."""
    signal.signal(signal.SIGTERM, _INTERRUPT)
    if sigint or signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _INTERRUPT)
