"""Measure scheduling variants of one built model side by side (instances, batching delay, ORT threads).

Each variant is a copy of the model's four directories with edited configs, served in turn and
loaded with the same closed-loop Locust run; the table shows what each knob does on *this*
machine. The defaults in ``ServingOptions`` come from running this on the 2-core CPU machine.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detserve.tritonconfig import parse, render

Mutation = Callable[[str, Any], None]  # (role, ModelConfig) -> edits in place; role: preprocess|core|postprocess
ROLES = ("preprocess", "core", "postprocess")


def step_roles(model: str, repository: Path) -> dict[str, str]:
    """The ensemble's composing models -> role, read from its config: ``<model>_<role>``, and the first
    step is the pre-processing also where it is another ensemble's (``build --share-preprocessing``)."""
    from detserve.ops.versions import composing
    from detserve.pipeline import PREPROCESS, role_of

    return {s: role_of(s, model) or (PREPROCESS if i == 0 else s) for i, s in enumerate(composing(model, repository))}


def variant_repository(src: Path, dst: Path, model: str, mutate: Mutation) -> Path:
    """Copy ``model``'s ensemble and composing models to ``dst`` and edit each composing config.

    The composing models are the ensemble's steps as its config lists them: a multi-step family
    (two-stage R-CNN) has more than the default three (role: ``step_roles``)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src / model, dst / model)
    for step, role in step_roles(model, src).items():
        shutil.copytree(src / step, dst / step)
        path = dst / step / "config.pbtxt"
        config = parse(path.read_text())
        mutate(role, config)
        path.write_text(render(config))
    return dst


def set_instances(counts: dict[str, int]) -> Mutation:
    def mutate(role: str, config: Any) -> None:
        if role in counts:
            config.instance_group[0].count = counts[role]

    return mutate


def set_delay(us: int) -> Mutation:
    def mutate(role: str, config: Any) -> None:
        if config.HasField("dynamic_batching"):
            config.dynamic_batching.max_queue_delay_microseconds = us

    return mutate


def set_ort_threads(threads: int) -> Mutation:
    def mutate(role: str, config: Any) -> None:
        if role == "core" and "intra_op_threads" in config.parameters:
            config.parameters["intra_op_threads"].string_value = str(threads)

    return mutate


def set_torch_threads(threads: int) -> Mutation:
    def mutate(role: str, config: Any) -> None:
        if "torch_threads" in config.parameters:
            config.parameters["torch_threads"].string_value = str(threads)

    return mutate


def no_dynamic_batching(role: str, config: Any) -> None:
    config.ClearField("dynamic_batching")


def only(roles: tuple[str, ...], mutation: Mutation) -> Mutation:
    """``mutation`` applied to the composing models of ``roles`` only."""

    def mutate(role: str, config: Any) -> None:
        if role in roles:
            mutation(role, config)

    return mutate


def combine(*mutations: Mutation) -> Mutation:
    def mutate(role: str, config: Any) -> None:
        for m in mutations:
            m(role, config)

    return mutate


@dataclass(frozen=True)
class Variant:
    name: str
    mutate: Mutation


# Relative to the built defaults (1 pre / 1 core / 1 post instance, ORT 1 thread, torch 1 thread
# per stub, 2 ms delay): each variant moves one knob, a few move two. Those naming "post x1" set it
# explicitly, so they mean the same on repositories built when the default was two.
VARIANTS = [
    Variant("as built", combine()),
    Variant("batching delay 0", set_delay(0)),
    Variant("batching delay 10 ms", set_delay(10_000)),
    Variant("ORT 2 threads", set_ort_threads(2)),
    Variant("core x2 instances", set_instances({"core": 2})),
    # the default before 2026-12-08: a heavy per-class NMS (many boxes over the threshold) may need it
    Variant("postprocess x2 instances", set_instances({"postprocess": 2})),
    Variant("preprocess x2 instances", set_instances({"preprocess": 2})),
    # measured 2026-12-07 (docs/performance.md): the single core instance queued longest; this pair
    # did as well or better by throughput at equal CPU per request, with ~250 MB less memory per model
    Variant("core x2 + post x1", set_instances({"core": 2, "postprocess": 1})),
    Variant("torch all cores in stubs", set_torch_threads(0)),
    # without a dynamic batcher on the first step: each request alone in its execute. The step now sends
    # each response as soon as it is made (backend/common.EarlySender), which took most of what this
    # variant gained; without a batcher the first step has no queue bound (ServingOptions.max_queue_size):
    # a measurement, not a default
    Variant(
        "preprocess unbatched + core x2 + post x1",
        combine(only(("preprocess",), no_dynamic_batching), set_instances({"core": 2, "postprocess": 1})),
    ),
]


def variant_named(name: str) -> Variant:
    """The variant called ``name`` (one of ``VARIANTS``)."""
    from detserve.errors import DetserveError

    for v in VARIANTS:
        if v.name == name:
            return v
    raise DetserveError(f"no tuning variant named {name!r}", hint="choose one of: " + ", ".join(v.name for v in VARIANTS))


def ort_thread_variants(cores: int | None = None) -> list[Variant]:
    """onnxruntime intra-op threads 1..cores for the core (and nothing else changed)."""
    import os

    n = cores or os.cpu_count() or 1
    return [Variant(f"ORT {t} thread{'s' if t > 1 else ''}", set_ort_threads(t)) for t in range(1, n + 1)]


def apply_variant(repository: Path, model: str, variant: Variant) -> list[Path]:
    """Edit ``model``'s composing configs in ``repository`` in place the way ``variant`` does (a server
    serving it picks the change up when the models are loaded again). Returns the configs changed."""
    changed = []
    for step, role in step_roles(model, repository).items():
        if role not in ROLES:
            continue
        path = repository / step / "config.pbtxt"
        before = path.read_text()
        config = parse(before)
        variant.mutate(role, config)
        after = render(config)
        if after != before:
            path.write_text(after)
            changed.append(path)
    return changed


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The variant with the highest throughput among those without failures."""
    clean = [r for r in rows if not r["failures"]] or rows
    return max(clean, key=lambda r: r["throughput_rps"])


def measured_load(grpc_url: str, model: str, out_dir: Path, users: int, duration_s: float) -> tuple[Any, dict[str, Any]]:
    """One closed-loop Locust run with every process's CPU sampled: (its report, bench_figures.cpu_accounting)."""
    from loadtest.bench_figures import cpu_accounting
    from loadtest.procstats import CpuSampler
    from loadtest.runner import LoadTestConfig, read_locust_cpu, run_loadtest

    cfg = LoadTestConfig(grpc_url=grpc_url, model=model, out_dir=out_dir, users=users, duration_s=duration_s)
    with CpuSampler() as sampler:  # every process below this one: tritonserver, its stubs, Locust
        report = run_loadtest(cfg).report
    return report, cpu_accounting(sampler.series, read_locust_cpu(out_dir), report)


def run_tuning(
    repository: Path,
    model: str,
    out_dir: Path,
    users: int,
    duration_s: float,
    echo: Callable[[str], None],
    variants: list[Variant] | None = None,
) -> list[dict[str, Any]]:
    """Each variant served in turn under the same load: throughput, latency, and the CPU it took
    (requests per CPU-second of the serving processes; the load generator's and others' shares)."""
    from detserve.ops.server import running_server
    from loadtest.bench_figures import per_cpu_s

    rows: list[dict[str, Any]] = []
    for i, variant in enumerate(VARIANTS if variants is None else variants):
        repo = variant_repository(repository, out_dir / f"repo-{i}", model, variant.mutate)
        echo(f"  {variant.name}")
        with running_server(repo) as server:
            report, cpu = measured_load(server.options.grpc_url, model, out_dir / f"run-{i}", users, duration_s)
        rows.append(
            {
                "variant": variant.name,
                "throughput_rps": report.throughput_rps,
                **report.latency_ms,
                "failures": report.failures,
                "per_cpu_rps": per_cpu_s(cpu),
                "locust_share": cpu["locust_share"],
                "idle_share": cpu["idle_share"],
                "others_share": cpu["others_share"],
            }
        )
        shutil.rmtree(repo)
    return rows


def render_tuning(rows: list[dict[str, Any]], users: int, limit: dict[str, float] | None = None) -> str:
    """The variants' table; with ``limit`` (``inprocess_limit``) each row's throughput over the limit
    on the CPU the load generator left (bench's capacity ratio) and on what it and the machine's other
    users left (``leftover_ratio``)."""
    base = rows[0]["throughput_rps"] or 1e-9
    base_cpu = rows[0].get("per_cpu_rps") or 1e-9
    head = f"| variant ({users} users) | req/s | vs as built | req per server CPU-s | vs as built | p50 ms | p99 ms | failures | idle % |"
    if limit:
        head += " / limit on Locust's leftover | / limit on the leftover of Locust and others |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        per_cpu = r.get("per_cpu_rps", 0.0)
        line = (
            f"| {r['variant']} | {r['throughput_rps']:.1f} | {r['throughput_rps'] / base:.2f} | {per_cpu:.1f} | "
            f"{per_cpu / base_cpu:.2f} | {r.get('p50', 0):.0f} | {r.get('p99', 0):.0f} | {r['failures']} | "
            f"{100 * r.get('idle_share', 0.0):.0f} |"
        )
        if limit:
            line += f" {capacity_ratio(r, limit):.2f} | {leftover_ratio(r, limit):.2f} |"
        lines.append(line)
    return "\n".join(lines)


def capacity_ratio(row: dict[str, Any], limit: dict[str, float]) -> float:
    """Served throughput over the in-process limit on the CPU the load generator leaves (bench_figures.CAPACITY_RATIO)."""
    return float(row["throughput_rps"]) / max(limit["images_per_s"] * (1.0 - float(row.get("locust_share", 0.0))), 1e-9)


def leftover_ratio(row: dict[str, Any], limit: dict[str, float], cores: int | None = None) -> float:
    """Served throughput over what the in-process pipeline does with the CPU that the load generator
    *and the machine's other users* left (its images per CPU-second times those CPU-seconds): on a
    shared machine the in-process limit, measured at another moment, saw other neighbours."""
    import os

    free = (cores or os.cpu_count() or 1) * (1.0 - float(row.get("locust_share", 0.0)) - float(row.get("others_share", 0.0)))
    return float(row["throughput_rps"]) / max(limit["images_per_cpu_s"] * free, 1e-9)


def tune_and_report(
    repository: Path,
    model: str,
    out_dir: Path,
    users: int,
    duration_s: float,
    echo: Callable[[str], None],
    ort_threads_only: bool = False,
    apply: bool = False,
    limit: bool = False,
    profile: tuple[int, ...] = (),
) -> str:
    """Run the variants (every one, or onnxruntime's thread counts only), write ``tuning.md`` into
    ``out_dir`` and return the table; ``apply`` writes the fastest variant into the repository.
    ``limit``: measure the in-process limit first and show each variant against it; ``profile``:
    these concurrency levels on the model as built, where each step queues and computes (``step_profile``)."""
    measured = inprocess_limit(repository, model, 3.0, echo) if limit else None
    table = ""
    if profile:
        table = render_profile(step_profile(repository, model, out_dir, profile, duration_s, echo), measured) + "\n\n"
    variants = [VARIANTS[0], *ort_thread_variants()] if ort_threads_only else VARIANTS
    rows = run_tuning(repository, model, out_dir, users, duration_s, echo, variants)
    table += render_tuning(rows, users, measured)
    if measured:
        table += (
            f"\n\nin-process limit: {measured['images_per_s']:.1f} images/s, "
            f"{measured['images_per_cpu_s']:.1f} images per CPU-second"
        )
    if apply:
        best = best_row(rows)
        variant = next(v for v in variants if v.name == best["variant"])
        changed = apply_variant(repository, model, variant)
        table += f"\n\napplied: {variant.name!r} ({best['throughput_rps']:.1f} req/s) to " + (
            ", ".join(str(p) for p in changed) or "nothing (already as built)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tuning.md").write_text(table + "\n")
    return table


def inprocess_limit(repository: Path, model: str, seconds_per_size: float, echo: Callable[[str], None]) -> dict[str, float]:
    """The in-process limit: the pipeline without a server at its best batch size, on one thread and on
    all cores (what ``detserve bench``'s (a) measures): the best images/s, and the best images per CPU-second."""
    import os

    import torch

    from detserve.runtime.samples import sample_files
    from loadtest.inprocess import InProcessPipeline, measure

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the servers' stubs wait (bench.run_bench says why)
    blobs = list(sample_files().values())
    best = {"images_per_s": 0.0, "images_per_cpu_s": 0.0}
    for threads in sorted({1, os.cpu_count() or 1}):
        echo(f"  in-process limit: {threads} thread(s)")
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            pipeline = InProcessPipeline.from_repository(repository, model, intra_op_threads=threads)
            run = measure(pipeline, blobs, seconds_per_size=seconds_per_size)
        finally:
            torch.set_num_threads(previous)
        best["images_per_s"] = max(best["images_per_s"], float(run["best_images_per_s"]))
        best["images_per_cpu_s"] = max(best["images_per_cpu_s"], float(run["best_images_per_cpu_s"]))
    return best


def step_profile(
    repository: Path,
    model: str,
    out_dir: Path,
    users: tuple[int, ...],
    duration_s: float,
    echo: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Where requests wait while cores idle: one server, a closed-loop run per concurrency level, and
    per composing model Triton's queue and compute time per request, its mean batch and how busy its
    instances were (stats.busy_share), beside the machine's idle share and the throughput."""
    from detserve.ops.server import running_server
    from detserve.tritonconfig import read_config
    from loadtest.bench_figures import per_cpu_s
    from loadtest.stats import busy_share

    roles = step_roles(model, repository)
    instances = {s: sum(g.count for g in read_config(repository / s).instance_group) or 1 for s in roles}
    rows = []
    with running_server(repository) as server:
        for n in users:
            echo(f"  {n} users")
            report, cpu = measured_load(server.options.grpc_url, model, out_dir / f"profile-{n}", n, duration_s)
            steps = {
                roles[name]: {
                    "queue_ms": s.queue_ms,
                    "compute_ms": s.compute_ms,
                    "batch": s.avg_batch_size,
                    "busy": busy_share(s, cpu["window_s"], instances[name]),
                    "instances": instances[name],
                }
                for name, s in report.server_split.items()
                if name in instances
            }
            rows.append(
                {
                    "users": n,
                    "throughput_rps": report.throughput_rps,
                    "p50": report.latency_ms.get("p50", 0.0),
                    "per_cpu_rps": per_cpu_s(cpu),
                    "idle_share": cpu["idle_share"],
                    "locust_share": cpu["locust_share"],
                    "others_share": cpu["others_share"],
                    "steps": steps,
                }
            )
    return rows


def render_profile(rows: list[dict[str, Any]], limit: dict[str, float] | None = None) -> str:
    """One line per concurrency level: throughput, the CPU shares, then per step queue / compute ms,
    mean batch and the busy share of its instances."""
    roles = list(rows[0]["steps"]) if rows else []
    head = "| users | req/s | / limit on Locust's leftover | / limit on Locust's and others' leftover | idle % | Locust % | others % |"
    head += "".join(f" {r}: queue / compute ms, batch, busy % |" for r in roles)
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for row in rows:
        ratio = f"{capacity_ratio(row, limit):.2f} | {leftover_ratio(row, limit):.2f}" if limit else "- | -"
        line = (
            f"| {row['users']} | {row['throughput_rps']:.1f} | {ratio} | {100 * row['idle_share']:.0f} | "
            f"{100 * row['locust_share']:.0f} | {100 * row['others_share']:.0f} |"
        )
        for r in roles:
            s = row["steps"].get(r)
            line += f" {s['queue_ms']:.1f} / {s['compute_ms']:.1f}, {s['batch']:.1f}, {100 * s['busy']:.0f} |" if s else " - |"
        lines.append(line)
    return "\n".join(lines)
