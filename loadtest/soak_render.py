"""The soak's report: ``soak-report.json`` (everything) and ``soak-report.md`` (the tables), and the problems found."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from loadtest.opsreport_base import DETECTOR, MODEL, Tally
from loadtest.soak_faults import STUB_KILL
from loadtest.soak_stats import EndState, ProcessSeries, SoakResult, attribute, end_state, series

MiB = 2**20


def _errors(t: Tally) -> list[str]:
    return sorted({e[:200] for e in t.lost_errors})[:5]


def build(r: SoakResult) -> dict[str, Any]:
    """The report's data, problems included."""
    att = attribute(r.calls, r.windows)
    procs = series(r.samples)
    end = end_state(r.samples, r.shm, procs, r.limits, stubs_killed=sum(1 for w in r.windows if w.fault == STUB_KILL))
    windows = []
    for w, load, probes in zip(r.windows, att.windows, att.probes, strict=True):
        windows.append({
            "fault": w.fault, "at_s": round(w.start - r.t_start, 1), "seconds": round(w.end - w.start, 1),
            "recovered": w.recovered, "detail": w.detail,
            "load": {"sent": load.sent, "ok": load.ok, "failed": load.lost, "errors": _errors(load)},
            "own_requests": {"sent": probes.sent, "refused_as_expected": probes.expected, "answered": probes.ok,
                             "wrong_outcome": probes.lost, "errors": _errors(probes)},
        })  # fmt: skip
    out = att.outside
    total = Tally.of(r.calls)
    data: dict[str, Any] = {
        "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": f"{MODEL} ({DETECTOR})",
        "machine": {"cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0]},
        "schedule": {k: round(v, 1) for k, v in r.schedule.__dict__.items()},
        "users": r.users,
        "seconds": round(r.seconds, 1),
        "soak_process_cpu_s": round(r.own_cpu_s, 1),
        "requests": {"sent": total.sent, "ok": total.ok, "failed": total.lost},
        "outside_windows": {"sent": out.sent, "ok": out.ok, "failed": out.lost, "errors": _errors(out)},
        "windows": windows,
        "processes": [_proc(p, r.t_start) for p in procs],
        "roles": {"start": _roles(end.start), "end": _roles(end.end)},
        "shm": {
            "start": {"regions": end.shm_start[0], "mib": round(end.shm_start[1] / MiB, 1)},
            "end": {"regions": end.shm_end[0], "mib": round(end.shm_end[1] / MiB, 1)},
            "after_stop": {"regions": r.shm_after_stop[0], "mib": round(r.shm_after_stop[1] / MiB, 1)},
        },
        "tritonserver_pids": r.tritonservers,
        "limits": r.limits.__dict__,
        "leaks": end.leaks,
        "left_after_stop": r.left_after_stop,
    }
    data["problems"] = problems(data, end, r.service_exited)
    return data


def _proc(p: ProcessSeries, t0: float) -> dict[str, Any]:
    d = p.to_dict()
    d["first"], d["last"] = round(p.first - t0, 1), round(p.last - t0, 1)
    return d


def _roles(by_role: dict[str, tuple[int, int]]) -> dict[str, dict[str, int]]:
    return {role: {"processes": n, "fds": fds} for role, (n, fds) in sorted(by_role.items())}


def problems(data: dict[str, Any], end: EndState, service_exited: str | None) -> list[str]:
    """Why the soak fails (exit 1): each a sentence."""
    out = []
    if service_exited:
        out.append(service_exited)
    o = data["outside_windows"]
    if o["failed"]:
        out.append(f"{o['failed']} request(s) failed outside the fault windows: {'; '.join(o['errors'])}")
    for w in data["windows"]:
        if not w["recovered"]:
            out.append(f"{w['fault']} at {w['at_s']} s: not recovered ({w['detail']})")
        if w["own_requests"]["wrong_outcome"]:
            out.append(f"{w['fault']} at {w['at_s']} s: {w['own_requests']['wrong_outcome']} of its requests had the "
                       f"wrong outcome: {'; '.join(w['own_requests']['errors'])}")  # fmt: skip
    out += [f"leak: {leak}" for leak in end.leaks]
    out += data["left_after_stop"]
    after = data["shm"]["after_stop"]
    if after["regions"]:
        out.append(f"/dev/shm: {after['regions']} region(s) of the server ({after['mib']} MiB) left after it stopped")
    return out


def render_markdown(data: dict[str, Any]) -> str:
    req, out = data["requests"], data["outside_windows"]
    head = (
        f"Generated {data['at']} by `detserve ops-report --soak`: {data['model']}, `detserve serve` (embedded Triton "
        f"behind the gate), {data['users']} gRPC users for {data['seconds']:.0f} s, {data['machine']['cpus']} CPUs "
        f"(1-minute load average {data['machine']['load_average_1m']:.1f} at the end; the soak's own clients and "
        f"sampler used {data['soak_process_cpu_s']:.0f} s of CPU). Requests sent {req['sent']}, "
        f"ok {req['ok']}, failed {req['failed']}; **failed outside the fault windows: {out['failed']}** of {out['sent']}."
    )
    lines = [head, "", "| fault | at | window | load requests | failed in window | own requests (refused as expected / wrong) | what happened |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for w in data["windows"]:
        own = w["own_requests"]
        mine = f"{own['sent']} ({own['refused_as_expected']} / {own['wrong_outcome']})" if own["sent"] else "-"
        lines.append(f"| {w['fault']} | {w['at_s']:.0f} s | {w['seconds']:.1f} s | {w['load']['sent']} | "
                     f"**{w['load']['failed']}** | {mine} | {w['detail'][:220]} |")  # fmt: skip
    lines += ["", "| process | pid | seen | RSS first -> last (max) MB | slope MB/h (second half) | open fds first -> last (max) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for p in data["processes"]:
        # a slope over less than a minute says nothing (a process seen briefly: a reload, a restart)
        slope = f"{p['slope_mb_h']:+.0f} ({p['late_slope_mb_h']:+.0f})" if p["last"] - p["first"] >= 60 else "-"
        lines.append(f"| {p['role']} | {p['pid']} | {p['first']:.0f}-{p['last']:.0f} s | {p['rss_first']:.0f} -> "
                     f"{p['rss_last']:.0f} ({p['rss_max']:.0f}) | {slope} | "
                     f"{p['fds_first']} -> {p['fds_last']} ({p['fds_max']}) |")  # fmt: skip
    roles = data["roles"]
    counts = ", ".join(
        f"{role} {roles['start'].get(role, {}).get('processes', 0)} -> {roles['end'].get(role, {}).get('processes', 0)}"
        for role in sorted(set(roles["start"]) | set(roles["end"]))
    )
    shm = data["shm"]
    lines += [
        "",
        f"- processes per role, start -> end: {counts}",
        f"- /dev/shm (the server's regions): {shm['start']['regions']} regions {shm['start']['mib']} MiB at the start, "
        f"{shm['end']['regions']} / {shm['end']['mib']} MiB at the end, {shm['after_stop']['regions']} after stop",
        f"- tritonserver pids: {', '.join(map(str, data['tritonserver_pids']))} (one per start)",
        "",
        "Problems: " + ("none" if not data["problems"] else ""),
        *[f"- {p}" for p in data["problems"]],
    ]
    return "\n".join(lines) + "\n"


def write_report(r: SoakResult, out: Path) -> tuple[Path, list[str]]:
    data = build(r)
    (out / "soak-report.json").write_text(json.dumps(data, indent=2) + "\n")
    md = out / "soak-report.md"
    md.write_text(render_markdown(data))
    return md, list(data["problems"])
