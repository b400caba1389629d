"""``detserve bench``: the served ensemble measured side by side with its baselines, in one run.

Same model, same images, same machine, same closed-loop concurrency:
  (a) the pipeline in-process, no server, at its best batch size — the practical limit;
  (b) a plain Flask + eager PyTorch service — what teams build first;
  (c) the Triton ensemble with dynamic batching;
  (d) the same without dynamic batching;
  (e) 4K images through system shared memory against plain gRPC.
Every figure is a ratio of numbers measured here, now (these machines are shared and noisy).
"""

from __future__ import annotations

import json
import secrets
import subprocess
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


def process_tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants (the server and its python stubs)."""
    total_kb = 0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
        children = subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True).stdout.split()
        pids.extend(int(c) for c in children)
    return total_kb / 1024.0


def _served(cfg: BenchConfig, repository: Path, label: str, echo: Callable[[str], None]) -> dict[str, Any]:
    from detserve.ops.server import running_server

    echo(f"  {label}: starting server")
    key = secrets.token_hex(24)  # this run's own: the shared-memory comparison registers a region (an admin API)
    with running_server(repository, admin_key=key) as server:
        rss = process_tree_rss_mb(server.process.pid) if server.process else 0.0
        lt = LoadTestConfig(
            grpc_url=server.options.grpc_url, model=cfg.model, out_dir=cfg.out_dir / label, users=cfg.users,
            duration_s=cfg.duration_s, title=f"{cfg.model}: {label}, {cfg.users} users",
        )  # fmt: skip
        echo(f"  {label}: {cfg.users} users for {cfg.duration_s:.0f} s")
        report = run_loadtest(lt).report
        out: dict[str, Any] = {"report": report.to_dict(), "server_rss_mb": rss}
        if label == "triton-dynamic-batching":
            out["sweep"] = _sweep(cfg, server.options.grpc_url, echo)
            out["shm"] = _shared_memory(cfg, server.options.grpc_url, echo, key)
            out["server_rss_mb_after_load"] = process_tree_rss_mb(server.process.pid) if server.process else 0.0
    return out


def _sweep(cfg: BenchConfig, url: str, echo: Callable[[str], None]) -> dict[str, Any]:
    echo(f"  sweep: concurrency {list(cfg.sweep)}, {cfg.sweep_step_s:.0f} s each")
    lt = LoadTestConfig(
        grpc_url=url, model=cfg.model, out_dir=cfg.out_dir / "sweep", shape="sweep", sweep=cfg.sweep,
        step_s=cfg.sweep_step_s, users=max(cfg.sweep), title=f"{cfg.model}: concurrency sweep",
    )  # fmt: skip
    return run_loadtest(lt).report.to_dict()


def _shared_memory(cfg: BenchConfig, url: str, echo: Callable[[str], None], admin_key: str) -> list[dict[str, Any]]:
    from dataclasses import asdict

    from loadtest.shm import compare_transfer, large_jpeg

    image = large_jpeg()
    echo(f"  4K image ({len(image) / 1e6:.1f} MB JPEG): plain gRPC vs system shared memory, {cfg.shm_requests} requests each")
    return [asdict(t) for t in compare_transfer(url, cfg.model, image, cfg.shm_requests, admin_key)]


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
        from loadtest.runner import build_report, run_locust

        log = run_locust(lt, locustfile=LOCUSTFILE.with_name("locust_flask.py"), host=f"http://127.0.0.1:{port}")
        report = build_report(lt, log, {}, ["Flask's threaded server with the eager torchvision model"], triton=False)
    return {"report": report.to_dict()}


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
            result = measure(pipeline, list(sample_files().values()), seconds_per_size=cfg.inprocess_seconds)
        finally:
            torch.set_num_threads(previous)
        runs.append({**result, "threads": threads})
    best = max(runs, key=lambda r: r["best_images_per_s"])
    return {**best, "runs": runs}


def ensure_model(cfg: BenchConfig, echo: Callable[[str], None]) -> None:
    """Build the trained demo detector as ``cfg.model`` when the repository does not hold it yet."""
    if (cfg.repository / cfg.model).is_dir():
        return
    from converters.repository import build_repository
    from detserve.app.demo import DEMO_DETECTOR, demo_build_request

    echo(f"building the trained demo detector ({DEMO_DETECTOR}) as {cfg.model!r} in {cfg.repository}")
    build_repository(demo_build_request(cfg.repository, cfg.model))


def run_bench(cfg: BenchConfig, echo: Callable[[str], None]) -> dict[str, Any]:
    from loadtest.stats import fingerprint

    ensure_model(cfg, echo)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    echo("(a) in-process limit")
    results: dict[str, Any] = {"fingerprint": fingerprint(), "config": {"users": cfg.users, "duration_s": cfg.duration_s}}
    results["inprocess"] = _inprocess(cfg, echo)
    echo("(c) Triton ensemble, dynamic batching (+ sweep, + 4K shared memory)")
    results["triton"] = _served(cfg, cfg.repository, "triton-dynamic-batching", echo)
    echo("(d) Triton ensemble, no dynamic batching")
    plain_repo = without_dynamic_batching(cfg.repository, cfg.out_dir / "repo-no-batching", cfg.model)
    results["triton_no_batching"] = _served(cfg, plain_repo, "triton-no-batching", echo)
    echo("(b) Flask + eager PyTorch")
    results["flask"] = _flask(cfg, echo)
    results["ratios"] = ratios(results)
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
    return out


def render_bench(r: dict[str, Any]) -> str:
    served, flask, plain = r["triton"]["report"], r["flask"]["report"], r["triton_no_batching"]["report"]

    def row(name: str, rep: dict[str, Any]) -> str:
        lat = rep["latency_ms"]
        return (
            f"| {name} | {rep['throughput_rps']:.1f} | {lat.get('p50', 0):.0f} | {lat.get('p90', 0):.0f} | "
            f"{lat.get('p95', 0):.0f} | {lat.get('p99', 0):.0f} | {rep['failures']} |"
        )

    lines = [
        "# detserve bench",
        "",
        f"{r['config']['users']} concurrent users (closed loop), {r['config']['duration_s']:.0f} s per run, same images.",
        "",
        "| pipeline | req/s | p50 ms | p90 ms | p95 ms | p99 ms | failures |",
        "|---|---|---|---|---|---|---|",
        f"| (a) in-process, best: batch {r['inprocess']['best_batch_size']}, {r['inprocess']['threads']} thread(s) "
        f"| {r['inprocess']['best_images_per_s']:.1f} | | | | | |",
        row("(b) Flask + eager PyTorch", flask),
        row("(c) Triton ensemble, dynamic batching", served),
        row("(d) Triton ensemble, no dynamic batching", plain),
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
    lines += ["", "## Machine", "", *[f"- {k}: {v}" for k, v in r["fingerprint"].items()], ""]
    return "\n".join(lines)
