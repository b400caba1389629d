"""Memory of ``detserve stream`` stays flat over a long run (issue 25 part 2): 8 live sources at 25 fps,
faster together than the demo server answers on this machine, so every stream drops frames all the
time — the case where an unbounded queue anywhere would grow. RSS is sampled every 5 s; after a
warm-up it must not keep growing. ``DETSERVE_STREAM_SOAK_S`` sets the length (default 120 s; the
figures in the docs come from 600 s); ``DETSERVE_STREAM_SOAK_OUT`` writes the samples as JSON."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from detserve.ops.server import TritonServer

ROOT = Path(__file__).resolve().parents[2]
STREAMS = 8


@pytest.fixture(scope="module")
def soak_server(demo_copy: Callable[[str], Path]) -> Iterator[TritonServer]:
    from detserve.ops.server import running_server

    with running_server(demo_copy("stream_soak")) as srv:
        yield srv


@pytest.mark.slow
def test_rss_flat_over_a_long_run_of_eight_live_streams(soak_server: TritonServer, tmp_path: Path) -> None:
    import psutil

    seconds = float(os.environ.get("DETSERVE_STREAM_SOAK_S", "120"))
    control = tmp_path / "streams.txt"
    control.write_text("".join(f"cam{i}=lavfi:testsrc2=size=640x480:rate=25,realtime\n" for i in range(STREAMS)))
    control.chmod(0o600)
    proc = subprocess.Popen(
        [sys.executable, "-m", "detserve.app.cli", "stream", "--quiet", "--model", "demo", "--url",
         soak_server.options.grpc_url, "--control", str(control), "--out", str(tmp_path / "report")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    samples: list[tuple[float, float]] = []
    try:
        p = psutil.Process(proc.pid)
        start = time.monotonic()
        while (t := time.monotonic() - start) < seconds and proc.poll() is None:
            samples.append((round(t, 1), p.memory_info().rss / 2**20))
            time.sleep(5)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    report = json.loads((tmp_path / "report" / "stream.json").read_text())
    if os.environ.get("DETSERVE_STREAM_SOAK_OUT"):
        Path(os.environ["DETSERVE_STREAM_SOAK_OUT"]).write_text(json.dumps({"rss_mib": samples, "report": report}, indent=1))
    warm = [m for t, m in samples if t >= min(30.0, seconds / 4)]
    half = len(warm) // 2
    first, second = max(warm[:half]), max(warm[half:])
    assert all(s["answered"] > 0 and s["dropped"] > 0 for s in report["streams"])  # busy: the drop path runs all along
    assert second - first < 25, f"RSS grew from {first:.0f} to {second:.0f} MiB: {samples}"
