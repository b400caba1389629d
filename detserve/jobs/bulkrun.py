"""``detserve run``: a folder tree through the live server into a resumable results file.

The file list is streamed (``clients.bulk.walk_image_files``), requests are bounded by
``max_in_flight`` (``clients.bulk.iter_detections``, which also retries transient errors with
backoff), each result is appended as one line as soon as it arrives. A rerun reads which paths the
file already holds and sends only the others, so a run killed at any moment resumes with every image
processed exactly once. Files the server refuses (empty, truncated, not an image, too large) are
written as failure lines with the reason and not sent again; transient failures that outlived every
retry are not written, so the next run tries them again.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clients.bulk import BulkResult, iter_detections, walk_image_files
from detserve.errors import DetserveError
from detserve.jobs.results import ResultWriter, RunInfo, read_records, repair_tail, sidecar


@dataclass(frozen=True)
class RunOptions:
    images: Path
    model: str
    results: Path
    url: str = "127.0.0.1:8001"
    max_in_flight: int = 8
    # 0.2 s doubling: 3 retries wait 1.4 s in all; 8 wait 51 s, past a server restart (the demo's: 22 s on 2 cores).
    # Not the default: nothing stops the run when the server is gone for good, so each remaining image would wait
    # the whole backoff (1 000 images, 8 in flight: ~1.8 h instead of ~3 min before the run lists them for a rerun)
    retries: int = 3
    backoff_s: float = 0.2
    timeout_s: float = 60.0
    score_threshold: float | None = 0.05
    max_det: int | None = 100
    class_names: dict[int, str] = field(default_factory=dict)
    class_source: str = "none"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise DetserveError(f"--max-in-flight must be >= 1, got {self.max_in_flight}")
        if self.retries < 0:  # before: accepted and run as 0 (no retry), not what was typed
            raise DetserveError(f"--retries must be at least 0, got {self.retries}")
        if not self.images.is_dir():
            raise DetserveError(f"image folder not found: {self.images}")


@dataclass
class RunSummary:
    """What one invocation did (``already_done``: lines the results file held before it started)."""

    results: Path
    already_done: int = 0
    processed: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # path -> reason, written as failure lines
    transient: dict[str, str] = field(default_factory=dict)  # path -> reason, not written: the next run retries
    detections: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    model_version: str = ""

    @property
    def throughput(self) -> float:
        """Images answered (results and refusals) per second of this invocation."""
        return (self.processed + len(self.failed)) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "results": str(self.results), "already_done": self.already_done, "processed": self.processed,
            "failed": self.failed, "transient": self.transient, "detections_per_class": dict(self.detections.most_common()),
            "elapsed_s": round(self.elapsed_s, 3), "images_per_s": round(self.throughput, 2), "model_version": self.model_version,
        }  # fmt: skip

    def lines(self) -> list[str]:
        out = [
            f"results: {self.results} ({self.already_done} already done before this run)",
            f"images: {self.processed} detected, {len(self.failed)} unreadable, {len(self.transient)} to retry "
            f"in {self.elapsed_s:.1f} s ({self.throughput:.1f} images/s)",
        ]
        if self.detections:
            out.append("detections: " + ", ".join(f"{name} {n}" for name, n in self.detections.most_common()))
        out += [f"  unreadable {path}: {reason}" for path, reason in list(self.failed.items())[:20]]
        out += [f"  retry later {path}: {reason}" for path, reason in list(self.transient.items())[:20]]
        return out


def run_bulk(opts: RunOptions, echo: Callable[[str], None] = lambda _: None) -> RunSummary:
    """Detect every image under ``opts.images`` not yet in ``opts.results``; append one line per image."""
    from clients.grpc_client import DetectorClient

    images = opts.images.resolve()
    with DetectorClient(opts.url, opts.model) as client:
        client.check_ready()
        version = _served_version(client)
    info = RunInfo(
        str(images), opts.model, opts.url, opts.class_names, opts.class_source, opts.score_threshold, opts.max_det,
        extra={"model_version": version},
    )  # fmt: skip
    done = _resume_state(opts.results, info, echo)
    summary = RunSummary(opts.results, already_done=len(done), model_version=version)
    total = sum(1 for _ in walk_image_files(images))  # a count only: the list itself is streamed below
    todo = (p for p in walk_image_files(images) if _relative(p, images) not in done)
    stream = iter_detections(
        opts.url, opts.model, todo, max_in_flight=opts.max_in_flight, retries=opts.retries, backoff_s=opts.backoff_s,
        timeout_s=opts.timeout_s, score_threshold=opts.score_threshold, max_det=opts.max_det,
    )  # fmt: skip
    started = time.monotonic()
    with ResultWriter(opts.results) as writer, _progress(opts.progress) as bar:
        task = bar.add_task(f"{opts.model} v{version}", total=max(total - len(done), 0))
        for result in (r for _, r in stream):
            record_result(result, images, info, writer, summary)
            bar.advance(task)
    summary.elapsed_s = time.monotonic() - started
    return summary


def record_result(result: BulkResult, root: Path, info: RunInfo, writer: ResultWriter, summary: RunSummary) -> None:
    """One result into the file and the summary; a transient failure is only counted (retried next run)."""
    rel = _relative(result.path, root)
    if result.transient:
        summary.transient[rel] = result.error or "?"
        return
    base: dict[str, Any] = {
        "path": rel,
        "bytes": result.nbytes,
        "model": info.model,
        "model_version": info.extra["model_version"],
    }
    if result.detections is None:
        summary.failed[rel] = result.error or "?"
        writer.write({**base, "error": result.error})
        return
    width, height = _image_size(result.path)
    dets = result.detections
    detections: list[dict[str, Any]] = [
        {"label": int(label), "class": info.class_name(int(label)), "score": round(float(score), 5),
         "box": [round(float(v), 2) for v in box]}
        for box, score, label in zip(dets.boxes, dets.scores, dets.labels, strict=True)
    ]  # fmt: skip
    writer.write({**base, "width": width, "height": height, "detections": detections})
    summary.processed += 1
    summary.detections.update(str(d["class"]) for d in detections)


def _resume_state(results: Path, info: RunInfo, echo: Callable[[str], None]) -> set[str]:
    """Paths already in the results file (after cutting a half-written last line); refuses another run's file."""
    if not results.exists():
        results.parent.mkdir(parents=True, exist_ok=True)
        sidecar(results).write_text(_json(info.to_dict()))
        return set()
    if sidecar(results).is_file():
        before = RunInfo.read(results)
        if (before.images, before.model) != (info.images, info.model):
            raise DetserveError(
                f"{results} holds results of model {before.model!r} on {before.images}, not {info.model!r} on {info.images}",
                hint="give another --out, or remove that file to start over",
            )
        if before.extra.get("model_version") != info.extra["model_version"]:
            echo(
                f"note: {results} was started with version {before.extra.get('model_version')}; now serving {info.extra['model_version']}"
            )
    cut = repair_tail(results)
    if cut:
        echo(f"resuming: cut a half-written last line ({cut} bytes) from {results}")
    sidecar(results).write_text(_json(info.to_dict()))
    return {str(r["path"]) for r in read_records(results)}


def _served_version(client: Any) -> str:
    """The composing models' version (what a promote changes); the ensemble's own version stays 1."""
    from detserve.pipeline import CORE, model_name

    try:
        versions = client.loaded_versions(model_name(client.model, CORE))
    except DetserveError:
        versions = []
    if not versions:  # not a detserve ensemble: its own version
        versions = client.loaded_versions()
    return ",".join(sorted(versions, key=lambda v: int(v) if v.isdigit() else 0))


def _image_size(path: Path) -> tuple[int | None, int | None]:
    """(width, height) from the header only (Pillow reads no pixels before ``load``); None if the file changed since."""
    from PIL import Image

    from detserve.runtime.imaging import ACCEPTED_FORMATS

    try:
        with Image.open(path, formats=ACCEPTED_FORMATS) as im:
            return im.size
    except (OSError, ValueError):
        return None, None


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _json(data: dict[str, Any]) -> str:
    import json

    return json.dumps(data, indent=2) + "\n"


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(f"{task.speed or 0.0:.1f} img/s")

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(), TimeRemainingColumn())
    return Progress(*columns, disable=not enabled, transient=False)
