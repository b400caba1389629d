"""Triton's latency percentiles are on by default and one flag turns them off (issue 24 part 5)."""

from __future__ import annotations

from pathlib import Path

from detserve.ops.server_options import SUMMARY_LATENCIES, ServerOptions


def test_summary_latencies_are_on_unless_the_operator_sets_them(tmp_path: Path) -> None:
    assert SUMMARY_LATENCIES in ServerOptions(tmp_path).command(tmp_path)
    off = "--metrics-config=summary_latencies=false"
    command = ServerOptions(tmp_path, extra_args=[off]).command(tmp_path)
    # with both on the line (ours first) tritonserver kept them on: detserve's must not be there at all
    assert off in command and SUMMARY_LATENCIES not in command
    other = "--metrics-config=summary_quantiles=0.5:0.05,0.99:0.001"
    assert SUMMARY_LATENCIES in ServerOptions(tmp_path, extra_args=[other]).command(tmp_path)
