"""The bulk client: a folder of images through the live server, as fast as the server allows.

Bounded concurrency (``max_in_flight`` requests at once), retries with backoff on transient errors
(a restarting server, a model reloading), a progress bar, and one clear error per file that cannot
be read or decoded — the run goes on and every other file still gets its result.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from clients.grpc_client import Detections, DetectorClient, is_retryable
from detserve.errors import ClientError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class BulkResult:
    path: Path
    detections: Detections | None
    error: str | None = None
    nbytes: int = 0  # the file's size, as read
    # the failure was the server's or the network's (retries exhausted), not the file's: worth another try later
    transient: bool = False


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (by suffix), sorted by name."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def walk_image_files(root: Path) -> Iterator[Path]:
    """Image files under ``root`` at any depth, streamed: one directory's entries in memory at a time.

    Deterministic order (names sorted within each directory, files before subdirectories), so two
    runs over the same tree visit files in the same order. Symlinked directories are not followed
    (a link loop would never end).
    """
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue  # an unreadable subdirectory: its files cannot be listed, the rest still can
        subdirs = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(Path(entry.path))
            elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                yield Path(entry.path)
        stack.extend(reversed(subdirs))


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


def iter_detections(
    url: str,
    model: str,
    paths: Iterable[Path],
    *,
    max_in_flight: int = 8,
    retries: int = 3,
    backoff_s: float = 0.2,
    timeout_s: float = 60.0,
    score_threshold: float | None = None,
    max_det: int | None = None,
) -> Iterator[tuple[int, BulkResult]]:
    """(position in ``paths``, result) as each finishes; at most ``max_in_flight`` files read and in flight.

    ``paths`` is consumed lazily, so a generator over millions of files is never held whole.
    Never raises for one bad file: its result carries the error (``transient`` when the server or
    the network failed after every retry, rather than the file).
    """
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
            cause = e.__cause__ if isinstance(e, ClientError) and e.__cause__ is not None else e
            return BulkResult(path, None, str(e), len(blob), transient=is_retryable(cause))
        return BulkResult(path, det, nbytes=len(blob))

    pending: dict[Future[BulkResult], int] = {}
    try:
        with ThreadPoolExecutor(max_in_flight, thread_name_prefix="bulk") as pool:
            for index, path in enumerate(paths):
                if len(pending) >= max_in_flight:
                    yield from _drain(pending, FIRST_COMPLETED)
                pending[pool.submit(one, path)] = index
            while pending:
                yield from _drain(pending, FIRST_COMPLETED)
    finally:
        for fut in pending:
            fut.cancel()
        for c in clients:
            c.close()


def _drain(pending: dict[Future[BulkResult], int], return_when: str) -> Iterator[tuple[int, BulkResult]]:
    done, _ = wait(pending, return_when=return_when)
    for fut in done:
        yield pending.pop(fut), fut.result()


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

    results: list[BulkResult | None] = [None] * len(paths)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    stream = iter_detections(
        url, model, paths, max_in_flight=max_in_flight, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s,
        score_threshold=score_threshold, max_det=max_det,
    )  # fmt: skip
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(f"{model} @ {url}", total=len(paths))
        for index, res in stream:
            results[index] = res
            if on_result is not None:
                on_result(res)
            bar.advance(task)
    return [r for r in results if r is not None]
