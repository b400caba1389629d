"""Memory per served model: USS of the server with 1, 2, 4 ... models loaded, at rest and under load.

The figure users feel when they serve many detectors on one host is what each *additional* model
costs. For each layout (the ensemble's repository; the fused layout's, when given) and each count
N, a repository holding the first N models is served (its model folders hard-linked, nothing
copied), and ``procstats.memory_table`` reads every process's USS (pages only it maps: what ending
it would free) grouped by role — tritonserver and the python stubs of each model:

- at rest: once the server is ready (every stub has initialised: its imports and sessions are in);
- under load: each model in turn gets a closed-loop Locust run, memory sampled every second
  during the runs; the row keeps the sample with the most USS (buffers, allocator arenas and
  onnxruntime's arena grow with batches and stay).

The per-model cost is the slope between counts: (USS(N) - USS(1)) / (N - 1). Nothing here mocks
the server: a real tritonserver, real stubs, real requests.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from loadtest.procstats import ProcessMemory, memory_by_role, memory_table

SHARED = "ensemble, shared pre-processing"  # the layout name run_memory serves through share_preprocessing


@dataclass(frozen=True)
class MemoryRow:
    layout: str  # "ensemble" | "fused" | SHARED
    models: tuple[str, ...]
    rest: dict[str, dict[str, float]]  # role -> processes, rss/pss/uss MB (procstats.memory_by_role)
    load: dict[str, dict[str, float]]  # the sample with the most USS while the models served
    throughput_rps: dict[str, float]  # per model, its load run's (a check that it served)
    variant: str = ""  # the `detserve tune` variant its composing models ran with ("": as built)

    @property
    def label(self) -> str:
        """The layout as the tables name it: a variant's row must not read as the built configs' (before: it did)."""
        return f"{self.layout} ({self.variant})" if self.variant else self.layout

    def uss_mb(self, when: str) -> float:
        return float(sum(v["uss_mb"] for v in (self.rest if when == "rest" else self.load).values()))

    def stubs(self) -> int:
        return int(sum(v["processes"] for role, v in self.rest.items() if role.startswith("stub ")))


def model_dirs(repository: Path, model: str) -> list[str]:
    """The folders that serve ``model``: the ensemble and its composing models, or the fused model alone."""
    from detserve.ops.versions import composing
    from detserve.tritonconfig import read_config

    if not read_config(repository / model).HasField("ensemble_scheduling"):
        return [model]
    return [model, *composing(model, repository)]


def subset_repository(src: Path, dst: Path, models: Sequence[str]) -> Path:
    """``dst`` holding ``models`` of ``src`` only (files hard-linked: no copy of the ONNX files)."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for model in models:
        for name in model_dirs(src, model):
            if not (dst / name).exists():  # a pre-processing model shared by several ensembles comes once
                shutil.copytree(src / name, dst / name, copy_function=_link)
    return dst


def share_preprocessing(repository: Path, models: Sequence[str]) -> dict[str, str]:
    """Each ensemble of ``models`` (in order) pointed at an earlier one's pre-processing model where their
    configs are equal, its own removed: what ``detserve build --share-preprocessing`` builds, done here to the
    copy of a repository built without it (converters/shared_preprocess.py: the same rule, the same pin).
    A repository built with the option is measured as it is. Returns {dropped model: the one used instead}."""
    from converters.shared_preprocess import reshare

    shared = {}
    for i, model in enumerate(models):
        done = reshare(repository, model, owners=models[:i])
        if done is not None:
            shared[f"{model}_preprocess"] = done["model"]
    return shared


def edit_composing(repository: Path, models: Sequence[str], mutate: Any) -> None:
    """Apply a ``tune`` variant's mutation (role, ModelConfig) to the composing models of ``models``."""
    from detserve.tritonconfig import read_config, render
    from loadtest.tune import step_roles

    for model in models:
        for step, role in step_roles(model, repository).items():
            config = read_config(repository / step)
            mutate(role, config)
            path = repository / step / "config.pbtxt"
            path.unlink()  # a hard link to the source repository's file: never write through it
            path.write_text(render(config))


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system: copy
        shutil.copy2(src, dst)


def server_rows(server: Any) -> list[ProcessMemory]:
    return memory_table(server.process.pid) if server.process else []


class PeakSampler:
    """Samples the server's memory every ``interval_s`` in a thread; keeps the sample with the most USS."""

    def __init__(self, server: Any, interval_s: float = 1.0) -> None:
        self.server = server
        self.interval_s = interval_s
        self.peak: list[ProcessMemory] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def sample(self) -> None:
        rows = server_rows(self.server)
        if sum(r.uss_mb for r in rows) > sum(r.uss_mb for r in self.peak):
            self.peak = rows

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def measure_set(repository: Path, layout: str, models: Sequence[str], out_dir: Path, users: int, duration_s: float) -> MemoryRow:
    """Serve ``repository`` (holding ``models``), read memory at rest, then under each model's load in turn."""
    from detserve.ops.server import running_server
    from loadtest.runner import LoadTestConfig, run_loadtest

    throughput = {}
    with running_server(repository) as server:
        rest = memory_by_role(server_rows(server))
        with PeakSampler(server) as sampler:
            for model in models:
                cfg = LoadTestConfig(
                    grpc_url=server.options.grpc_url,
                    model=model,
                    out_dir=out_dir / f"{layout}-{len(models)}-{model}",
                    users=users,
                    duration_s=duration_s,
                    warmup_requests=4,
                )
                throughput[model] = run_loadtest(cfg).report.throughput_rps
        load = memory_by_role(sampler.peak)
    return MemoryRow(layout, tuple(models), rest, load, throughput)


def run_memory(
    layouts: dict[str, Path],
    models: Sequence[str],
    out_dir: Path,
    echo: Callable[[str], None],
    counts: Sequence[int] = (1, 2, 4),
    users: int = 8,
    duration_s: float = 10.0,
    mutate: Any = None,
    variant: str = "",
) -> list[MemoryRow]:
    """The memory table's rows: per layout (name -> repository) and count N, the first N ``models``
    (their composing configs edited by ``mutate``, the mutation of the ``tune`` variant named ``variant``, when given;
    the fused layout has no composing models and is measured as built)."""
    rows = []
    for layout, repository in layouts.items():
        for n in counts:
            chosen = list(models[:n])
            echo(f"  {layout}: {', '.join(chosen)}")
            # a plain folder name: the python backend misreads a model path with spaces or commas
            slug = "".join(c if c.isalnum() else "-" for c in layout)
            repo = subset_repository(repository, out_dir / f"repo-{slug}-{n}", chosen)
            if mutate is not None and layout != "fused":
                edit_composing(repo, chosen, mutate)
            if layout == SHARED:
                share_preprocessing(repo, chosen)
            try:
                row = measure_set(repo, layout, chosen, out_dir / "runs", users, duration_s)
                rows.append(replace(row, variant=variant) if mutate is not None and layout != "fused" else row)
                with (out_dir / "rows.jsonl").open("a") as f:  # what a long run measured survives its failure
                    f.write(json.dumps(asdict(rows[-1])) + "\n")
            finally:
                shutil.rmtree(repo, ignore_errors=True)
    return rows


def per_additional_mb(rows: Sequence[MemoryRow], layout: str, when: str) -> float | None:
    """USS each model past the first adds: the slope between the smallest and the largest count."""
    mine = sorted((r for r in rows if r.layout == layout), key=lambda r: len(r.models))
    if len(mine) < 2 or len(mine[-1].models) == len(mine[0].models):
        return None
    first, last = mine[0], mine[-1]
    return (last.uss_mb(when) - first.uss_mb(when)) / (len(last.models) - len(first.models))


def render_memory(rows: Sequence[MemoryRow]) -> str:
    lines = [
        "| layout | models | python stubs | USS at rest MB | USS under load MB | tritonserver USS (load) MB | req/s per model |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        server = r.load.get("tritonserver", {}).get("uss_mb", 0.0)
        rps = ", ".join(f"{m} {v:.1f}" for m, v in r.throughput_rps.items())
        lines.append(
            f"| {r.label} | {len(r.models)} | {r.stubs()} | {r.uss_mb('rest'):.0f} | {r.uss_mb('load'):.0f} | {server:.0f} | {rps} |"
        )
    lines.append("")
    for layout, label in dict.fromkeys((r.layout, r.label) for r in rows):
        rest, load = per_additional_mb(rows, layout, "rest"), per_additional_mb(rows, layout, "load")
        if rest is not None and load is not None:
            lines.append(f"- {label}: each additional model {rest:.0f} MB USS at rest, {load:.0f} MB under load")
    return "\n".join(lines)


def render_roles(rows: Sequence[MemoryRow]) -> str:
    """Per row, USS by role (rest / load): where the memory is."""
    lines = ["| layout | models | role | processes | USS rest MB | USS load MB |", "|---|---|---|---|---|---|"]
    for r in rows:
        for role in sorted(set(r.rest) | set(r.load)):
            rest, load = r.rest.get(role, {}), r.load.get(role, {})
            lines.append(
                f"| {r.label} | {len(r.models)} | {role} | {int(rest.get('processes', load.get('processes', 0)))} | "
                f"{rest.get('uss_mb', 0.0):.0f} | {load.get('uss_mb', 0.0):.0f} |"
            )
    return "\n".join(lines)


def memory_and_report(
    repository: Path,
    models: Sequence[str],
    out_dir: Path,
    echo: Callable[[str], None],
    fused_repository: Path | None = None,
    share: bool = False,
    users: int = 8,
    duration_s: float = 10.0,
    variant: str | None = None,
) -> str:
    """``detserve memory``: the table for ``models`` of ``repository`` (and of ``fused_repository``,
    and with one pre-processing model per spec when ``share``), written to ``memory.md`` / ``memory.json``;
    ``variant``: a ``detserve tune`` variant's name, applied to every ensemble's composing models first."""
    from detserve.errors import DetserveError
    from loadtest.tune import variant_named

    mutate = variant_named(variant).mutate if variant else None

    if fused_repository is not None:  # before: found missing only after the whole ensemble layout was measured
        missing = [m for m in models if not (fused_repository / m / "config.pbtxt").is_file()]
        if missing:
            raise DetserveError(
                f"--fused {fused_repository}: no fused layout of {', '.join(missing)} (no <model>/config.pbtxt)",
                hint="write them with `detserve build ... --fused-out DIR` or `detserve fuse --out DIR`",
            )
    layouts = {"ensemble": repository}
    if share:
        layouts[SHARED] = repository
    if fused_repository is not None:
        layouts["fused"] = fused_repository
    counts = sorted({n for n in (1, 2, 4) if n < len(models)} | {len(models)})
    rows = run_memory(layouts, models, out_dir, echo, counts, users, duration_s, mutate, variant or "")
    table = render_memory(rows) + "\n\n" + render_roles(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "memory.md").write_text(table + "\n")
    (out_dir / "memory.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return table
