"""SIGTERM/SIGINT as Ctrl-C, a duplicate ignored (detserve/app/cli_base.terminate_as_interrupt), with real signals."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# what a command does: work until interrupted, then a stop that takes a while (the report, the undo)
SCRIPT = """
import sys, time
from detserve.app.cli_base import terminate_as_interrupt
terminate_as_interrupt(sigint=True)
print("ready", flush=True)
try:
    time.sleep(60)
except KeyboardInterrupt:
    try:
        time.sleep(float(sys.argv[1]))
    except KeyboardInterrupt:
        print("stop aborted", flush=True)
        sys.exit(130)
    print("stopped cleanly", flush=True)
"""


def _stopped(second: signal.Signals, after_s: float, stop_s: float = 1.0) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(stop_s)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    time.sleep(after_s)
    proc.send_signal(second)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out


def test_a_stop_signal_sent_twice_does_not_abort_the_stop() -> None:
    """``timeout`` sends SIGTERM to the command and again to its process group. Before: the second one, 10-200 ms
    later, aborted the stop (``detserve stream``: exit 130, no report, its MP4s unfinished)."""
    assert _stopped(signal.SIGTERM, 0.1) == (0, "stopped cleanly\n")
    assert _stopped(signal.SIGINT, 0.05) == (0, "stopped cleanly\n")


def test_a_later_second_interrupt_still_aborts_the_stop() -> None:
    """A person pressing Ctrl-C again while the stop runs means it."""
    assert _stopped(signal.SIGINT, 1.5, stop_s=5.0) == (130, "stop aborted\n")
