"""The ``detserve`` command: thin commands that parse, call one library function and print.

The commands live in four modules by what they are for (this one: build, serve, detect, samples, demo;
``cli_ops``, ``cli_jobs``, ``cli_perf``), all on the one Typer ``app`` of ``cli_base``.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from detserve.app.cli_base import app, terminate_as_interrupt, user_errors
from detserve.errors import DetserveError
from detserve.ops.gate import DEFAULT_MAX_REQUEST_BYTES


@app.command()
@user_errors
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
    target: Annotated[
        str, typer.Option(help="python-onnxruntime | onnxruntime | tensorrt | python-torch (torch.export core run by torch)")
    ] = "python-onnxruntime",
    device: Annotated[str, typer.Option(help="cpu | gpu: python-torch only, every step on the GPU (KIND_GPU)")] = "cpu",
    frames_input: Annotated[
        bool, typer.Option(help="the FRAMES input (raw pixels, for video); off: IMAGE alone, as the HTTP raw-body shortcut needs")
    ] = True,
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
    random_weights: Annotated[
        bool,
        typer.Option(help="build without --checkpoint: untrained random weights (tests, smoke checks; detections meaningless)"),
    ] = False,
    config: Annotated[
        Path | None, typer.Option(help="mmdet: the model's config file (mmdet's own .py), with the detector 'mmdet'")
    ] = None,
    share_preprocessing: Annotated[
        bool,
        typer.Option(
            help="run another ensemble's pre-processing model when its config equals this one's (one torch stub "
            "fewer); else build its own"
        ),
    ] = False,
) -> None:
    """Convert a detector and write its Triton models (preprocess, core, postprocess, ensemble)."""
    _check_weights(checkpoint, random_weights)
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
        model_kwargs={**parse_model_kwargs(kw), **({"config": str(config)} if config is not None else {})},
        options=ServingOptions(
            max_batch_size=max_batch_size, postprocess_on_gpu=postprocess_on_gpu, device=device, frames_input=frames_input
        ),
        max_image_pixels=max_image_pixels,
        max_request_pixels=max_request_pixels,
        verify=verify,
        spread_init_seed=spread_init_seed,
        precision=precision,
        calibration_images=calibration_images,
        fused_out=fused_out,
        share_preprocessing=share_preprocessing,
    )
    started = time.monotonic()
    result = build_repository(req)
    typer.echo(f"built {result.name} version {result.version} in {result.repository} ({time.monotonic() - started:.1f} s)")
    if shared := result.record.get("shared_preprocessing"):
        typer.echo(f"its pre-processing step is {shared['model']} version {shared['version']} (shared)")
    _print_verification(result.record)


def _check_weights(checkpoint: Path | None, random_weights: bool) -> None:
    """No silent random weights: a detector built without its weights serves
    meaningless detections that look like real ones; only ``build.json`` said so before."""
    if checkpoint is not None:
        if random_weights:
            raise DetserveError("--random-weights and --checkpoint contradict each other", hint="give one of them")
        return
    if not random_weights:
        raise DetserveError(
            "no --checkpoint: the detector would be built with untrained random weights",
            hint="give the trained weights with --checkpoint FILE, or pass --random-weights to build untrained "
            "weights on purpose (tests, smoke checks)",
        )
    typer.secho(
        "warning: building with untrained random weights (--random-weights): its detections are meaningless",
        fg=typer.colors.YELLOW,
        err=True,
    )


def _print_verification(record: dict[str, Any]) -> None:
    """The build's verification lines: per declared output, and by detections where that judged it."""
    if record["verification"].get("ok", True) is None:
        typer.echo("  NOT verified (--no-verify): `detserve promote` refuses this version unless --force")
    for role, core in record["verification"].items():  # "core"; a multi-step family: each core step
        if role == "ok" or not core:
            continue
        # the engine: "tensorrt"; a multi-step family's engines: "tensorrt_<core step>"
        pair = f"tensorrt {record['precision']} vs onnxruntime" if role.startswith("tensorrt") else "onnxruntime vs PyTorch"
        if (artifact := record.get("torch_core", {}).get(role)) is not None:  # --target python-torch
            pair = f"torch {artifact['file']} vs eager"
        info = " (information: judged by detections)" if core.get("judged_by") == "detections" else ""
        for out in core["outputs"]:
            typer.echo(f"  verified {out['name']}: max abs {out['max_abs']:.2e}, max rel {out['max_rel']:.2e} ({pair}){info}")
        if (d := core.get("detections")) is not None:
            typer.echo(
                f"  verified detections: {d['matched']}/{d['reference']} matched on {d['images']} images, "
                f"max |dscore| {d['max_score_delta']:.2e}, max box d {d['max_box_delta']:.2e} px ({pair})"
            )


@app.command()
@user_errors
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
@user_errors
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
    from clients.labels import label_names, name_of

    images = expand_image_paths(images)
    if draw is not None:
        prepare_directory(draw)  # before any request: a bad --draw is the user's to fix, not a traceback at the end
    blobs = [path.read_bytes() for path in images]
    with DetectorClient(url, model) as client:
        client.check_ready()
        results = client.detect_many(blobs, score_threshold, iou_threshold, max_det)
    names = label_names(url, model)  # the build's class names, from the gate (empty: class_<label>)
    failed = 0
    report: list[dict[str, Any]] = []
    for path, blob, res in zip(images, blobs, results, strict=True):
        if isinstance(res, DetserveError):
            failed += 1
            report.append({"image": str(path), "error": res.message})
            continue
        classes = [name_of(names, int(label)) for label in res.labels]
        report.append({"image": str(path), "num_detections": len(res), **res.to_dict(), "classes": classes})
        if draw is not None:
            draw_detections(blob, res, draw / f"{path.stem}.png", names or None)
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
        rows = zip(item["boxes"], item["scores"], item["labels"], item["classes"], strict=True)
        for box, score, label, name in list(rows)[:10]:
            typer.echo(f"  label {label:>3} {name:<16} score {score:.3f}  box {box}")
        if item["num_detections"] > 10:
            typer.echo(f"  ... {item['num_detections'] - 10} more")


@app.command()
@user_errors
def samples(out: Annotated[Path, typer.Argument(help="directory to write sample photographs to")]) -> None:
    """Write real sample photographs (from scikit-image) of several sizes, one grey, as JPEG/PNG."""
    from detserve.runtime.samples import write_samples

    for path in write_samples(out):
        typer.echo(str(path))


@app.command()
@user_errors
def demo(
    repository: Annotated[Path, typer.Option(help="model repository to build into")] = Path("model_repository"),
    out: Annotated[Path, typer.Option(help="where sample and annotated images go")] = Path("out/demo"),
) -> None:
    """Build the demo detector, serve it on loopback, detect over gRPC and print the results."""
    terminate_as_interrupt()
    from detserve.app.demo import run_demo

    result = run_demo(repository, out, typer.echo)
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    typer.echo(f"done: {timings}")


# the other command modules register their commands on ``app`` when imported
from detserve.app import cli_jobs, cli_ops, cli_perf, cli_stream  # noqa: E402, F401


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
