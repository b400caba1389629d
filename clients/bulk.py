"""The bulk client: a folder of images through the live server, as fast as the server allows.

Bounded concurrency (``max_in_flight`` requests at once), retries with backoff on transient errors
(a restarting server, a model reloading), a progress bar, and one clear error per file that cannot
be read or decoded — the run goes on and every other file still gets its result.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from clients.grpc_client import Detections, DetectorClient
from detserve.errors import ClientError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class BulkResult:
    path: Path
    detections: Detections | None
    error: str | None = None


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (by suffix), sorted by name."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def expand_image_paths(paths: list[Path]) -> list[Path]:
    """Files as given, a directory as its image files (sorted); a clear error for what is neither."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise ClientError(f"no image files in directory {path}", hint=f"images end in {', '.join(IMAGE_SUFFIXES)}")
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise ClientError(f"image not found: {path} (neither a file nor a directory)")
    return out


def detect_paths(
    url: str,
    model: str,
    paths: Sequence[Path],
    *,
    max_in_flight: int = 8,
    retries: int = 3,
    backoff_s: float = 0.2,
    timeout_s: float = 60.0,
    score_threshold: float | None = None,
    max_det: int | None = None,
    progress: bool = True,
    on_result: Callable[[BulkResult], None] | None = None,
) -> list[BulkResult]:
    """Detections for every path, in the order given. Never raises for one bad file."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    local = threading.local()
    clients: list[DetectorClient] = []
    lock = threading.Lock()

    def client() -> DetectorClient:
        # one channel per worker thread: requests on one channel queue behind each other's bytes
        if not hasattr(local, "client"):
            local.client = DetectorClient(url, model, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s)
            with lock:
                clients.append(local.client)
        return local.client

    def one(path: Path) -> BulkResult:
        try:
            blob = path.read_bytes()
        except OSError as e:
            return BulkResult(path, None, f"cannot read {path}: {e.strerror or e}")
        try:
            det = client().detect(blob, score_threshold=score_threshold, max_det=max_det)
        except Exception as e:  # ClientError from the server (bad image), or a transport error after retries
            return BulkResult(path, None, str(e))
        return BulkResult(path, det)

    results: list[BulkResult | None] = [None] * len(paths)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with (
            Progress(*columns, disable=not progress, transient=False) as bar,
            ThreadPoolExecutor(max_in_flight, thread_name_prefix="bulk") as pool,
        ):
            task = bar.add_task(f"{model} @ {url}", total=len(paths))
            futures = {pool.submit(one, p): i for i, p in enumerate(paths)}
            for fut in as_completed(futures):
                res = fut.result()
                results[futures[fut]] = res
                if on_result is not None:
                    on_result(res)
                bar.advance(task)
    finally:
        for c in clients:
            c.close()
    return [r for r in results if r is not None]
