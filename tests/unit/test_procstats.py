"""Per-process CPU and memory accounting from /proc (loadtest/procstats.py), on real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from loadtest.procstats import (
    CpuSampler,
    CpuSeries,
    ProcessMemory,
    descendants,
    memory_by_role,
    memory_table,
    read_proc,
    role_of_process,
)

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")


def test_roles_from_command_lines() -> None:
    stub = [
        "/x/backends/python/triton_python_backend_stub", "/repo/demo_core/1/model.py", "shm", "1", "2", "99",
        "/x/backends/python", "handle", "demo_core_0_0", "/repo/demo_core",
    ]  # fmt: skip
    assert role_of_process(stub) == "stub demo_core"
    assert (
        role_of_process(["/venv/site-packages/pytriton/tritonserver/bin/tritonserver", "--model-repository=/r"]) == "tritonserver"
    )
    assert role_of_process(["nginx: worker process"]) == "gate"
    assert role_of_process(["/venv/bin/python", "-m", "locust", "-f", "x.py"]) == "locust"
    assert role_of_process(["/venv/bin/python", "-m", "loadtest.flask_baseline", "--port", "1"]) == "flask"
    assert role_of_process(["/bin/sleep", "1"]) == "other"
    assert role_of_process([]) == "other"


def test_window_interpolates_each_counter_and_sums_by_role() -> None:
    series = CpuSeries(
        samples=[(10.0, {1: 0.0, 2: 5.0}), (12.0, {1: 2.0, 2: 5.0, 3: 1.0}), (14.0, {1: 4.0, 2: 9.0, 3: 3.0})],
        roles={1: "stub a", 2: "tritonserver", 3: "stub a"},
    )
    # pid 1: 1 s/s throughout; pid 2: idle then 2 s/s; pid 3 born after the first sample
    assert series.per_process(11.0, 13.0) == pytest.approx({1: 2.0, 2: 2.0, 3: 2.0})
    assert series.window(11.0, 13.0) == pytest.approx({"stub a": 4.0, "tritonserver": 2.0})
    assert series.window(0.0, 100.0) == pytest.approx({"stub a": 7.0, "tritonserver": 4.0})
    assert series.instances() == {"stub a": 2, "tritonserver": 1}


def test_sampler_sees_a_child_burning_cpu() -> None:
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\nprint('done', flush=True)\ntime.sleep(30)"
    with CpuSampler(interval_s=0.05) as sampler:  # started first: it sees the child from its birth
        child = subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "done"  # however loaded the machine
            time.sleep(0.2)
            assert child.pid in [p.pid for p in descendants(os.getpid())]
            info = read_proc(child.pid)
            assert info is not None and info.ppid == os.getpid() and info.threads >= 1
        finally:
            sampler.sample()
            child.kill()
            child.wait()
    first, last = sampler.series.samples[0][0], sampler.series.samples[-1][0]
    used = sampler.series.per_process(first, last)[child.pid]
    assert 0.55 <= used <= 10.0  # the 0.6 s burn, plus the interpreter's start-up
    busy = sampler.series.machine_busy(first, last)  # the whole machine: at least this child
    assert busy is not None and busy >= 0.8 * used


def test_memory_of_this_process() -> None:
    rows = memory_table(os.getpid(), include_root=True)
    me = rows[0]
    assert me.pid == os.getpid() and me.rss_mb > 10
    assert 0 < me.uss_mb <= me.pss_mb <= me.rss_mb + 1e-6
    agg = memory_by_role([me, ProcessMemory(1, me.role, 1.0, 1.0, 1.0, 2)])
    assert agg[me.role]["processes"] == 2 and agg[me.role]["rss_mb"] == pytest.approx(me.rss_mb + 1.0)
