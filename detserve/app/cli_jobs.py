"""``detserve`` commands for data and accuracy: eval, compare, dataset, run, mine, prelabel, check-images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from detserve.app.cli_base import URL, app, user_errors
from detserve.errors import DetserveError


@app.command("eval")
@user_errors
def eval_(
    model: Annotated[str, typer.Option(help="ensemble name")],
    annotations: Annotated[Path, typer.Option(help="COCO annotation file (instances JSON)")],
    images: Annotated[Path, typer.Option(help="folder holding the annotation file's images")],
    url: URL = "127.0.0.1:8001",
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
@user_errors
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
@user_errors
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
@user_errors
def run_(
    model: Annotated[str, typer.Option(help="ensemble name")],
    images: Annotated[Path, typer.Option(help="folder of images (searched at any depth)")],
    out: Annotated[Path, typer.Option(help="results file (JSON Lines); a rerun resumes it")],
    url: URL = "127.0.0.1:8001",
    max_in_flight: Annotated[int, typer.Option(help="concurrent requests")] = 8,
    score_threshold: Annotated[float | None, typer.Option(help="lowest score kept (mining wants low ones)")] = 0.05,
    max_det: Annotated[int | None, typer.Option(help="max detections per image")] = 100,
    retries: Annotated[
        int, typer.Option(help="retries of a transient failure, 0.2 s doubling (3: 1.4 s in all; 8: 51 s, past a server restart)")
    ] = 3,
    classes: Annotated[str | None, typer.Option(help="class names: 'a,b,c' or a file, entry i names label i")] = None,
    repository: Annotated[Path | None, typer.Option(help="the model's repository: class names from its spec")] = None,
    progress: Annotated[bool, typer.Option(help="progress bar")] = True,
) -> None:
    """Detect every image under a folder into a resumable JSONL results file; prints a summary."""
    from detserve.jobs.bulkrun import RunOptions, run_bulk
    from detserve.jobs.classes import class_names

    names, source = class_names(model, classes, repository, url)
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
@user_errors
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
@user_errors
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
@user_errors
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
