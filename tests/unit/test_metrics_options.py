"""Triton's latency percentiles are on by default and one flag turns them off (issue 24 part 5)."""

from __future__ import annotations

from pathlib import Path

from detserve.ops.server_options import SUMMARY_LATENCIES, ServerOptions


def test_summary_latencies_are_on_and_an_operator_flag_comes_after_it(tmp_path: Path) -> None:
    off = "--metrics-config=summary_latencies=false"
    command = ServerOptions(tmp_path, extra_args=[off]).command(tmp_path)
    assert SUMMARY_LATENCIES in command
    assert command.index(SUMMARY_LATENCIES) < command.index(off)  # tritonserver keeps the last value
    assert SUMMARY_LATENCIES in ServerOptions(tmp_path).command(tmp_path)
