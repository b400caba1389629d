"""``bench.md``: a ``detserve bench`` run's results as tables (the figures come from ``bench_figures.py``)."""

from __future__ import annotations

from typing import Any

from loadtest.bench_figures import SERVER_ROLES_PREFIX, per_cpu_s


def render_bench(r: dict[str, Any]) -> str:
    served, flask, plain = r["triton"]["report"], r["flask"]["report"], r["triton_no_batching"]["report"]

    def row(name: str, rep: dict[str, Any], cpu: dict[str, Any] | None = None) -> str:
        lat = rep["latency_ms"]
        return (
            f"| {name} | {rep['throughput_rps']:.1f} | {f'{per_cpu_s(cpu):.1f}' if cpu else ''} | {lat.get('p50', 0):.0f} | "
            f"{lat.get('p90', 0):.0f} | {lat.get('p95', 0):.0f} | {lat.get('p99', 0):.0f} | {rep['failures']} |"
        )

    lines = [
        "# detserve bench",
        "",
        f"{r['config']['users']} concurrent users (closed loop), {r['config']['duration_s']:.0f} s per run, same images.",
        "",
        "| pipeline | req/s | req per server CPU-s | p50 ms | p90 ms | p95 ms | p99 ms | failures |",
        "|---|---|---|---|---|---|---|---|",
        f"| (a) in-process, best: batch {r['inprocess']['best_batch_size']}, {r['inprocess']['threads']} thread(s) "
        f"| {r['inprocess']['best_images_per_s']:.1f} | {r['inprocess'].get('best_images_per_cpu_s', 0.0):.1f} | | | | | |",
        row("(b) Flask + eager PyTorch", flask, r["flask"].get("cpu")),
        row("(c) Triton ensemble, dynamic batching", served, r["triton"].get("cpu")),
        row("(d) Triton ensemble, no dynamic batching", plain, r["triton_no_batching"].get("cpu")),
        *([row("(f) fused CPU layout (one python model)", r["fused"]["report"], r["fused"].get("cpu"))] if "fused" in r else []),
        *(["", f"(f) not run: {r['fused_skipped']}."] if r.get("fused_skipped") else []),
        *(
            [row("(g) Triton ensemble, torch core (python-torch)", r["torch_core"]["report"], r["torch_core"].get("cpu"))]
            if "torch_core" in r
            else []
        ),
        *(
            ["", "Composing models after preprocessing: " + " -> ".join(r["inprocess"]["steps"]) + "."]
            if r["inprocess"].get("steps")
            else []
        ),
        "",
        "| ratio | value |",
        "|---|---|",
        *[f"| {k} | {v:.2f} |" for k, v in r["ratios"].items()],
        "",
        f"Server memory (tritonserver + python stubs, RSS): {r['triton']['server_rss_mb']:.0f} MB at start, "
        f"{r['triton'].get('server_rss_mb_after_load', 0):.0f} MB after load.",
        "",
    ]
    for t in r["triton"].get("shm", []):
        lines.append(
            f"- 4K image via {t['mode']}: mean {t['mean_ms']:.0f} ms, p50 {t['p50_ms']:.0f} ms, p99 {t['p99_ms']:.0f} ms"
        )
    lines += _targets_section(r) + _cpu_section(r) + _hop_section(r) + _memory_section(r)
    if r.get("peers"):
        from loadtest.peers.report import peers_section

        lines += peers_section(r)
    lines += ["", "## Machine", "", *[f"- {k}: {v}" for k, v in r["fingerprint"].items()], ""]
    return "\n".join(lines)


def _targets_section(r: dict[str, Any]) -> list[str]:
    rows = r.get("targets") or []
    if not rows:
        return []
    lines = ["", "## Targets (issue 16)", "", "| ratio | value | target | met | bounded by (measured) |", "|---|---|---|---|---|"]
    lines += [
        f"| {t['ratio']} | {t['value']:.2f} | {t['target']} | {'yes' if t['met'] else 'no'} | {t['bounded_by']} |" for t in rows
    ]
    lines += [
        "",
        "The throughput target uses requests per CPU-second of the serving processes (tritonserver + stubs + gate; "
        "Locust's CPU not counted) over images per CPU-second in process: the limit pays for no client, the served "
        "run shares the cores with Locust, and on a shared machine neither side gets the same CPU twice. It does not "
        "see cores left idle, so the idle share is printed beside it. Kept beside it: served / limit x (1 - Locust's "
        "share), the throughput on the CPU the load generator leaves.",
    ]
    return lines


def _cpu_section(r: dict[str, Any]) -> list[str]:
    lines = ["", "## CPU per process during the load (from /proc)", ""]
    runs = (
        ("triton", "(c) dynamic batching"),
        ("triton_no_batching", "(d) no dynamic batching"),
        ("fused", "(f) fused"),
        ("flask", "(b) Flask"),
    )
    for key, title in runs:
        cpu = r.get(key, {}).get("cpu")
        if not cpu:
            continue
        lines += [
            f"{title}: {cpu['ok_requests']} requests in {cpu['window_s']:.1f} s on {cpu['cores']} cores; "
            f"idle {100 * cpu['idle_share']:.0f}%, other processes on the machine "
            f"{100 * cpu.get('others_share', 0.0):.0f}%",
            "",
            "| process | count | threads | CPU s | share of machine | CPU ms / request |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {role} | {v['processes']} | {v['threads']} | {v['cpu_s']:.1f} | {100 * v['share']:.0f}% | {v['ms_per_request']:.1f} |"
            for role, v in cpu["roles"].items()
        ]
        lines.append("")
    ip = r["inprocess"]
    stages = ip.get("stage_cpu_ms_per_image", {})
    if stages:
        lines.append(
            f"In process (batch {ip['best_batch_size']}, {ip['threads']} thread(s)): "
            f"{1000.0 / max(ip.get('best_images_per_cpu_s', 0), 1e-9):.1f} CPU ms per image = "
            + ", ".join(f"{k} {v:.1f}" for k, v in stages.items())
        )
    return lines


def _hop_section(r: dict[str, Any]) -> list[str]:
    """Per request: bytes leaving each hop and CPU ms per process, next to the same stage in process."""
    stages = r["inprocess"].get("stage_cpu_ms_per_image", {})
    lines: list[str] = []
    for key, title in (("triton", "(c) ensemble, dynamic batching"), ("fused", "(f) fused CPU layout")):
        cpu = r.get(key, {}).get("cpu")
        if not cpu:
            continue
        roles = cpu["roles"]
        lines += [
            "",
            f"## Hops, per request: {title}",
            "",
            "| hop | bytes out | served CPU ms | in-process CPU ms | overhead ms |",
            "|---|---|---|---|---|",
        ]
        for name, size, served_ms, inproc in _hop_rows(r, key, roles):
            extra = "| | |" if inproc is None else f"| {inproc:.1f} | {served_ms - inproc:.1f} |"
            lines.append(f"| {name} | {size} | {served_ms:.1f} {extra}")
        server = sum(v["ms_per_request"] for k, v in roles.items() if k.startswith(SERVER_ROLES_PREFIX))
        lines.append(f"| server total (gate + tritonserver + stubs) | | {server:.1f} | {sum(stages.values()):.1f} | "
                     f"{server - sum(stages.values()):.1f} |")  # fmt: skip
    return lines


def _hop_rows(r: dict[str, Any], key: str, roles: dict[str, Any]) -> list[tuple[str, str, float, float | None]]:
    """(hop, bytes out, served CPU ms, in-process CPU ms) for one served run: the hops its layout has."""
    ip = r["inprocess"]
    stages = ip.get("stage_cpu_ms_per_image", {})
    sizes: dict[str, float] = next((run["tensor_bytes"] for run in ip.get("runs", []) if run.get("tensor_bytes")), {})
    model = r.get("model", "")

    def kb(key: str) -> str:
        return f"{sizes.get(key, 0) / 1024:.0f} KB" if sizes else ""

    def ms(role: str) -> float:
        return float(roles.get(role, {}).get("ms_per_request", 0.0))

    rows: list[tuple[str, str, float, float | None]] = [
        ("client (Locust: encode, gRPC send/receive)", kb("request"), ms("locust"), None),
        ("gate (nginx gRPC proxy)", kb("request"), ms("gate"), None),
        ("tritonserver (gRPC, scheduling, tensors to/from stub shared memory)", "", ms("tritonserver"), None),
    ]
    preprocess = (
        "preprocess stub (decode, resize, normalise)",
        kb("preprocessed"),
        ms(f"stub {r.get('preprocess_step') or model + '_preprocess'}"),  # shared or its own (bench.py records it)
        stages.get("preprocess"),
    )
    if key == "fused":
        last = ip["steps"][-1] if ip.get("steps") else "detections"  # what the stub sends: the last step's rows
        rows.append(("fused stub (decode ... NMS, one process)", kb(last), ms(f"stub {model}"), sum(stages.values())))
    elif ip.get("steps"):  # a multi-step family: a row per composing model, as declared
        rows.append(preprocess)
        rows += [(f"{role} stub", kb(role), ms(f"stub {model}_{role}"), stages.get(role)) for role in ip["steps"]]
    else:
        rows += [
            preprocess,
            ("core stub (onnxruntime)", kb("core_outputs"), ms(f"stub {model}_core"), stages.get("core")),
            ("postprocess stub (decode, NMS)", kb("detections"), ms(f"stub {model}_postprocess"), stages.get("postprocess")),
        ]  # fmt: skip
    return rows


def _memory_section(r: dict[str, Any]) -> list[str]:
    from loadtest.procstats import ProcessMemory, memory_by_role

    lines = ["", "## Server memory per process (PSS splits shared pages, USS is private)", ""]
    tables = (
        ("triton", "memory", "(c) at start"),
        ("triton", "memory_after_load", "(c) after load"),
        ("fused", "memory", "(f) fused, at start"),
    )
    for run, key, title in tables:
        rows = r.get(run, {}).get(key)
        if not rows:
            continue
        by_role = memory_by_role(ProcessMemory(**row) for row in rows)
        lines += [f"{title}:", "", "| process | count | RSS MB | PSS MB | USS MB |", "|---|---|---|---|---|"]
        lines += [
            f"| {role} | {v['processes']:.0f} | {v['rss_mb']:.0f} | {v['pss_mb']:.0f} | {v['uss_mb']:.0f} |"
            for role, v in sorted(by_role.items())
        ]
        total = {k: sum(v[k] for v in by_role.values()) for k in ("rss_mb", "pss_mb", "uss_mb")}
        lines += [f"| total | {len(rows)} | {total['rss_mb']:.0f} | {total['pss_mb']:.0f} | {total['uss_mb']:.0f} |", ""]
    return lines
