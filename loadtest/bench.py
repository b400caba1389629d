"""``detserve bench``: the served ensemble measured side by side with its baselines, in one run.

Same model, same images, same machine, same closed-loop concurrency:
  (a) the pipeline in-process, no server, at its best batch size — the practical limit;
  (b) a plain Flask + eager PyTorch service — what teams build first;
  (c) the Triton ensemble with dynamic batching;
  (d) the same without dynamic batching;
  (e) 4K images through system shared memory against plain gRPC;
  (f) the fused CPU layout: the whole served chain in one python model (converters/fused.py);
  (g) with ``torch_core``: the ensemble again with its cores on the python-torch target (torch.export
      run by torch in the python step model) against (c)'s ONNX Runtime cores, same options;
  (h) with ``peers``: Ray Serve, LitServe and BentoML serving (a)'s pipeline over HTTP (loadtest/peers).
Served runs also record every process's CPU seconds (tritonserver, each stub, the gate, Locust)
and memory (RSS/PSS/USS), so the load generator's share is accounted for (loadtest/procstats.py).
Every figure is a ratio of numbers measured here, now (these machines are shared and noisy).

This module runs the measurements; what they mean (CPU accounting, ratios, targets):
``bench_figures.py``; ``bench.md``: ``bench_report.py``; the model measured: ``bench_model.py``.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detserve.ops.versions import composing
from loadtest.bench_figures import cpu_accounting, ratios, targets
from loadtest.bench_model import ensure_model, flask_kwargs_from_build
from loadtest.bench_report import render_bench
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
    torch_core: bool = False  # (g): also build and serve the model with its cores on the python-torch target
    peers: bool = False  # (h): Ray Serve, LitServe, BentoML serving the same pipeline (loadtest/peers)
    peer_sweep: tuple[tuple[int, float], ...] = ()  # (max batch size, wait ms) per setting; () = loadtest/peers' default
    peer_sweep_s: float = 10.0  # each setting's run
    flask: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the Flask service


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


def _peers(cfg: BenchConfig, echo: Callable[[str], None]) -> dict[str, Any]:
    from dataclasses import replace

    from loadtest.peers.measure import PeerBenchConfig, run_peers

    echo("(h) peers: Ray Serve, LitServe, BentoML serving the same pipeline (sweep, then the best setting)")
    pc = PeerBenchConfig(cfg.repository, cfg.model, cfg.out_dir, cfg.users, cfg.duration_s, cfg.peer_sweep_s)
    return run_peers(replace(pc, sweep=cfg.peer_sweep) if cfg.peer_sweep else pc, echo)


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


def run_bench(cfg: BenchConfig, echo: Callable[[str], None]) -> dict[str, Any]:
    import os
    import sys

    from loadtest.stats import fingerprint

    # the in-process limit runs torch here: give it the servers' OpenMP setting (detserve/ops/embedded.py,
    # server_environment) so both sides wait the same way; it only takes effect before torch loads
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    omp = {"OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"], "torch_loaded_before": "torch" in sys.modules}
    if cfg.peers:  # before minutes of other runs are spent on a bench that cannot finish
        from loadtest.peers.measure import check_installed

        check_installed()
    ensure_model(cfg.repository, cfg.model, echo)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    echo("(a) in-process limit")
    results: dict[str, Any] = {
        "fingerprint": fingerprint(),
        "config": {"users": cfg.users, "duration_s": cfg.duration_s},
        "model": cfg.model,
        "preprocess_step": composing(cfg.model, cfg.repository)[0],  # shared (build --share-preprocessing) or its own
        "inprocess_openmp": omp,
    }
    results["inprocess"] = _inprocess(cfg, echo)
    echo("(c) Triton ensemble, dynamic batching (+ sweep, + 4K shared memory)")
    results["triton"] = _served(cfg, cfg.repository, "triton-dynamic-batching", echo)
    echo("(d) Triton ensemble, no dynamic batching")
    plain_repo = without_dynamic_batching(cfg.repository, cfg.out_dir / "repo-no-batching", cfg.model)
    results["triton_no_batching"] = _served(cfg, plain_repo, "triton-no-batching", echo)
    if cfg.fused:
        from converters.fused import fused_repository

        echo("(f) fused CPU layout (the whole chain in one python model)")
        fused_repo = fused_repository(cfg.repository, cfg.out_dir / "repo-fused", cfg.model)
        results["fused"] = _served(cfg, fused_repo, "fused-cpu-layout", echo)
    if cfg.torch_core:
        from loadtest.bench_model import torch_core_repository

        echo("(g) Triton ensemble, torch core (python-torch target: building it)")
        torch_repo = torch_core_repository(cfg.repository, cfg.out_dir / "repo-torch-core", cfg.model)
        results["torch_core"] = _served(cfg, torch_repo, "torch-core", echo)
    echo("(b) Flask + eager PyTorch")
    results["flask"] = _flask(cfg, echo)
    if cfg.peers:
        results["peers"] = _peers(cfg, echo)
    results["ratios"] = ratios(results)
    results["targets"] = targets(results)
    if cfg.peers:
        from loadtest.peers.report import peer_targets

        results["peer_targets"] = peer_targets(results)
    (cfg.out_dir / "bench.json").write_text(json.dumps(results, indent=2, default=str))
    (cfg.out_dir / "bench.md").write_text(render_bench(results))
    return results
