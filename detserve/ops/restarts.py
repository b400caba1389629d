"""What the serve loop needs to restart a process that died: how it ended, in words, and when to try again.

Used for tritonserver (``TritonServer.supervise``) and the gate's nginx (``Gate.supervise``): a crash
loop must not spin (backoff doubles up to ``max_s``), and a process that then ran ``stable_s`` counts
as healthy again, so its next failure is retried at once.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field


def describe_exit(what: str, returncode: int | None) -> str:
    """``tritonserver killed by SIGSEGV``, ``nginx exited with code 1``: the signal, not the log's last lines."""
    if returncode is None:
        return f"{what} is running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"{what} killed by {name}"
    return f"{what} exited with code {returncode}"


@dataclass
class Restart:
    """One restart of a dead process: why it died, when, and how long until it served again."""

    reason: str
    at: float  # monotonic seconds, when the death was seen
    seconds: float | None = None  # until ready again; None while it is not
    error: str | None = None  # the last failed attempt, if any


@dataclass
class Backoff:
    """Delays between restarts: ``first_s``, doubling up to ``max_s``; reset after ``stable_s`` of uptime."""

    first_s: float = 1.0
    max_s: float = 30.0
    stable_s: float = 60.0
    failures: int = 0
    up_since: float | None = field(default=None)

    def up(self, now: float | None = None) -> None:
        self.up_since = time.monotonic() if now is None else now

    def next_delay(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        if self.up_since is not None and now - self.up_since >= self.stable_s:
            self.failures = 0
        self.up_since = None
        delay = min(self.max_s, self.first_s * 2**self.failures)
        self.failures += 1
        return delay
