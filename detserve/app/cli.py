"""The ``detserve`` command: thin commands that parse, call one library function and print."""

from __future__ import annotations

import functools
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from detserve.errors import DetserveError
from detserve.ops.gate import DEFAULT_MAX_REQUEST_BYTES

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Serve PyTorch object detectors on Triton.")
F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(fn: F) -> F:
    """A DetserveError is the user's to fix: message + hint, exit 1, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DetserveError as e:
            typer.secho(f"error: {e.message}", fg=typer.colors.RED, err=True)
            if e.hint:
                typer.echo(f"hint: {e.hint}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@_user_errors
def build(
    detector: Annotated[
        str,
        typer.Argument(
            help="e.g. ssdlite320_mobilenet_v3_large, fcos_resnet50_fpn, yolov8n, yolo11s; 'yolo' with --checkpoint best.pt"
        ),
    ],
    repository: Annotated[Path, typer.Option(help="model repository directory")] = Path("model_repository"),
    name: Annotated[str | None, typer.Option(help="ensemble name (default: the detector's)")] = None,
    num_classes: Annotated[
        int | None,
        typer.Option(help="classes (torchvision: including background; default 91; YOLO: 80, or the checkpoint's)"),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="torchvision: a state dict, loaded with weights_only=True; YOLO: an ultralytics best.pt (pickled: trusted files only)"
        ),
    ] = None,
    version: Annotated[int, typer.Option(help="version directory to write")] = 1,
    target: Annotated[str, typer.Option(help="python-onnxruntime | onnxruntime | tensorrt")] = "python-onnxruntime",
    kw: Annotated[list[str], typer.Option(help="model keyword KEY=VALUE (repeatable), e.g. min_size=320")] = [],  # noqa: B006
    max_batch_size: Annotated[int, typer.Option(help="dynamic batching limit")] = 8,
    max_image_pixels: Annotated[int | None, typer.Option(help="refuse larger images before decoding")] = None,
    max_request_pixels: Annotated[
        int | None, typer.Option(help="refuse requests whose images declare more pixels in all (default 64 M)")
    ] = None,
    verify: Annotated[bool, typer.Option(help="check ONNX Runtime against PyTorch")] = True,
    spread_init_seed: Annotated[
        int | None, typer.Option(help="test fixture: untrained heads re-initialised so scores spread over 0..1")
    ] = None,
    precision: Annotated[str, typer.Option(help="tensorrt engine precision: fp32 | fp16 | int8")] = "fp32",
    calibration_images: Annotated[
        Path | None, typer.Option(help="tensorrt int8: folder of representative images to calibrate on")
    ] = None,
    postprocess_on_gpu: Annotated[
        bool, typer.Option(help="tensorrt: post-processing instances on the GPU, reading the core's outputs there")
    ] = False,
    fused_out: Annotated[
        Path | None, typer.Option(help="also write the fused CPU layout (one python model) into this repository")
    ] = None,
) -> None:
    """Convert a detector and write its Triton models (preprocess, core, postprocess, ensemble)."""
    from converters.repository import BuildRequest, build_repository
    from detserve.kwargs import parse_model_kwargs
    from detserve.tritonconfig import ServingOptions

    req = BuildRequest(
        detector=detector,
        repository=repository,
        name=name,
        num_classes=num_classes,
        checkpoint=checkpoint,
        version=version,
        target=target,
        model_kwargs=parse_model_kwargs(kw),
        options=ServingOptions(max_batch_size=max_batch_size, postprocess_on_gpu=postprocess_on_gpu),
        max_image_pixels=max_image_pixels,
        max_request_pixels=max_request_pixels,
        verify=verify,
        spread_init_seed=spread_init_seed,
        precision=precision,
        calibration_images=calibration_images,
        fused_out=fused_out,
    )
    started = time.monotonic()
    result = build_repository(req)
    typer.echo(f"built {result.name} version {result.version} in {result.repository} ({time.monotonic() - started:.1f} s)")
    for role, core in result.record["verification"].items():  # "core"; a multi-step family: each core step
        if role == "ok" or not core:
            continue
        # the engine: "tensorrt"; a multi-step family's engines: "tensorrt_<core step>"
        pair = (
            f"tensorrt {result.record['precision']} vs onnxruntime" if role.startswith("tensorrt") else "onnxruntime vs PyTorch"
        )
        info = " (information: judged by detections)" if core.get("judged_by") == "detections" else ""
        for out in core["outputs"]:
            typer.echo(f"  verified {out['name']}: max abs {out['max_abs']:.2e}, max rel {out['max_rel']:.2e} ({pair}){info}")
        if (d := core.get("detections")) is not None:
            typer.echo(
                f"  verified detections: {d['matched']}/{d['reference']} matched on {d['images']} images, "
                f"max |dscore| {d['max_score_delta']:.2e}, max box d {d['max_box_delta']:.2e} px ({pair})"
            )


@app.command()
@_user_errors
def serve(
    repository: Annotated[Path, typer.Option(help="model repository directory")] = Path("model_repository"),
    host: Annotated[str, typer.Option(help="address the gate listens on (gRPC, HTTP) and metrics")] = "127.0.0.1",
    grpc_port: int = 8001,
    http_port: int = 8000,
    metrics_port: int = 8002,
    metrics_host: Annotated[
        str | None, typer.Option(help="address of Triton's metrics (default: loopback, whatever --host is)")
    ] = None,
    log_file: Annotated[Path | None, typer.Option(help="Triton's log (default: a temp file)")] = None,
    replicas: Annotated[int, typer.Option(help="N > 1: N servers behind the gate, which balances between them")] = 1,
    max_request_bytes: Annotated[
        int, typer.Option(help="larger requests are refused by the gate before Triton sees them (RESOURCE_EXHAUSTED)")
    ] = DEFAULT_MAX_REQUEST_BYTES,
    max_request_pixels: Annotated[
        int | None,
        typer.Option(min=1, help="pixels per request, summed over its images (default: each model's build value, 64 M)"),
    ] = None,
    tritonserver: Annotated[Path | None, typer.Option(help="a tritonserver binary (default: nvidia-pytriton's)")] = None,
    backend_directory: Annotated[Path | None, typer.Option(help="its backends (with --tritonserver)")] = None,
    triton_arg: Annotated[
        list[str], typer.Option(help="an extra tritonserver flag (repeatable), e.g. --triton-arg=--log-verbose=1")
    ] = [],  # noqa: B006
) -> None:
    """Start Triton behind the gate; Ctrl-C or SIGTERM stops it (in-flight requests drain).

    A tritonserver or gate (nginx) that dies is restarted, readiness false meanwhile.

    The admin key is read from DETSERVE_ADMIN_KEY_FILE (a 0600 file) or DETSERVE_ADMIN_KEY, never
    from the command line; without one the admin APIs are closed.
    """
    from detserve.ops.admin import admin_key
    from detserve.ops.server import ServerOptions
    from detserve.ops.supervisor import serve_until_stopped

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    options = ServerOptions(
        repository,
        host,
        grpc_port,
        http_port,
        metrics_port,
        log_file,
        admin_key=admin_key(),
        max_request_bytes=max_request_bytes,
        metrics_host=metrics_host,
        max_request_pixels=max_request_pixels,
        tritonserver=tritonserver,
        backend_directory=backend_directory,
        extra_args=list(triton_arg),
    )
    serve_until_stopped(options, replicas, typer.echo)


@app.command()
@_user_errors
def detect(
    images: Annotated[list[Path], typer.Argument(help="image files, or directories of them")],
    model: Annotated[str, typer.Option(help="ensemble name")],
    url: Annotated[str, typer.Option(help="gRPC HOST:PORT")] = "127.0.0.1:8001",
    score_threshold: Annotated[float | None, typer.Option(help="per request; default: the model's")] = None,
    iou_threshold: Annotated[float | None, typer.Option(help="NMS IoU, per request")] = None,
    max_det: Annotated[int | None, typer.Option(help="max detections per image")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    draw: Annotated[Path | None, typer.Option(help="save annotated images here")] = None,
) -> None:
    """Send images to a served detector over gRPC and print their detections."""
    from clients.bulk import expand_image_paths
    from clients.draw import draw_detections, prepare_directory
    from clients.grpc_client import DetectorClient

    images = expand_image_paths(images)
    if draw is not None:
        prepare_directory(draw)  # before any request: a bad --draw is the user's to fix, not a traceback at the end
    blobs = [path.read_bytes() for path in images]
    with DetectorClient(url, model) as client:
        client.check_ready()
        results = client.detect_many(blobs, score_threshold, iou_threshold, max_det)
    failed = 0
    report: list[dict[str, Any]] = []
    for path, blob, res in zip(images, blobs, results, strict=True):
        if isinstance(res, DetserveError):
            failed += 1
            report.append({"image": str(path), "error": res.message})
            continue
        report.append({"image": str(path), "num_detections": len(res), **res.to_dict()})
        if draw is not None:
            draw_detections(blob, res, draw / f"{path.stem}.png")
    _print_detections(report, as_json)
    if failed:
        raise typer.Exit(1)


def _print_detections(report: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for item in report:
        if "error" in item:
            typer.secho(f"{item['image']}: error: {item['error']}", fg=typer.colors.RED, err=True)
            continue
        typer.echo(f"{item['image']}: {item['num_detections']} detections")
        for box, score, label in list(zip(item["boxes"], item["scores"], item["labels"], strict=True))[:10]:
            typer.echo(f"  label {label:>3}  score {score:.3f}  box {box}")
        if item["num_detections"] > 10:
            typer.echo(f"  ... {item['num_detections'] - 10} more")


@app.command()
@_user_errors
def samples(out: Annotated[Path, typer.Argument(help="directory to write sample photographs to")]) -> None:
    """Write real sample photographs (from scikit-image) of several sizes, one grey, as JPEG/PNG."""
    from detserve.runtime.samples import write_samples

    for path in write_samples(out):
        typer.echo(str(path))


@app.command()
@_user_errors
def demo(
    repository: Annotated[Path, typer.Option(help="model repository to build into")] = Path("model_repository"),
    out: Annotated[Path, typer.Option(help="where sample and annotated images go")] = Path("out/demo"),
) -> None:
    """Build the demo detector, serve it on loopback, detect over gRPC and print the results."""
    from detserve.app.demo import run_demo

    result = run_demo(repository, out, typer.echo)
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    typer.echo(f"done: {timings}")


def _seconds(text: str) -> float:
    """'60s', '2m', '90' -> seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    try:
        return float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError as e:
        raise DetserveError(f"not a duration: {text!r}", hint="e.g. 30s, 2m") from e


@app.command()
@_user_errors
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
        grpc_url=url, model=model, out_dir=out, users=users, duration_s=_seconds(duration), shape=shape,
        step_s=_seconds(step), sweep=levels, images=images, score_threshold=score_threshold, max_det=max_det,
    )  # fmt: skip
    result = run_loadtest(cfg)
    typer.echo((out / "report.md").read_text())
    typer.echo(f"report: {', '.join(str(p) for p in result.files.values())}")


@app.command()
@_user_errors
def bench(
    repository: Annotated[
        Path, typer.Option(help="repository holding the model (built with the demo detector if missing)")
    ] = Path("out/bench/model_repository"),
    model: Annotated[str, typer.Option(help="ensemble name")] = "demo",
    users: Annotated[int, typer.Option(help="concurrent users for every served/Flask run")] = 16,
    duration: Annotated[str, typer.Option(help="length of each run")] = "20s",
    out: Annotated[Path, typer.Option(help="results folder")] = Path("out/bench"),
) -> None:
    """Served ensemble vs in-process limit, Flask + eager PyTorch, no dynamic batching and the fused CPU layout;
    prints the ratios with the load generator's CPU accounted for, CPU per process and hop, memory per process."""
    from loadtest.bench import BenchConfig, run_bench

    cfg = BenchConfig(repository=repository, model=model, out_dir=out, users=users, duration_s=_seconds(duration))
    run_bench(cfg, typer.echo)
    typer.echo((out / "bench.md").read_text())


@app.command()
@_user_errors
def tune(
    repository: Annotated[Path, typer.Option(help="repository holding the model")],
    model: Annotated[str, typer.Option(help="ensemble name")],
    users: Annotated[int, typer.Option(help="concurrent users")] = 16,
    duration: Annotated[str, typer.Option(help="length of each run")] = "15s",
    out: Annotated[Path, typer.Option(help="results folder")] = Path("out/tune"),
    ort_threads: Annotated[bool, typer.Option(help="only onnxruntime's thread counts (1..cores) against as built")] = False,
    apply: Annotated[bool, typer.Option(help="write the fastest variant into the repository's configs")] = False,
) -> None:
    """Serve scheduling variants (instances, batching delay, ORT threads) in turn; prints a comparison table."""
    from loadtest.tune import tune_and_report

    typer.echo(tune_and_report(repository, model, out, users, _seconds(duration), typer.echo, ort_threads, apply))


@app.command()
@_user_errors
def fuse(
    repository: Annotated[Path, typer.Option(help="repository holding the built ensemble")],
    model: Annotated[str, typer.Option(help="ensemble name")],
    out: Annotated[Path, typer.Option(help="repository to write the fused model into (served under the same name)")],
    instances: Annotated[int, typer.Option(help="fused model instances (0: one per core)")] = 0,
    ort_threads: Annotated[int, typer.Option(help="onnxruntime threads per instance (0: cores / instances)")] = 0,
) -> None:
    """The fused CPU layout of a built model: pre-processing + core + post-processing in one python model."""
    from converters.fused import FusedOptions, fused_repository

    dst = fused_repository(repository, out, model, FusedOptions(instances=instances, intra_op_threads=ort_threads))
    typer.echo(f"wrote {dst / model} (serve it with: detserve serve --repository {dst})")


@app.command()
@_user_errors
def stages(
    detector: Annotated[list[str], typer.Option(help="detector (repeatable; default: one or two per family)")] = [],  # noqa: B006
    repeat: Annotated[int, typer.Option(help="timed runs per image and stage")] = 5,
    best: Annotated[bool, typer.Option(help="report the minimum of the runs, not the median (a shared machine)")] = False,
    torch_threads: Annotated[int, typer.Option(help="torch intra-op threads for preprocess/decode (0: torch's default)")] = 0,
) -> None:
    """CPU ms per pipeline stage (preprocess, core in ONNX Runtime, decode) per family, in this process."""
    from loadtest.stages import DEFAULT_DETECTORS, stage_table

    # every detector asked for, with its default test keywords where it has some (a mix of default and
    # other detectors used to drop the others)
    defaults = dict(DEFAULT_DETECTORS)
    chosen = [(d, defaults.get(d, {})) for d in detector] if detector else list(DEFAULT_DETECTORS)
    typer.echo(stage_table(chosen, typer.echo, repeat, best, torch_threads or None))


models_app = typer.Typer(no_args_is_help=True, help="List, load and unload the models of a running server.")
app.add_typer(models_app, name="models")
_URL = Annotated[str, typer.Option(help="gRPC HOST:PORT")]


@models_app.command("list")
@_user_errors
def models_list(
    url: _URL = "127.0.0.1:8001",
    repository: Annotated[Path | None, typer.Option(help="repository directory: adds each version's build record")] = None,
) -> None:
    """Each model version and its state (repository index with the admin key, else readiness per model)."""
    from detserve.ops.admin import admin_key
    from detserve.ops.status import list_models

    rows = list_models(url, admin_key(), repository)
    if not rows:
        typer.echo("no models")
    for row in rows:
        reason = f" ({row.reason})" if row.reason else ""
        typer.echo(f"{row.name:<32} version {row.version or '-':<4} {row.state}{reason}")
        b = row.build
        if b is not None:
            verified = {True: "ok", False: "FAILED", None: "not run"}[b.verified]
            typer.echo(
                f"    {b.detector}, weights {b.weights}, checkpoint sha256 {b.checkpoint_sha256 or '-'}, "
                f"{b.precision}, verification {verified}, built {b.built_at}"
            )


def _admin_call(action: str, name: str, url: str) -> None:
    from detserve.ops.admin import ModelAdmin, admin_key

    with ModelAdmin(url, admin_key()) as admin:
        getattr(admin, f"{action}_model")(name)


@models_app.command("load")
@_user_errors
def models_load(name: Annotated[str, typer.Argument(help="model name")], url: _URL = "127.0.0.1:8001") -> None:
    """Load (or reload) a model from the server's repository; needs DETSERVE_ADMIN_KEY."""
    _admin_call("load", name, url)
    typer.echo(f"loaded {name}")


@models_app.command("unload")
@_user_errors
def models_unload(name: Annotated[str, typer.Argument(help="model name")], url: _URL = "127.0.0.1:8001") -> None:
    """Unload a model (in-flight requests finish first); needs DETSERVE_ADMIN_KEY."""
    _admin_call("unload", name, url)
    typer.echo(f"unloaded {name}")


@app.command()
@_user_errors
def promote(
    name: Annotated[str, typer.Argument(help="ensemble name")],
    version: Annotated[int, typer.Option(help="version of the composing models to serve")],
    force: Annotated[bool, typer.Option(help="serve it even though its build record says verification failed")] = False,
    repository: Annotated[Path, typer.Option(help="the server's model repository")] = Path("model_repository"),
    url: _URL = "127.0.0.1:8001",
) -> None:
    """Switch a running ensemble to another version without dropping a request; needs DETSERVE_ADMIN_KEY."""
    from detserve.ops.admin import admin_key
    from detserve.ops.versions import promote as do_promote

    r = do_promote(url, admin_key(), repository, name, version, force, on_step=typer.echo)
    typer.echo(f"{name}: serving version {r.new} (was {r.old}){' (forced)' if r.forced else ''}")


@app.command()
@_user_errors
def rollback(
    name: Annotated[str, typer.Argument(help="ensemble name")],
    repository: Annotated[Path, typer.Option(help="the server's model repository")] = Path("model_repository"),
    url: _URL = "127.0.0.1:8001",
) -> None:
    """Serve the version the last promote came from (rollout.json); needs DETSERVE_ADMIN_KEY."""
    from detserve.ops.admin import admin_key
    from detserve.ops.versions import rollback as do_rollback

    r = do_rollback(url, admin_key(), repository, name, on_step=typer.echo)
    typer.echo(f"{name}: serving version {r.new} (was {r.old})")


@app.command()
@_user_errors
def status(
    url: _URL = "127.0.0.1:8001",
    metrics_url: Annotated[str, typer.Option(help="Triton's Prometheus endpoint")] = "http://127.0.0.1:8002/metrics",
) -> None:
    """Readiness of the server and each model, with Triton's counters per model since it loaded."""
    from detserve.ops.status import server_status

    st = server_status(url, metrics_url)
    typer.echo(f"server {st.url}: live {'yes' if st.live else 'no'}, ready {'yes' if st.ready else 'no'}")
    if st.not_ready_reason:
        typer.echo(f"  {st.not_ready_reason}")
    typer.echo(
        f"{'model':<32} {'ver':>3} {'ready':>5} {'ok':>8} {'failed':>7} {'queue ms':>9} {'compute ms':>10} {'batch':>6} {'pending':>7}"
    )
    for m in st.models:
        pending = "-" if m.pending is None else str(m.pending)
        typer.echo(
            f"{m.name:<32} {m.version:>3} {'yes' if m.ready else 'no':>5} {m.requests:>8} {m.failures:>7} "
            f"{m.queue_ms:>9.2f} {m.compute_ms:>10.2f} {m.avg_batch_size:>6.2f} {pending:>7}"
        )
    if st.metrics_error:
        typer.echo(f"pending requests unavailable: {st.metrics_error}", err=True)


@app.command("eval")
@_user_errors
def eval_(
    model: Annotated[str, typer.Option(help="ensemble name")],
    annotations: Annotated[Path, typer.Option(help="COCO annotation file (instances JSON)")],
    images: Annotated[Path, typer.Option(help="folder holding the annotation file's images")],
    url: _URL = "127.0.0.1:8001",
    repository: Annotated[Path, typer.Option(help="the served repository (for the PyTorch reference)")] = Path(
        "model_repository"
    ),
    max_det: Annotated[int, typer.Option(help="detections per image counted: 100, 500 or 5000")] = 100,
    max_in_flight: Annotated[int, typer.Option(help="concurrent requests of the bulk client")] = 8,
    pytorch: Annotated[bool, typer.Option(help="also score in-process PyTorch and print the difference")] = True,
    out: Annotated[Path, typer.Option(help="report directory (JSON + markdown)")] = Path("out/eval"),
    progress: Annotated[bool, typer.Option(help="progress bar")] = True,
) -> None:
    """COCO mAP of the live endpoint (no score threshold) beside in-process PyTorch; exit 1 past 0.1 point."""
    from detserve.verification.evalrun import MAX_DET_CHOICES, run_eval, write_report

    if max_det not in MAX_DET_CHOICES:
        raise DetserveError(f"--max-det must be one of {', '.join(map(str, MAX_DET_CHOICES))}, got {max_det}")
    report = run_eval(url, model, annotations, images, repository, max_det, max_in_flight, pytorch, progress, typer.echo)
    paths = write_report(report, out)
    typer.echo(report.markdown())
    typer.echo(f"report: {paths['markdown']} {paths['json']}")
    if report.within_tolerance is False:
        raise typer.Exit(1)


@app.command()
@_user_errors
def compare(
    model: Annotated[str, typer.Option(help="ensemble name")],
    images: Annotated[list[Path], typer.Argument(help="image files, or one folder")],
    repository: Annotated[Path, typer.Option(help="the model's repository")] = Path("model_repository"),
    url: Annotated[str | None, typer.Option(help="live endpoint gRPC HOST:PORT (omit: in-process sides only)")] = None,
    score_threshold: Annotated[float, typer.Option(help="lowest score kept on every side")] = 0.0,
    score_tol: Annotated[float, typer.Option(help="largest high-score |Δscore| that still agrees")] = 1e-3,
    limit: Annotated[int, typer.Option(help="at most this many images from a folder")] = 32,
    out: Annotated[Path, typer.Option(help="report directory (markdown, HTML, JSON)")] = Path("out/compare"),
    require_tensorrt: Annotated[bool, typer.Option(help="fail when the TensorRT side cannot run (GPU checks)")] = False,
) -> None:
    """Detection-level diff: PyTorch vs ONNX Runtime vs the live endpoint (and TensorRT); exit 1 on high-score disagreement."""
    from clients.bulk import image_files
    from loadtest.compare import run_compare, write_report

    if len(images) == 1 and images[0].is_dir():
        images = image_files(images[0])[:limit]
    missing = [str(p) for p in images if not p.is_file()]
    if missing or not images:
        raise DetserveError(f"image(s) not found: {', '.join(missing) or '(none given)'}")
    report = run_compare(repository, model, images, url, score_threshold, score_tol, echo=typer.echo)
    paths = write_report(report, out)
    typer.echo(report.markdown())
    typer.echo(f"report: {paths['markdown']} {paths['html']} {paths['json']}")
    if report.problems:
        raise typer.Exit(1)
    if require_tensorrt and "tensorrt" in report.skipped:
        raise DetserveError(f"TensorRT side not compared: {report.skipped['tensorrt']}")


@app.command()
@_user_errors
def dataset(
    split: Annotated[str, typer.Argument(help="train | val | test")],
    out: Annotated[Path, typer.Argument(help="directory: images/ + annotations.json")],
    limit: Annotated[int | None, typer.Option(help="only the first N images of the split")] = None,
) -> None:
    """Write a split of the generated shapes dataset (the demo detector's data) as PNG + COCO JSON."""
    from training.synthetic import SPLITS, write_split

    if split not in SPLITS:
        raise DetserveError(f"unknown split {split!r}", hint=f"choose one of: {', '.join(SPLITS)}")
    path = write_split(SPLITS[split], out, limit)
    typer.echo(str(path))


@app.command("run")
@_user_errors
def run_(
    model: Annotated[str, typer.Option(help="ensemble name")],
    images: Annotated[Path, typer.Option(help="folder of images (searched at any depth)")],
    out: Annotated[Path, typer.Option(help="results file (JSON Lines); a rerun resumes it")],
    url: _URL = "127.0.0.1:8001",
    max_in_flight: Annotated[int, typer.Option(help="concurrent requests")] = 8,
    score_threshold: Annotated[float | None, typer.Option(help="lowest score kept (mining wants low ones)")] = 0.05,
    max_det: Annotated[int | None, typer.Option(help="max detections per image")] = 100,
    retries: Annotated[int, typer.Option(help="retries of a transient failure, with exponential backoff")] = 3,
    classes: Annotated[str | None, typer.Option(help="class names: 'a,b,c' or a file, entry i names label i")] = None,
    repository: Annotated[Path | None, typer.Option(help="the model's repository: class names from its spec")] = None,
    progress: Annotated[bool, typer.Option(help="progress bar")] = True,
) -> None:
    """Detect every image under a folder into a resumable JSONL results file; prints a summary."""
    from detserve.jobs.bulkrun import RunOptions, run_bulk
    from detserve.jobs.classes import class_names

    names, source = class_names(model, classes, repository)
    opts = RunOptions(
        images=images, model=model, results=out, url=url, max_in_flight=max_in_flight, retries=retries,
        score_threshold=score_threshold, max_det=max_det, class_names=names, class_source=source, progress=progress,
    )  # fmt: skip
    summary = run_bulk(opts, typer.echo)
    for line in summary.lines():
        typer.echo(line)
    if summary.transient:
        typer.secho(f"{len(summary.transient)} image(s) not answered: run the same command again to retry them", err=True)
        raise typer.Exit(1)


@app.command()
@_user_errors
def mine(
    results: Annotated[Path, typer.Option(help="results file of `detserve run` (may still be running)")],
    out: Annotated[Path, typer.Option(help="folder for the picked images and manifest.jsonl")],
    band: Annotated[list[str], typer.Option(help="[CLASS:]LO-HI: a class's best score in the band (repeatable)")] = [],  # noqa: B006
    empty: Annotated[bool, typer.Option("--empty", help="images with no detection above --min-score")] = False,
    more_than: Annotated[int | None, typer.Option(help="images with more than N detections above --min-score")] = None,
    overlap: Annotated[list[str], typer.Option(help="A,B[:IOU]: a class-A box overlapping a class-B box (repeatable)")] = [],  # noqa: B006
    min_score: Annotated[float, typer.Option(help="score at which a detection counts as an object")] = 0.3,
    limit: Annotated[int | None, typer.Option(help="keep at most N picked images (a seeded sample)")] = None,
    seed: Annotated[int, typer.Option(help="sample seed")] = 0,
    mode: Annotated[str, typer.Option(help="copy | symlink | hardlink")] = "copy",
    images: Annotated[Path | None, typer.Option(help="the image folder, if it moved since the run")] = None,
) -> None:
    """Pick images from results by rules (score band, empty, crowded, overlapping classes) for review."""
    from detserve.jobs.mining import Empty, MoreThan, Rule, parse_band, parse_overlap
    from detserve.jobs.mining import mine as do_mine

    rules: list[Rule] = [*map(parse_band, band), *map(parse_overlap, overlap)]
    rules += [Empty()] if empty else []
    rules += [MoreThan(more_than)] if more_than is not None else []
    s = do_mine(results, out, rules, min_score=min_score, limit=limit, seed=seed, mode=mode, images=images)
    by_rule = ", ".join(f"{k} {v}" for k, v in sorted(s.by_rule.items())) or "none"
    typer.echo(f"scanned {s.scanned} results, {s.matched} matched ({by_rule}), picked {s.picked} into {out}")
    typer.echo(f"manifest: {s.manifest}")


@app.command()
@_user_errors
def prelabel(
    results: Annotated[Path, typer.Option(help="results file of `detserve run`")],
    out: Annotated[Path, typer.Option(help="output folder")],
    format_: Annotated[str, typer.Option("--format", help="coco | yolo | labelstudio")] = "coco",
    threshold: Annotated[
        list[str], typer.Option(help="CLASS=SCORE per class, or SCORE for the rest (repeatable; default 0.5)")
    ] = [],  # noqa: B006
    classes: Annotated[str | None, typer.Option(help="class names 'a,b,c' or a file (default: the run's)")] = None,
    image_prefix: Annotated[str, typer.Option(help="Label Studio: prefix of each task's image path")] = "/data/local-files/?d=",
    audit: Annotated[int, typer.Option(help="also pick N images for blind re-annotation (audit.txt, audit-tasks.json)")] = 0,
    seed: Annotated[int, typer.Option(help="audit sample seed")] = 0,
) -> None:
    """Results as annotation-tool imports (COCO JSON, YOLO txt, Label Studio tasks) with per-class thresholds."""
    from detserve.jobs.classes import parse_classes
    from detserve.jobs.prelabel import parse_thresholds
    from detserve.jobs.prelabel import prelabel as do_prelabel

    names = parse_classes(classes) if classes is not None else None
    s = do_prelabel(
        results, out, format_, parse_thresholds(threshold), class_names=names, image_prefix=image_prefix, audit=audit, seed=seed
    )
    typer.echo(f"{s.images} images, {s.boxes} boxes ({s.skipped_failures} failure lines skipped)")
    for path in s.files:
        typer.echo(f"wrote {path}")


@app.command("check-images")
@_user_errors
def check_images_(
    folder: Annotated[Path, typer.Argument(help="folder to check (any depth)")],
    max_pixels: Annotated[int, typer.Option(help="the server's limit (a repository's --max-image-pixels)")] = 40_000_000,
    min_side: Annotated[int, typer.Option(help="flag images with a side below this many pixels")] = 32,
    near_duplicates: Annotated[bool, typer.Option(help="also flag near-duplicates by a perceptual hash")] = False,
    phash_distance: Annotated[int, typer.Option(help="near-duplicate: differing bits of the 64-bit hash")] = 4,
    all_files: Annotated[bool, typer.Option(help="check every file, not only image suffixes")] = False,
    move_to: Annotated[Path | None, typer.Option(help="move broken files and duplicate copies here (never deletes)")] = None,
    report: Annotated[Path | None, typer.Option(help="write the full report as JSON")] = None,
) -> None:
    """Empty, truncated, undecodable, unlisted-format, bomb, small and duplicate files, by the server's decoder; exit 1 on broken ones left."""
    from detserve.jobs.imagecheck import MOVED_KINDS, check_images

    r = check_images(
        folder, max_pixels=max_pixels, min_side=min_side, near_duplicates=near_duplicates, phash_distance=phash_distance,
        all_files=all_files, move_to=move_to,
    )  # fmt: skip
    for p in r.problems:
        typer.echo(f"{p.kind:<16} {p.path}: {p.detail}")
    counts = ", ".join(f"{k} {v}" for k, v in sorted(r.counts.items())) or "no problems"
    typer.echo(f"checked {r.checked} files: {counts}")
    if r.manifest is not None:
        typer.echo(f"moved {len(r.moved)} file(s) to {move_to} (manifest {r.manifest})")
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(r.to_dict(), indent=2) + "\n")
    if r.broken and not r.moved:
        typer.secho(f"{r.broken} broken or duplicate file(s) ({', '.join(MOVED_KINDS)})", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


@app.command("ops-report")
@_user_errors
def ops_report(
    work: Annotated[Path, typer.Option(help="work directory: small repositories built once, one copy per scenario")] = Path(
        "out/ops/work"
    ),
    out: Annotated[Path, typer.Option(help="where ops-report.md and ops-report.json go")] = Path("out/ops"),
    users: Annotated[int, typer.Option(help="concurrent clients held during each fault")] = 4,
    duration: Annotated[str, typer.Option(help="load per scenario, e.g. 10s")] = "10s",
    soak: Annotated[
        str | None, typer.Option(help="instead: a soak of this length (e.g. 30m) on `detserve serve`, faults on a schedule")
    ] = None,
) -> None:
    """Inject each fault and bad input with traffic flowing and count lost requests (must be 0); exit 1 if any was lost."""
    from loadtest.opsreport import run_ops_report

    if soak is not None:
        _soak(work, out, users, _seconds(soak))
        return
    md, lost = run_ops_report(work, out, typer.echo, users=users, duration_s=_seconds(duration))
    typer.echo(md.read_text())
    if lost:
        typer.secho(f"{lost} request(s) lost", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


def _soak(work: Path, out: Path, users: int, seconds: float) -> None:
    from loadtest.soak import run_soak

    md, problems = run_soak(work, out, seconds, users=users, echo=typer.echo)
    typer.echo(md.read_text())
    if problems:
        typer.secho("soak failed:\n" + "\n".join(f"- {p}" for p in problems), fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
