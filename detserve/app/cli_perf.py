"""``detserve`` commands that measure: loadtest, bench, bench-stream, tune, memory, fuse, stages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from detserve.app.cli_base import app, load_window, seconds, terminate_as_interrupt, user_errors
from detserve.errors import DetserveError


@app.command()
@user_errors
def loadtest(
    model: Annotated[str, typer.Option(help="ensemble name")],
    url: Annotated[str, typer.Option(help="gRPC HOST:PORT")] = "127.0.0.1:8001",
    users: Annotated[int, typer.Option(help="concurrent users (closed loop)")] = 8,
    duration: Annotated[str, typer.Option(help="e.g. 60s, 2m (fixed and step shapes)")] = "60s",
    shape: Annotated[str, typer.Option(help="fixed | step | sweep")] = "fixed",
    step: Annotated[str, typer.Option(help="time per step of the step/sweep shapes")] = "10s",
    sweep: Annotated[str, typer.Option(help="concurrency levels of the sweep shape")] = "1,2,4,8,16",
    images: Annotated[Path | None, typer.Option(help="folder of images (default: sample photographs)")] = None,
    score_threshold: Annotated[float | None, typer.Option(help="sent with every request")] = None,
    max_det: Annotated[int | None, typer.Option(help="sent with every request")] = None,
    out: Annotated[Path, typer.Option(help="report folder")] = Path("out/loadtest"),
) -> None:
    """Load-test a served ensemble with Locust over gRPC; writes Locust's CSV/HTML and our report."""
    from loadtest.runner import LoadTestConfig, run_loadtest

    try:
        levels = tuple(int(v) for v in sweep.split(",") if v.strip())
    except ValueError as e:
        raise DetserveError(f"--sweep must be comma-separated integers, got {sweep!r}") from e
    cfg = LoadTestConfig(
        grpc_url=url, model=model, out_dir=out, users=users, duration_s=seconds(duration), shape=shape,
        step_s=seconds(step), sweep=levels, images=images, score_threshold=score_threshold, max_det=max_det,
    )  # fmt: skip
    result = run_loadtest(cfg)
    typer.echo((out / "report.md").read_text())
    typer.echo(f"report: {', '.join(str(p) for p in result.files.values())}")


@app.command()
@user_errors
def bench(
    repository: Annotated[
        Path, typer.Option(help="repository holding the model (built with the demo detector if missing)")
    ] = Path("out/bench/model_repository"),
    model: Annotated[str, typer.Option(help="ensemble name")] = "demo",
    users: Annotated[int, typer.Option(help="concurrent users for every served/Flask run")] = 16,
    duration: Annotated[str, typer.Option(help="length of each run")] = "20s",
    out: Annotated[Path, typer.Option(help="results folder")] = Path("out/bench"),
    torch_core: Annotated[
        bool, typer.Option(help="also serve the model with torch cores (python-torch) beside ONNX Runtime's, ratio printed")
    ] = False,
    peers: Annotated[
        bool, typer.Option(help="also Ray Serve, LitServe and BentoML on the same pipeline (extra 'peers'; adds minutes)")
    ] = False,
) -> None:
    """Served ensemble vs in-process limit, Flask + eager PyTorch, no dynamic batching and the fused CPU layout;
    prints the ratios with the load generator's CPU accounted for, CPU per process and hop, memory per process."""
    terminate_as_interrupt()
    from loadtest.bench import BenchConfig, run_bench

    cfg = BenchConfig(
        repository=repository, model=model, out_dir=out, users=users, duration_s=load_window(users, duration), torch_core=torch_core,
        peers=peers,
    )  # fmt: skip
    run_bench(cfg, typer.echo)
    typer.echo((out / "bench.md").read_text())


# the stream counts are written as `--streams 1 2 4`: click options take one value, so the counts after the first
# arrive as extra arguments
@app.command("bench-stream", context_settings={"allow_extra_args": True})
@user_errors
def bench_stream(
    ctx: typer.Context,
    repository: Annotated[Path, typer.Option(help="repository holding the demo detector (built there if missing)")] = Path(
        "out/bench-stream/model_repository"
    ),
    streams: Annotated[list[int], typer.Option(help="stream counts, one run each: --streams 1 2 4 8 16")] = [1, 2, 4, 8, 16],  # noqa: B006
    seconds: Annotated[float, typer.Option(help="measured seconds per run")] = 30.0,
    transport: Annotated[str, typer.Option(help="jpeg | raw (the stream client's --transport)")] = "jpeg",
    out: Annotated[Path, typer.Option(help="results folder")] = Path("out/bench-stream"),
) -> None:
    """N live 25 FPS 640x480 streams through `detserve stream` beside the single-image capacity, same server:
    per-stream and total FPS, drops, latency p50/p99, average batch, CPU per frame, the issue's targets."""
    terminate_as_interrupt()
    from loadtest.bench_stream import run_bench_stream

    try:
        counts = [*streams, *(int(v) for v in ctx.args)]
    except ValueError as e:
        raise DetserveError(f"--streams takes stream counts, got extra arguments {ctx.args}") from e
    if not counts or min(counts) < 1:
        raise DetserveError(f"--streams must be positive counts, got {counts}")
    from detserve.video.sender import TRANSPORTS

    if transport not in TRANSPORTS:  # before: found by the first stream, after the build and the capacity run
        raise DetserveError(f"--transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    typer.echo(run_bench_stream(repository, counts, seconds, out, typer.echo, transport))


@app.command()
@user_errors
def tune(
    repository: Annotated[Path, typer.Option(help="repository holding the model")],
    model: Annotated[str, typer.Option(help="ensemble name")],
    users: Annotated[int, typer.Option(help="concurrent users")] = 16,
    duration: Annotated[str, typer.Option(help="length of each run")] = "15s",
    out: Annotated[Path, typer.Option(help="results folder")] = Path("out/tune"),
    ort_threads: Annotated[bool, typer.Option(help="only onnxruntime's thread counts (1..cores) against as built")] = False,
    apply: Annotated[bool, typer.Option(help="write the fastest variant into the repository's configs")] = False,
    limit: Annotated[bool, typer.Option(help="measure the in-process limit first; each variant against it")] = False,
    profile: Annotated[str, typer.Option(help="also per-step queue/compute at these user counts, e.g. 1,2,4,8,16,32")] = "",
) -> None:
    """Serve scheduling variants (instances, batching delay, ORT threads) in turn; prints a comparison table."""
    terminate_as_interrupt()
    from loadtest.tune import tune_and_report

    try:
        levels = tuple(int(n) for n in profile.split(",") if n.strip())
    except ValueError:
        levels = None
    if levels is None or any(n < 1 for n in levels):  # refused before any server starts
        raise DetserveError(f"--profile must be comma-separated user counts of 1 or more, got {profile!r}", hint="e.g. 1,2,4,8")
    window = load_window(users, duration)
    typer.echo(tune_and_report(repository, model, out, users, window, typer.echo, ort_threads, apply, limit, levels))


@app.command()
@user_errors
def memory(
    repository: Annotated[Path, typer.Option(help="repository holding the built ensembles")],
    model: Annotated[list[str], typer.Option(help="ensemble name (repeatable; served 1, 2, 4 ... at a time, in order)")],
    fused: Annotated[Path | None, typer.Option(help="repository holding their fused layouts (build --fused-out)")] = None,
    share_preprocessing: Annotated[bool, typer.Option(help="also with one pre-processing model per spec")] = False,
    variant: Annotated[str, typer.Option(help="a `detserve tune` variant applied to the composing models")] = "",
    users: Annotated[int, typer.Option(help="concurrent users of each model's load run")] = 8,
    duration: Annotated[str, typer.Option(help="length of each model's load run")] = "10s",
    out: Annotated[Path, typer.Option(help="results folder")] = Path("out/memory"),
) -> None:
    """USS of the server (tritonserver + every python stub) with 1, 2, 4 ... models loaded, at rest and under load."""
    terminate_as_interrupt()
    from loadtest.memory import memory_and_report

    table = memory_and_report(
        repository, model, out, typer.echo, fused, share_preprocessing, users, load_window(users, duration), variant or None
    )
    typer.echo(table)


@app.command()
@user_errors
def fuse(
    repository: Annotated[Path, typer.Option(help="repository holding the built ensemble")],
    model: Annotated[str, typer.Option(help="ensemble name")],
    out: Annotated[Path, typer.Option(help="repository to write the fused model into (served under the same name)")],
    instances: Annotated[int, typer.Option(help="fused model instances (0: one per core)")] = 0,
    ort_threads: Annotated[int, typer.Option(help="onnxruntime threads per instance (0: cores / instances)")] = 0,
) -> None:
    """The fused CPU layout of a built model, any family: its whole served chain (pre-processing and every declared step)
    in one python model. Not for a TensorRT build: the fused model runs the cores in onnxruntime."""
    from converters.fused import FusedOptions, fused_repository

    dst = fused_repository(repository, out, model, FusedOptions(instances=instances, intra_op_threads=ort_threads))
    typer.echo(f"wrote {dst / model} (serve it with: detserve serve --repository {dst})")


@app.command()
@user_errors
def stages(
    detector: Annotated[list[str], typer.Option(help="detector (repeatable; default: one or two per family)")] = [],  # noqa: B006
    repeat: Annotated[int, typer.Option(help="timed runs per image and stage")] = 5,
    best: Annotated[bool, typer.Option(help="report the minimum of the runs, not the median (a shared machine)")] = False,
    torch_threads: Annotated[int, typer.Option(help="torch intra-op threads for preprocess/decode (0: torch's default)")] = 0,
) -> None:
    """CPU ms per pipeline stage (preprocess, core in ONNX Runtime, decode) per family, in this process."""
    from loadtest.stages import DEFAULT_DETECTORS, stage_table

    # refused before the models are built: else a traceback after the timing (no median of 0 runs, torch's own
    # "set_num_threads expects a positive integer")
    if repeat < 1:
        raise DetserveError(f"--repeat must be at least 1, got {repeat}")
    if torch_threads < 0:
        raise DetserveError(f"--torch-threads must be 0 (torch's default) or more, got {torch_threads}")
    # every detector asked for, with its default test keywords where it has some (a mix of default and
    # other detectors used to drop the others)
    defaults = dict(DEFAULT_DETECTORS)
    chosen = [(d, defaults.get(d, {})) for d in detector] if detector else list(DEFAULT_DETECTORS)
    typer.echo(stage_table(chosen, typer.echo, repeat, best, torch_threads or None))
