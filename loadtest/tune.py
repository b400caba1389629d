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


def variant_repository(src: Path, dst: Path, model: str, mutate: Mutation) -> Path:
    """Copy ``model``'s ensemble and composing models to ``dst`` and edit each composing config.

    The composing models are the ensemble's steps as its config lists them: a multi-step family
    (two-stage R-CNN) has more than the default three (role: the step's name after ``<model>_``)."""
    from detserve.ops.versions import composing

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src / model, dst / model)
    for step in composing(model, src):
        role = step.removeprefix(f"{model}_")
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


def combine(*mutations: Mutation) -> Mutation:
    def mutate(role: str, config: Any) -> None:
        for m in mutations:
            m(role, config)

    return mutate


@dataclass(frozen=True)
class Variant:
    name: str
    mutate: Mutation


# Relative to the built defaults (1 pre / 1 core / 2 post instances, ORT 1 thread, torch 1 thread
# per stub, 2 ms delay): each variant moves one knob, a few move two.
VARIANTS = [
    Variant("as built", combine()),
    Variant("batching delay 0", set_delay(0)),
    Variant("batching delay 10 ms", set_delay(10_000)),
    Variant("ORT 2 threads", set_ort_threads(2)),
    Variant("core x2 instances", set_instances({"core": 2})),
    Variant("postprocess x1 instance", set_instances({"postprocess": 1})),
    Variant("preprocess x2 instances", set_instances({"preprocess": 2})),
    Variant("ORT 2 threads + post x1", combine(set_ort_threads(2), set_instances({"postprocess": 1}))),
    Variant("core x2 + post x1", set_instances({"core": 2, "postprocess": 1})),
    Variant("torch all cores in stubs", set_torch_threads(0)),
]


def ort_thread_variants(cores: int | None = None) -> list[Variant]:
    """onnxruntime intra-op threads 1..cores for the core (and nothing else changed)."""
    import os

    n = cores or os.cpu_count() or 1
    return [Variant(f"ORT {t} thread{'s' if t > 1 else ''}", set_ort_threads(t)) for t in range(1, n + 1)]


def apply_variant(repository: Path, model: str, variant: Variant) -> list[Path]:
    """Edit ``model``'s composing configs in ``repository`` in place the way ``variant`` does (a server
    serving it picks the change up when the models are loaded again). Returns the configs changed."""
    changed = []
    for role in ROLES:
        path = repository / f"{model}_{role}" / "config.pbtxt"
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


def run_tuning(
    repository: Path,
    model: str,
    out_dir: Path,
    users: int,
    duration_s: float,
    echo: Callable[[str], None],
    variants: list[Variant] | None = None,
) -> list[dict[str, Any]]:
    from detserve.ops.server import running_server
    from loadtest.runner import LoadTestConfig, run_loadtest

    rows: list[dict[str, Any]] = []
    for i, variant in enumerate(VARIANTS if variants is None else variants):
        repo = variant_repository(repository, out_dir / f"repo-{i}", model, variant.mutate)
        echo(f"  {variant.name}")
        with running_server(repo) as server:
            cfg = LoadTestConfig(
                grpc_url=server.options.grpc_url, model=model, out_dir=out_dir / f"run-{i}", users=users, duration_s=duration_s
            )
            report = run_loadtest(cfg).report
        rows.append(
            {"variant": variant.name, "throughput_rps": report.throughput_rps, **report.latency_ms, "failures": report.failures}
        )
        shutil.rmtree(repo)
    return rows


def render_tuning(rows: list[dict[str, Any]], users: int) -> str:
    base = rows[0]["throughput_rps"] or 1e-9
    lines = [
        f"| variant ({users} users) | req/s | vs as built | p50 ms | p99 ms | failures |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['throughput_rps']:.1f} | {r['throughput_rps'] / base:.2f} | "
            f"{r.get('p50', 0):.0f} | {r.get('p99', 0):.0f} | {r['failures']} |"
        )
    return "\n".join(lines)


def tune_and_report(
    repository: Path,
    model: str,
    out_dir: Path,
    users: int,
    duration_s: float,
    echo: Callable[[str], None],
    ort_threads_only: bool = False,
    apply: bool = False,
) -> str:
    """Run the variants (every one, or onnxruntime's thread counts only), write ``tuning.md`` into
    ``out_dir`` and return the table; ``apply`` writes the fastest variant into the repository."""
    variants = [VARIANTS[0], *ort_thread_variants()] if ort_threads_only else VARIANTS
    rows = run_tuning(repository, model, out_dir, users, duration_s, echo, variants)
    table = render_tuning(rows, users)
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
