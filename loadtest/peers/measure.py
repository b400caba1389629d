"""``detserve bench --peers``: Ray Serve, LitServe and BentoML serving the same pipeline, under the same load.

For each peer: a short sweep over (max batch size, batch wait) — restarting the peer per setting,
since none of the three changes its batching while serving — then the best setting (most requests
per server CPU-second, the issue's figure) again for the bench's full duration. Every run is driven
by the Flask baseline's Locust user (raw image body over HTTP, the same images), with the CPU of
every process below this one sampled from /proc: the peer's processes (its whole tree: Ray's GCS,
raylet, proxy and replicas; LitServe's API servers and workers; BentoML's arbiter and workers) are
the server, Locust is not. Memory is the peer tree's USS at start and right after the load.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from loadtest.peers.common import PEERS, PeerConfig

# (max batch size, batch wait ms): with two replicas and 16 users a replica holds about 8 requests
DEFAULT_SWEEP: tuple[tuple[int, float], ...] = ((4, 5.0), (8, 5.0), (8, 20.0))
PEER_ROLE = "peer "  # the prefix of every peer process's CPU role
PACKAGES = {"ray": "ray", "litserve": "litserve", "bentoml": "bentoml"}  # what each peer imports (tests replace one)


@dataclass(frozen=True)
class PeerBenchConfig:
    repository: Path
    model: str
    out_dir: Path
    users: int = 16
    duration_s: float = 20.0
    sweep_s: float = 10.0
    sweep: tuple[tuple[int, float], ...] = DEFAULT_SWEEP
    peers: tuple[str, ...] = PEERS


def cpu_split(cores: int | None = None) -> tuple[int, int]:
    """(replicas, threads per replica): one replica per core, one thread each, as the peers' CPU guides say."""
    n = cores or os.cpu_count() or 1
    return n, 1


def check_installed(peers: tuple[str, ...] = PEERS) -> None:
    """A clear error when a peer's package is missing (the optional extra ``peers``)."""
    import importlib.util

    from detserve.errors import DetserveError

    missing = [p for p in peers if importlib.util.find_spec(PACKAGES[p]) is None]
    if missing:
        raise DetserveError(f"not installed: {', '.join(missing)}", hint='pip install -e ".[peers]" -c scripts/constraints.txt')


def run_peers(cfg: PeerBenchConfig, echo: Callable[[str], None]) -> dict[str, Any]:
    """Every peer's sweep and best run (see the module docstring), keyed by peer."""
    check_installed(cfg.peers)
    out: dict[str, Any] = {}
    for peer in cfg.peers:
        out[peer] = run_peer(cfg, peer, echo)
    return out


def run_peer(cfg: PeerBenchConfig, peer: str, echo: Callable[[str], None]) -> dict[str, Any]:
    from detserve.ops.server_options import free_port

    replicas, threads = cpu_split()
    base = PeerConfig(peer, str(cfg.repository), cfg.model, free_port(), replicas=replicas, ort_threads=threads)
    # BentoML chooses its own wait: its sweep is over the batch size only
    settings = sorted({(b, 0.0 if peer == "bentoml" else w) for b, w in cfg.sweep})
    sweep = []
    for size, wait in settings:
        pc = replace(base, port=free_port(), max_batch_size=size, batch_wait_ms=wait)
        echo(f"  {peer} ({pc.label}): {cfg.users} users for {cfg.sweep_s:.0f} s")
        sweep.append(measure_peer(pc, cfg, cfg.sweep_s, cfg.out_dir / f"peer-{peer}-b{size}-w{wait:g}"))
    best = max(sweep, key=lambda r: per_cpu(r["cpu"]))
    pc = PeerConfig(**best["config"])
    if len(sweep) > 1 or cfg.duration_s != cfg.sweep_s:
        echo(f"  {peer}, best ({pc.label}): {cfg.users} users for {cfg.duration_s:.0f} s")
        best = measure_peer(replace(pc, port=free_port()), cfg, cfg.duration_s, cfg.out_dir / f"peer-{peer}")
    return {**best, "sweep": [_sweep_row(r) for r in sweep]}


def measure_peer(pc: PeerConfig, cfg: PeerBenchConfig, seconds: float, out_dir: Path) -> dict[str, Any]:
    """Start the peer, load it for ``seconds`` with ``cfg.users`` closed-loop users, stop it."""
    from detserve.runtime.samples import sample_files
    from loadtest.bench_figures import cpu_accounting
    from loadtest.peers.service import PeerService
    from loadtest.procstats import CpuSampler
    from loadtest.runner import LOCUSTFILE, LoadTestConfig, build_report, read_locust_cpu, run_locust

    lt = LoadTestConfig(
        grpc_url=f"127.0.0.1:{pc.port}", model=cfg.model, out_dir=out_dir, users=cfg.users, duration_s=seconds,
        title=f"{cfg.model}: {pc.peer} ({pc.label}), {cfg.users} users", warmup_requests=0,
    )  # fmt: skip
    with PeerService(pc, next(iter(sample_files().values()))) as service:
        assert service.process is not None
        root = service.process.pid
        memory_start = tree_memory(root)
        with CpuSampler() as sampler:
            log = run_locust(lt, locustfile=LOCUSTFILE.with_name("locust_flask.py"), host=service.url)
        memory_load = tree_memory(root)
        _label_peer(sampler.series, pc.peer)  # while its processes are alive to be named
        started_s = service.started_s
    report = build_report(lt, log, {}, [f"{pc.peer} serving the in-process pipeline ({pc.label})"], triton=False)
    cpu = cpu_accounting(sampler.series, read_locust_cpu(lt.out_dir), report)
    cpu["server_cpu_s"] = sum(v["cpu_s"] for k, v in cpu["roles"].items() if k.startswith(PEER_ROLE))
    return {
        "config": asdict(pc),
        "report": report.to_dict(),
        "cpu": cpu,
        "memory_start": memory_start,
        "memory_after_load": memory_load,
        "started_s": started_s,
    }


def per_cpu(cpu: dict[str, Any]) -> float:
    """Requests per CPU-second of the peer's processes (the load generator not counted)."""
    return float(cpu["ok_requests"]) / max(float(cpu["server_cpu_s"]), 1e-9)


def tree_memory(root: int) -> dict[str, float]:
    """RSS and USS (MB) summed over a process and everything below it, and how many processes that is."""
    from loadtest.procstats import memory_table

    rows = memory_table(root)
    return {"processes": len(rows), "rss_mb": sum(r.rss_mb for r in rows), "uss_mb": sum(r.uss_mb for r in rows)}


def _label_peer(series: Any, peer: str) -> None:
    """Name the peer's processes by what they are (``peer ray: raylet``): everything below this process
    that is not Locust belongs to the peer while it runs, and procstats knows none of them."""
    from loadtest.procstats import read_proc

    for pid, role in list(series.roles.items()):
        if role == "other":
            info = read_proc(pid)
            series.roles[pid] = f"{PEER_ROLE}{peer}: {process_kind(info.argv if info else ())}"


def process_kind(argv: tuple[str, ...] | list[str]) -> str:
    """A short name for a peer process: Ray's actor or daemon, a spawned worker, a module run with -m."""
    args = list(argv)
    if not args:
        return "exited"
    head = args[0]
    if head.startswith("ray::"):
        return head[5:].split(":")[0].split()[0]  # ServeReplica, ProxyActor, ServeController, ...
    if any("multiprocessing.spawn" in a for a in args[1:4]):
        return "spawned worker"  # LitServe's inference workers
    if any("multiprocessing.resource_tracker" in a for a in args[1:4]):
        return "resource tracker"
    if "-m" in args[:3]:
        return f"python -m {args[args.index('-m') + 1]}"
    return Path(head).name


def _sweep_row(r: dict[str, Any]) -> dict[str, Any]:
    rep, cpu = r["report"], r["cpu"]
    return {
        "max_batch_size": r["config"]["max_batch_size"],
        "batch_wait_ms": r["config"]["batch_wait_ms"],
        "throughput_rps": rep["throughput_rps"],
        "per_cpu_s": per_cpu(cpu),
        "p50": rep["latency_ms"].get("p50", 0.0),
        "p99": rep["latency_ms"].get("p99", 0.0),
        "failures": rep["failures"],
    }
