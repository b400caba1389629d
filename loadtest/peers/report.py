"""The peers' part of ``bench.md``: their table beside the served ensemble, each sweep, the issue's targets
(issue 26, part 4) and where each peer's CPU went. Pure formatting and arithmetic on measured figures."""

from __future__ import annotations

from typing import Any

from loadtest.peers.measure import per_cpu

PER_CPU_TARGET = 1.2  # served ensemble / best peer, requests per server CPU-second
NAMES = {"ray": "Ray Serve (@serve.batch)", "litserve": "LitServe (batching)", "bentoml": "BentoML (adaptive batching)"}


def best_peer(r: dict[str, Any]) -> str | None:
    """The peer with the most requests per server CPU-second (the issue's figure), or None without peers."""
    peers = {k: v for k, v in r.get("peers", {}).items() if v.get("cpu")}
    return max(peers, key=lambda k: per_cpu(peers[k]["cpu"])) if peers else None


def peer_targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Served ensemble vs the best peer: per server CPU-second >= 1.2x, p99 <= the peer's (measured, this run)."""
    best = best_peer(r)
    served = r["triton"]
    if best is None or not served.get("cpu"):
        return []
    peer = r["peers"][best]
    ours, theirs = per_cpu(served["cpu"]), per_cpu(peer["cpu"])
    p99, peer_p99 = served["report"]["latency_ms"].get("p99", 0.0), peer["report"]["latency_ms"].get("p99", 0.0)
    # no server beats the pipeline in process: the limit over the peer bounds the first ratio (measured)
    limit = float(r.get("inprocess", {}).get("best_images_per_cpu_s", 0.0))
    bound = f"; the in-process limit itself: {limit:.1f} per CPU-s = {limit / max(theirs, 1e-9):.2f}x {best}" if limit else ""
    return [
        {"ratio": f"served / {best}, per server CPU-second", "value": ours / max(theirs, 1e-9), "target": f">= {PER_CPU_TARGET:.2f}",
         "met": ours >= PER_CPU_TARGET * theirs, "detail": f"{ours:.1f} vs {theirs:.1f} req per CPU-s{bound}"},
        {"ratio": f"served p99 / {best} p99", "value": p99 / max(peer_p99, 1e-9), "target": "<= 1.00",
         "met": p99 <= peer_p99, "detail": f"{p99:.0f} ms vs {peer_p99:.0f} ms"},
    ]  # fmt: skip


def _uss(rows: list[dict[str, Any]] | None) -> str:
    return f"{sum(row['uss_mb'] for row in rows):.0f}" if rows else ""


def _row(name: str, setting: str, run: dict[str, Any], uss: tuple[str, str], processes: str) -> str:
    rep, lat = run["report"], run["report"]["latency_ms"]
    cpu = run.get("cpu")
    pcs = f"{per_cpu(cpu):.1f}" if cpu else ""
    others = f"{100 * cpu.get('others_share', 0.0):.0f}%" if cpu else ""  # a shared machine: raw req/s compare badly
    return (
        f"| {name} | {setting} | {rep['throughput_rps']:.1f} | {pcs} | {lat.get('p50', 0):.0f} | {lat.get('p99', 0):.0f} | "
        f"{uss[0]} | {uss[1]} | {processes} | {others} | {rep['failures']} |"
    )


def peers_section(r: dict[str, Any]) -> list[str]:
    peers = r.get("peers")
    if not peers:
        return []
    served = r["triton"]
    lines = [
        "", "## Peers: the same pipeline under Ray Serve, LitServe and BentoML (issue 26)", "",
        f"Same images, {r['config']['users']} closed-loop users, the Flask baseline's Locust user over HTTP for the "
        "peers; req per server CPU-s counts every process of the server (a peer's whole process tree), not Locust's.",
        "", "| server | setting | req/s | req per server CPU-s | p50 ms | p99 ms | USS MB at start | USS MB after load "
        "| processes | other processes' CPU | failures |", "|---|---|---|---|---|---|---|---|---|---|---|",
        _row("(c) Triton ensemble", "dynamic batching", served, (_uss(served.get("memory")),
             _uss(served.get("memory_after_load"))), str(len(served.get("memory") or []))),
    ]  # fmt: skip
    if "fused" in r:
        fused = r["fused"]
        lines.append(
            _row(
                "(f) fused CPU layout",
                "one python model",
                fused,
                (_uss(fused.get("memory")), ""),
                str(len(fused.get("memory") or [])),
            )
        )
    for peer, run in peers.items():
        mem0, mem1 = run["memory_start"], run["memory_after_load"]
        setting = _setting(run["config"])
        lines.append(
            _row(NAMES.get(peer, peer), setting, run, (f"{mem0['uss_mb']:.0f}", f"{mem1['uss_mb']:.0f}"), str(mem0["processes"]))
        )
    return lines + _config_lines(peers) + _sweep_lines(peers) + _targets_lines(r) + _cpu_lines(r)


def _setting(c: dict[str, Any]) -> str:
    wait = "adaptive wait" if c["peer"] == "bentoml" else f"wait {c['batch_wait_ms']:g} ms"
    return f"{c['replicas']} x {c['ort_threads']} thread(s), batch {c['max_batch_size']}, {wait}"


def _config_lines(peers: dict[str, Any]) -> list[str]:
    started = ", ".join(f"{p} {run.get('started_s', 0):.0f} s" for p, run in peers.items())
    return ["", f"Start to first answered detection (best setting's run): {started}."]


def _sweep_lines(peers: dict[str, Any]) -> list[str]:
    lines = ["", "Sweep (each setting on a fresh server; the best by req per server CPU-s ran again for the full duration):", "",
             "| peer | batch | wait ms | req/s | req per server CPU-s | p50 ms | p99 ms | failures |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for peer, run in peers.items():
        for s in run.get("sweep", []):
            wait = "adaptive" if peer == "bentoml" else f"{s['batch_wait_ms']:g}"
            lines.append(
                f"| {peer} | {s['max_batch_size']} | {wait} | {s['throughput_rps']:.1f} | {s['per_cpu_s']:.1f} | "
                f"{s['p50']:.0f} | {s['p99']:.0f} | {s['failures']} |"
            )
    return lines


def _targets_lines(r: dict[str, Any]) -> list[str]:
    rows = r.get("peer_targets") or []
    if not rows:
        return []
    lines = ["", "Targets (issue 26, part 4), best peer by req per server CPU-s:", "",
             "| ratio | value | target | met | measured |", "|---|---|---|---|---|"]  # fmt: skip
    lines += [
        f"| {t['ratio']} | {t['value']:.2f} | {t['target']} | {'yes' if t['met'] else 'no'} | {t['detail']} |" for t in rows
    ]
    return lines


def _cpu_lines(r: dict[str, Any]) -> list[str]:
    """CPU ms per request by process: where each server spends beyond the model's own work."""
    ip = r.get("inprocess", {})
    model_ms = sum(ip.get("stage_cpu_ms_per_image", {}).values())
    lines = ["", f"CPU ms per request by process (the same model work in process: {model_ms:.1f} ms per image):", ""]
    runs = [("Triton ensemble", r["triton"].get("cpu"))] + [(p, run.get("cpu")) for p, run in r["peers"].items()]
    for name, cpu in runs:
        if not cpu:
            continue
        roles = sorted(
            ((k, v["ms_per_request"]) for k, v in cpu["roles"].items() if k not in ("locust", "other")), key=lambda kv: -kv[1]
        )
        total = 1000.0 * cpu["server_cpu_s"] / max(cpu["ok_requests"], 1)
        parts = ", ".join(f"{k.split(': ', 1)[-1]} {ms:.1f}" for k, ms in roles if ms >= 0.05)
        lines.append(
            f"- {name}: server {total:.1f} ms = {parts}; Locust {cpu['roles'].get('locust', {}).get('ms_per_request', 0):.1f} ms"
        )
    return lines
