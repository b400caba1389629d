"""``detserve bench``: the served ensemble measured side by side with its baselines, in one run.

Same model, same images, same machine, same closed-loop concurrency:
  (a) the pipeline in-process, no server, at its best batch size — the practical limit;
  (b) a plain Flask + eager PyTorch service — what teams build first;
  (c) the Triton ensemble with dynamic batching;
  (d) the same without dynamic batching;
  (e) 4K images through system shared memory against plain gRPC;
  (f) the fused CPU layout: pre + core + post in one python model (converters/fused.py).
Served runs also record every process's CPU seconds (tritonserver, each stub, the gate, Locust)
and memory (RSS/PSS/USS), so the load generator's share is accounted for (loadtest/procstats.py).
Every figure is a ratio of numbers measured here, now (these machines are shared and noisy).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detserve.pipeline import CORE, model_name
from loadtest.runner import LoadTestConfig, run_loadtest


@dataclass(frozen=True)
class BenchConfig:
    repository: Path
    model: str
    out_dir: Path
    users: int = 16
    duration_s: float = 20.0
    sweep: tuple[int, ...] = (1, 2, 4, 8, 16)
    sweep_step_s: float = 8.0
    inprocess_seconds: float = 5.0
    shm_requests: int = 10
    fused: bool = True  # (f): also serve the fused CPU layout
    flask: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the Flask service


def flask_kwargs_from_build(repository: Path, model: str) -> dict[str, Any]:
    """The Flask baseline must hold the same weights as the served model: read how it was built."""
    from loadtest.inprocess import latest_version

    core = repository / model_name(model, CORE)
    record = json.loads((core / str(latest_version(core)) / "build.json").read_text())
    return {
        "detector": record["detector"],
        "num_classes": record["num_classes"],
        "checkpoint": Path(record["checkpoint"]) if record.get("checkpoint") else None,
        "model_kwargs": record.get("model_kwargs") or None,
        "spread_init_seed": record.get("spread_init_seed"),
    }


def without_dynamic_batching(src: Path, dst: Path, model: str) -> Path:
    """A copy of the model's repository whose composing models schedule each request alone."""
    from loadtest.tune import no_dynamic_batching, variant_repository

    return variant_repository(src, dst, model, no_dynamic_batching)


def server_memory(server: Any) -> list[dict[str, Any]]:
    """RSS/PSS/USS of tritonserver, each python stub and the nginx gate (loadtest/procstats.py)."""
    from dataclasses import asdict

    from loadtest.procstats import memory_table

    rows = memory_table(server.process.pid) if server.process else []
    gate = getattr(server, "gate", None)
    if gate is not None and gate.process is not None:
        rows += memory_table(gate.process.pid)
    return [asdict(r) for r in rows]


SERVER_ROLES_PREFIX = ("tritonserver", "gate", "stub ", "flask")  # what serves (the Flask baseline's process too)


def cpu_accounting(series: Any, locust: dict[str, float] | None, report: Any) -> dict[str, Any]:
    """CPU seconds per process role over Locust's load window, per request and as a share of the machine.

    The load generator's own figure comes from Locust itself (its CPU between test start and
    stop); every other process's from /proc samples interpolated at the same two instants.
    """
    import os

    samples = series.samples
    t0, t1 = (locust["start"], locust["stop"]) if locust else (samples[0][0], samples[-1][0])
    roles = series.window(t0, t1)
    if locust:
        roles["locust"] = locust["cpu_s"]
    window_s = max(t1 - t0, 1e-9)
    cores = os.cpu_count() or 1
    ok = max(int(report.requests) - int(report.failures), 1)
    server_cpu = sum(v for k, v in roles.items() if k.startswith(SERVER_ROLES_PREFIX))
    ours = sum(roles.values())
    busy = series.machine_busy(t0, t1)
    others = max(0.0, busy - ours) if busy is not None else 0.0  # other users of a shared machine
    threads: dict[str, int] = {}
    for pid, role in series.roles.items():
        threads[role] = threads.get(role, 0) + series.threads.get(pid, 0)
    return {
        "window_s": window_s,
        "cores": cores,
        "ok_requests": ok,
        "server_cpu_s": server_cpu,
        "locust_cpu_s": roles.get("locust", 0.0),
        "locust_share": roles.get("locust", 0.0) / (window_s * cores),
        "idle_share": max(0.0, 1.0 - (ours + others) / (window_s * cores)),
        "others_share": others / (window_s * cores),
        "roles": {
            k: {
                "cpu_s": v,
                "share": v / (window_s * cores),
                "ms_per_request": 1000.0 * v / ok,
                "processes": series.instances().get(k, 1),
                "threads": threads.get(k, 0),
            }
            for k, v in sorted(roles.items())
        },
    }


def _served(cfg: BenchConfig, repository: Path, label: str, echo: Callable[[str], None]) -> dict[str, Any]:
    from detserve.ops.privateshm import shm_directory
    from detserve.ops.server import running_server
    from loadtest.procstats import CpuSampler
    from loadtest.runner import read_locust_cpu

    echo(f"  {label}: starting server")
    key = secrets.token_hex(24)  # this run's own: the shared-memory comparison registers a region (an admin API)
    with running_server(repository, admin_key=key) as server:
        memory = server_memory(server)
        lt = LoadTestConfig(
            grpc_url=server.options.grpc_url, model=cfg.model, out_dir=cfg.out_dir / label, users=cfg.users,
            duration_s=cfg.duration_s, title=f"{cfg.model}: {label}, {cfg.users} users",
        )  # fmt: skip
        echo(f"  {label}: {cfg.users} users for {cfg.duration_s:.0f} s")
        with CpuSampler() as sampler:  # every process below this one: tritonserver, stubs, gate, Locust
            report = run_loadtest(lt).report
        cpu = cpu_accounting(sampler.series, read_locust_cpu(lt.out_dir), report)
        out: dict[str, Any] = {
            "report": report.to_dict(),
            "server_rss_mb": sum(r["rss_mb"] for r in memory),
            "memory": memory,
            "cpu": cpu,
        }
        if label == "triton-dynamic-batching":
            out["memory_after_load"] = server_memory(server)
            out["sweep"] = _sweep(cfg, server.options.grpc_url, echo)
            shm_dir = shm_directory(server.process.pid if server.process else None)  # its private /dev/shm
            out["shm"] = _shared_memory(cfg, server.options.grpc_url, echo, key, shm_dir)
            out["server_rss_mb_after_load"] = sum(r["rss_mb"] for r in out["memory_after_load"])
    return out


def _sweep(cfg: BenchConfig, url: str, echo: Callable[[str], None]) -> dict[str, Any]:
    echo(f"  sweep: concurrency {list(cfg.sweep)}, {cfg.sweep_step_s:.0f} s each")
    lt = LoadTestConfig(
        grpc_url=url, model=cfg.model, out_dir=cfg.out_dir / "sweep", shape="sweep", sweep=cfg.sweep,
        step_s=cfg.sweep_step_s, users=max(cfg.sweep), title=f"{cfg.model}: concurrency sweep",
    )  # fmt: skip
    return run_loadtest(lt).report.to_dict()


def _shared_memory(
    cfg: BenchConfig, url: str, echo: Callable[[str], None], admin_key: str, shm_dir: Path
) -> list[dict[str, Any]]:
    from dataclasses import asdict

    from loadtest.shm import compare_transfer, large_jpeg

    image = large_jpeg()
    echo(f"  4K image ({len(image) / 1e6:.1f} MB JPEG): plain gRPC vs system shared memory, {cfg.shm_requests} requests each")
    return [asdict(t) for t in compare_transfer(url, cfg.model, image, cfg.shm_requests, admin_key, shm_dir)]


def _flask(cfg: BenchConfig, echo: Callable[[str], None]) -> dict[str, Any]:
    from detserve.ops.server import free_port
    from loadtest.flask_baseline import FlaskService
    from loadtest.runner import LOCUSTFILE

    port = free_port()
    echo(f"  flask + eager PyTorch: {cfg.users} users for {cfg.duration_s:.0f} s")
    with FlaskService(port=port, **(cfg.flask or flask_kwargs_from_build(cfg.repository, cfg.model))):
        lt = LoadTestConfig(
            grpc_url=f"127.0.0.1:{port}", model=cfg.model, out_dir=cfg.out_dir / "flask", users=cfg.users,
            duration_s=cfg.duration_s, title=f"{cfg.model}: Flask + eager PyTorch, {cfg.users} users", warmup_requests=0,
        )  # fmt: skip
        from loadtest.procstats import CpuSampler
        from loadtest.runner import build_report, read_locust_cpu, run_locust

        with CpuSampler() as sampler:
            log = run_locust(lt, locustfile=LOCUSTFILE.with_name("locust_flask.py"), host=f"http://127.0.0.1:{port}")
        report = build_report(lt, log, {}, ["Flask's threaded server with the eager torchvision model"], triton=False)
    return {"report": report.to_dict(), "cpu": cpu_accounting(sampler.series, read_locust_cpu(lt.out_dir), report)}


def _inprocess(cfg: BenchConfig, echo: Callable[[str], None]) -> dict[str, Any]:
    import os

    import torch

    from detserve.runtime.samples import sample_files
    from loadtest.inprocess import InProcessPipeline, measure

    # The limit is the best the pipeline does in one process: try one thread and all cores.
    cores = os.cpu_count() or 1
    runs = []
    for threads in sorted({1, cores}):
        echo(f"  in-process pipeline (no server), {threads} thread(s), batch sizes 1, 2, 4, 8")
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            pipeline = InProcessPipeline.from_repository(cfg.repository, cfg.model, intra_op_threads=threads)
            blobs = list(sample_files().values())
            result = measure(pipeline, blobs, seconds_per_size=cfg.inprocess_seconds)
        finally:
            torch.set_num_threads(previous)
        runs.append({**result, "threads": threads, "tensor_bytes": pipeline.tensor_bytes(blobs)})
    best = max(runs, key=lambda r: r["best_images_per_s"])
    # a multi-step family: the composing models after preprocessing, in order (their CPU per image is
    # in stage_cpu_ms_per_image under the same roles)
    steps = [s.role for s in pipeline.steps] if pipeline.steps is not None else None
    return {**best, "runs": runs, "steps": steps}


def ensure_model(cfg: BenchConfig, echo: Callable[[str], None]) -> None:
    """Build the trained demo detector as ``cfg.model`` when the repository does not hold it yet."""
    if (cfg.repository / cfg.model).is_dir():
        return
    from converters.repository import build_repository
    from detserve.app.demo import DEMO_DETECTOR, demo_build_request

    echo(f"building the trained demo detector ({DEMO_DETECTOR}) as {cfg.model!r} in {cfg.repository}")
    build_repository(demo_build_request(cfg.repository, cfg.model))


def run_bench(cfg: BenchConfig, echo: Callable[[str], None]) -> dict[str, Any]:
    import os
    import sys

    from loadtest.stats import fingerprint

    # the in-process limit runs torch here: give it the servers' OpenMP setting (detserve/ops/embedded.py,
    # server_environment) so both sides wait the same way; it only takes effect before torch loads
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    omp = {"OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"], "torch_loaded_before": "torch" in sys.modules}
    ensure_model(cfg, echo)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    echo("(a) in-process limit")
    results: dict[str, Any] = {
        "fingerprint": fingerprint(),
        "config": {"users": cfg.users, "duration_s": cfg.duration_s},
        "model": cfg.model,
        "inprocess_openmp": omp,
    }
    results["inprocess"] = _inprocess(cfg, echo)
    fused = cfg.fused and results["inprocess"]["steps"] is None
    if cfg.fused and not fused:
        results["fused_skipped"] = "the fused CPU layout is for single-core models (this one has several steps)"
        echo(f"  (f) skipped: {results['fused_skipped']}")
    echo("(c) Triton ensemble, dynamic batching (+ sweep, + 4K shared memory)")
    results["triton"] = _served(cfg, cfg.repository, "triton-dynamic-batching", echo)
    echo("(d) Triton ensemble, no dynamic batching")
    plain_repo = without_dynamic_batching(cfg.repository, cfg.out_dir / "repo-no-batching", cfg.model)
    results["triton_no_batching"] = _served(cfg, plain_repo, "triton-no-batching", echo)
    if fused:
        from converters.fused import fused_repository

        echo("(f) fused CPU layout (pre + core + post in one python model)")
        fused_repo = fused_repository(cfg.repository, cfg.out_dir / "repo-fused", cfg.model)
        results["fused"] = _served(cfg, fused_repo, "fused-cpu-layout", echo)
    echo("(b) Flask + eager PyTorch")
    results["flask"] = _flask(cfg, echo)
    results["ratios"] = ratios(results)
    results["targets"] = targets(results)
    (cfg.out_dir / "bench.json").write_text(json.dumps(results, indent=2, default=str))
    (cfg.out_dir / "bench.md").write_text(render_bench(results))
    return results


def ratios(r: dict[str, Any]) -> dict[str, float]:
    served = r["triton"]["report"]
    flask = r["flask"]["report"]
    plain = r["triton_no_batching"]["report"]
    limit = float(r["inprocess"]["best_images_per_s"])
    out = {
        "served / in-process limit (throughput)": served["throughput_rps"] / limit if limit else 0.0,
        "served / Flask (throughput)": served["throughput_rps"] / max(flask["throughput_rps"], 1e-9),
        "served p99 / Flask p99": served["latency_ms"].get("p99", 0.0) / max(flask["latency_ms"].get("p99", 0.0), 1e-9),
        "dynamic batching on / off (throughput)": served["throughput_rps"] / max(plain["throughput_rps"], 1e-9),
    }
    steps = r["triton"].get("sweep", {}).get("steps", [])
    if steps:
        peak = max(s["throughput_rps"] for s in steps)
        unloaded_p50 = steps[0]["p50"]
        near = [s for s in steps if s["throughput_rps"] <= 0.7 * peak] or steps[:1]
        at70 = max(near, key=lambda s: s["throughput_rps"])
        out["p99 at ~70% of peak / unloaded p50"] = at70["p99"] / max(unloaded_p50, 1e-9)
    shm = r["triton"].get("shm", [])
    if len(shm) == 2:
        out["4K: gRPC / shared memory (mean latency)"] = shm[0]["mean_ms"] / max(shm[1]["mean_ms"], 1e-9)
    if "fused" in r:
        fused = r["fused"]["report"]
        out[FUSED_RATIO] = fused["throughput_rps"] / max(served["throughput_rps"], 1e-9)
        if limit and r["fused"].get("cpu"):
            share = r["fused"]["cpu"]["locust_share"]
            out[FUSED_TARGET_RATIO] = fused["throughput_rps"] / max(limit * (1.0 - share), 1e-9)
    cpu = r["triton"].get("cpu")
    limit_per_cpu = float(r["inprocess"].get("best_images_per_cpu_s", 0.0))
    if cpu and limit:
        share = cpu["locust_share"]
        out[LOAD_SHARE] = share
        out[PER_CPU_RATIO] = per_cpu_s(cpu) / max(limit_per_cpu, 1e-9)
        out[CAPACITY_RATIO] = served["throughput_rps"] / max(limit * (1.0 - share), 1e-9)
    if cpu and r["triton_no_batching"].get("cpu"):
        out[BATCHING_PER_CPU_RATIO] = per_cpu_s(cpu) / max(per_cpu_s(r["triton_no_batching"]["cpu"]), 1e-9)
    if cpu and r["flask"].get("cpu"):
        out[FLASK_PER_CPU_RATIO] = per_cpu_s(cpu) / max(per_cpu_s(r["flask"]["cpu"]), 1e-9)
    if r.get("fused", {}).get("cpu") and limit_per_cpu:
        out[FUSED_PER_CPU_RATIO] = per_cpu_s(r["fused"]["cpu"]) / limit_per_cpu
    return out


def per_cpu_s(cpu: dict[str, Any]) -> float:
    """Requests served per CPU-second of the serving processes (the load generator not counted)."""
    return float(cpu["ok_requests"]) / max(float(cpu["server_cpu_s"]), 1e-9)


LOAD_SHARE = "load generator's CPU share of the machine (served run)"
# The target's figure (docs/performance.md): both sides per CPU-second they used, the client's not counted
PER_CPU_RATIO = "served / in-process limit, per CPU-second (load generator excluded)"
TARGET_RATIO = PER_CPU_RATIO
CAPACITY_RATIO = "served / in-process limit on the CPU the load generator leaves"
BATCHING_PER_CPU_RATIO = "dynamic batching on / off, per CPU-second"
FLASK_PER_CPU_RATIO = "served / Flask, per CPU-second (load generator excluded)"
FUSED_RATIO = "fused CPU layout / ensemble (throughput)"
FUSED_TARGET_RATIO = "fused / in-process limit on the CPU the load generator leaves"
FUSED_PER_CPU_RATIO = "fused / in-process limit, per CPU-second (load generator excluded)"
# (ratio, comparison, target) of issue 16, part 4
TARGETS = (
    (TARGET_RATIO, ">=", 0.8),
    ("served / Flask (throughput)", ">=", 3.0),
    ("served p99 / Flask p99", "<=", 1 / 3),
    ("p99 at ~70% of peak / unloaded p50", "<=", 2.0),
)


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of part 4: measured value, met or not, and what bounds it on this machine (measured)."""
    rat = r["ratios"]
    cpu = r["triton"].get("cpu") or {}
    limit = float(r["inprocess"]["best_images_per_s"])
    bound = ""
    if cpu:
        server_ms = 1000.0 * cpu["server_cpu_s"] / cpu["ok_requests"]
        left = cpu["cores"] * (1.0 - cpu["locust_share"])
        ceiling = 1000.0 * left / max(server_ms, 1e-9)
        model_ms = sum(r["inprocess"].get("stage_cpu_ms_per_image", {}).values())
        bound = (
            f"the server used {server_ms:.1f} CPU ms per request (the same stages in process: {model_ms:.1f} ms); "
            f"on the {left:.2f} cores Locust leaves that caps it at {ceiling:.0f} req/s "
            f"(in-process limit on those cores: {limit * (1.0 - cpu['locust_share']):.0f}); "
            f"{100 * cpu['idle_share']:.0f}% of the machine stayed idle, "
            f"{100 * cpu.get('others_share', 0.0):.0f}% went to processes outside this bench"
        )
    out = []
    for key, op, goal in TARGETS:
        if key not in rat:
            continue
        value = rat[key]
        met = value >= goal if op == ">=" else value <= goal
        why = ""
        if not met and key in (TARGET_RATIO, "served / Flask (throughput)"):
            why = bound
        elif not met and key == "served p99 / Flask p99":
            why = _latency_bound(r)
        elif not met:
            why = _sweep_bound(r)
        out.append({"ratio": key, "value": value, "target": f"{op} {goal:.2f}", "met": met, "bounded_by": why})
    return out


def _sweep_bound(r: dict[str, Any]) -> str:
    """The sweep step the p99-at-70%-of-peak ratio used, beside the unloaded one (measured)."""
    steps = r["triton"].get("sweep", {}).get("steps", [])
    if not steps:
        return ""
    peak = max(s["throughput_rps"] for s in steps)
    below = [s for s in steps if s["throughput_rps"] <= 0.7 * peak]
    first = steps[0]
    if not below:
        return (
            f"no sweep step ran at <= 70% of the peak ({peak:.1f} req/s): one user already reached "
            f"{100 * first['throughput_rps'] / max(peak, 1e-9):.0f}% of it, so the ratio is one user's own tail, "
            f"p99 {first['p99']:.0f} ms over p50 {first['p50']:.0f} ms (jitter from the CPU's other users, see the CPU table)"
        )
    at70 = max(below, key=lambda s: s["throughput_rps"])
    return (
        f"unloaded (1 user): p50 {first['p50']:.0f} ms; at {at70['users']:.0f} users {at70['throughput_rps']:.1f} req/s "
        f"(peak {peak:.1f}) p99 {at70['p99']:.0f} ms: requests wait behind the batch in service (8 s steps, one run)"
    )


def _latency_bound(r: dict[str, Any]) -> str:
    """A closed loop of N users waits N / throughput on average (Little's law): the served p99 can only
    drop to a third of Flask's with about three times its throughput, or a tail closer to the mean."""
    served, flask = r["triton"]["report"], r["flask"]["report"]
    users = int(r["config"]["users"])
    mean_ms = 1000.0 * users / max(served["throughput_rps"], 1e-9)
    p99 = served["latency_ms"].get("p99", 0.0)
    return (
        f"{users} closed-loop users: mean latency = users / throughput = {mean_ms:.0f} ms (Little's law); served p99 is "
        f"{p99 / max(mean_ms, 1e-9):.1f}x that mean; p99 <= Flask's / 3 ({flask['latency_ms'].get('p99', 0.0) / 3:.0f} ms) "
        "needs that throughput or a shorter tail"
    )


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
    ip = r["inprocess"]
    stages = ip.get("stage_cpu_ms_per_image", {})
    sizes: dict[str, float] = next((run["tensor_bytes"] for run in ip.get("runs", []) if run.get("tensor_bytes")), {})
    model = r.get("model", "")

    def kb(key: str) -> str:
        return f"{sizes.get(key, 0) / 1024:.0f} KB" if sizes else ""

    lines: list[str] = []
    for key, title in (("triton", "(c) ensemble, dynamic batching"), ("fused", "(f) fused CPU layout")):
        cpu = r.get(key, {}).get("cpu")
        if not cpu:
            continue
        roles = cpu["roles"]

        def ms(role: str, roles: dict[str, Any] = roles) -> float:
            return float(roles.get(role, {}).get("ms_per_request", 0.0))

        rows: list[tuple[str, str, float, float | None]] = [
            ("client (Locust: encode, gRPC send/receive)", kb("request"), ms("locust"), None),
            ("gate (nginx gRPC proxy)", kb("request"), ms("gate"), None),
            ("tritonserver (gRPC, scheduling, tensors to/from stub shared memory)", "", ms("tritonserver"), None),
        ]
        if key == "fused":
            rows.append(("fused stub (decode ... NMS, one process)", kb("detections"), ms(f"stub {model}"), sum(stages.values())))
        elif ip.get("steps"):  # a multi-step family: a row per composing model, as declared
            rows.append(
                (
                    "preprocess stub (decode, resize, normalise)",
                    kb("preprocessed"),
                    ms(f"stub {model}_preprocess"),
                    stages.get("preprocess"),
                )
            )
            rows += [(f"{role} stub", kb(role), ms(f"stub {model}_{role}"), stages.get(role)) for role in ip["steps"]]
        else:
            rows += [
                ("preprocess stub (decode, resize, normalise)", kb("preprocessed"), ms(f"stub {model}_preprocess"), stages.get("preprocess")),
                ("core stub (onnxruntime)", kb("core_outputs"), ms(f"stub {model}_core"), stages.get("core")),
                ("postprocess stub (decode, NMS)", kb("detections"), ms(f"stub {model}_postprocess"), stages.get("postprocess")),
            ]  # fmt: skip
        lines += [
            "",
            f"## Hops, per request: {title}",
            "",
            "| hop | bytes out | served CPU ms | in-process CPU ms | overhead ms |",
            "|---|---|---|---|---|",
        ]
        for name, size, served_ms, inproc in rows:
            extra = "| | |" if inproc is None else f"| {inproc:.1f} | {served_ms - inproc:.1f} |"
            lines.append(f"| {name} | {size} | {served_ms:.1f} {extra}")
        server = sum(v["ms_per_request"] for k, v in roles.items() if k.startswith(SERVER_ROLES_PREFIX))
        lines.append(f"| server total (gate + tritonserver + stubs) | | {server:.1f} | {sum(stages.values()):.1f} | "
                     f"{server - sum(stages.values()):.1f} |")  # fmt: skip
    return lines


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
