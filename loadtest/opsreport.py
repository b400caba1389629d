"""The ops report: load held, faults injected, bad inputs tried, and how many requests were lost.

``run_ops_report(repository, out, echo)`` builds a small ssdlite repository (untrained heads with a
score spread, the test fixture's recipe) under ``repository`` unless one is there, then runs each
scenario against its own real tritonserver with gRPC clients sending while the fault happens:

- steady load; a python stub killed; the server restarted; a graceful drain (stop under load);
- a rollout to version 2 and a rollback; a broken model and a corrupted version loaded;
- an overload burst past bounded queues; bad inputs (not an image, truncated, empty, a
  decompression bomb, odd modes) mixed into good traffic.

Every request ends in one of three columns: ok; failed/rejected *as expected* (a bad input's
error, a request refused before any work was done: model unloaded for the drain, server not
reachable, queue full); or LOST -- accepted and then failed, or failed for a reason the scenario
does not expect. LOST must be 0. Writes ``ops-report.md`` (a table) and ``ops-report.json``.

The traffic, its accounting and the setup: ``opsreport_base.py``; the scenarios:
``opsreport_scenarios.py`` and (the attacks) ``opsreport_hardening.py``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from loadtest.opsreport_base import DETECTOR, MODEL, Echo, Row, Setup, ensure_repositories
from loadtest.opsreport_hardening import HARDENING_SCENARIOS
from loadtest.opsreport_scenarios import SCENARIOS


def run_ops_report(
    repository: Path, out: Path, echo: Echo = lambda _: None, users: int = 4, duration_s: float = 10.0
) -> tuple[Path, int]:
    """Run every scenario; write ``out/ops-report.md`` and ``out/ops-report.json``; return (the markdown path, requests lost).

    ``repository``: a work directory (the small ssdlite repositories are built there once and
    copied per scenario). Raises DetserveError when a scenario cannot run; a lost request does not
    raise: the table shows it.
    """
    from detserve.runtime.samples import sample_files

    repository, out = Path(repository), Path(out)
    base, rollout = ensure_repositories(repository, echo)
    photos = sample_files()
    images = [photos[n] for n in sorted(photos)][:4]
    setup = Setup(base, rollout, images, repository / "runs", users, duration_s)
    setup.work.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for scenario in SCENARIOS + HARDENING_SCENARIOS:
        echo(f"{scenario.__name__} ...")
        row = scenario(setup)
        t = row.tally
        echo(f"  {row.scenario}: sent {t.sent}, ok {t.ok}, expected failures/rejections {t.expected}, LOST {t.lost}")
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": f"{MODEL} ({DETECTOR})",
    }
    data["machine"] = {"cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0]}
    data["rows"] = [r.to_dict() for r in rows]
    data["lost_total"] = sum(r.tally.lost for r in rows)
    (out / "ops-report.json").write_text(json.dumps(data, indent=2) + "\n")
    md = out / "ops-report.md"
    md.write_text(render_markdown(rows, data))
    return md, int(data["lost_total"])


def render_markdown(rows: list[Row], data: dict[str, Any]) -> str:
    lines = [
        "| scenario | load held | fault / bad input | requests sent | failed/rejected (expected) | requests LOST |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r.tally
        load = f"{r.users} users, {r.seconds:.0f} s, {t.sent} requests"
        lines.append(f"| {r.scenario} | {load} | {r.fault} | {t.sent} | {t.expected} | **{t.lost}** |")
    notes = [f"- {r.scenario}: {r.notes}" for r in rows if r.notes]
    head = (
        f"Generated {data['at']} by `loadtest.opsreport.run_ops_report`: {data['model']}, embedded Triton, "
        f"{data['machine']['cpus']} CPUs (1-minute load average {data['machine']['load_average_1m']:.1f} at the end). "
        f"Requests lost in all: **{data['lost_total']}**."
    )
    return "\n".join([head, "", *lines, "", *notes]) + "\n"
