"""What every ops-report scenario (and the soak) is built from: the traffic, its accounting, the setup.

``ClientLoad`` keeps ``users`` gRPC clients sending while a scenario injects its fault; ``Tally``
sorts what they saw into three columns: ok; failed or rejected *as expected* (a bad input's error,
a request refused before any work was done); or LOST. ``Setup`` holds the small ssdlite
repositories the scenarios copy (built once) and the photos the clients send; a scenario returns
a ``Row``. The scenarios: ``opsreport_scenarios.py``, ``opsreport_hardening.py``.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detserve.errors import DetserveError
from detserve.pipeline import CORE, DEFAULT_ROLES, model_name

MODEL = "ssdlite"
DETECTOR = "ssdlite320_mobilenet_v3_large"
ROLES = ("", *(f"_{r}" for r in DEFAULT_ROLES))  # the ensemble's directory and its steps' (pipeline.py)
KEY = "ops-report-admin-key-0123456789"

# Refused before any work was done: clear, fast, safe to retry elsewhere.
REJECTED = (
    "request for unknown model",  # the ensemble is unloaded (drain) or not loaded
    "has no available versions",
    "is not ready",
    "failed to connect to all addresses",  # the server is not there (stopped, restarting)
    "connection refused",
    "exceeds maximum queue size",  # overload: the bounded queue is full
)

Echo = Callable[[str], None]


@dataclass(frozen=True)
class Call:
    """One request as the client saw it (monotonic seconds)."""

    start: float
    end: float
    error: str | None = None
    expected_error: bool = False  # a bad input: its error is the right answer


def is_rejection(error: str) -> bool:
    text = error.lower()
    return any(marker in text for marker in REJECTED)


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    expected: int = 0  # failed or rejected as expected
    lost: int = 0
    lost_errors: list[str] = field(default_factory=list)
    expected_errors: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, calls: list[Call], rejections_expected: bool = False) -> Tally:
        t = cls(sent=len(calls))
        for c in calls:
            if c.error is None:
                t.ok += 1  # (a bad input answered: its notes say so; nothing was lost)
            elif (c.expected_error and c.error is not None) or (
                c.error is not None and rejections_expected and is_rejection(c.error)
            ):
                t.expected += 1
                t.expected_errors.append(c.error)
            else:
                t.lost += 1
                t.lost_errors.append(c.error)
        return t


class ClientLoad:
    """``users`` threads, each with its own gRPC client, sending one image after another until stopped.

    ``stop_on_rejection``: a user stops after its first rejection (the server is going away; it
    would otherwise spin on refused connections).
    """

    def __init__(
        self,
        url: str,
        images: list[bytes],
        users: int = 4,
        retries: int = 0,
        stop_on_rejection: bool = False,
        model: str = MODEL,
        timeout_s: float = 120.0,
    ) -> None:
        self.url, self.images, self.users, self.retries = url, images, users, retries
        self.stop_on_rejection, self.model, self.timeout_s = stop_on_rejection, model, timeout_s
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._user, args=(i,), daemon=True) for i in range(users)]

    def _user(self, index: int) -> None:
        from clients.grpc_client import DetectorClient

        with DetectorClient(self.url, self.model, timeout_s=self.timeout_s, retries=self.retries) as client:
            n = index
            while not self._stop.is_set():
                image = self.images[n % len(self.images)]
                n += 1
                t0 = time.monotonic()
                error = None
                try:
                    client.detect(image)
                except Exception as e:
                    error = str(e)
                with self._lock:
                    self.calls.append(Call(t0, time.monotonic(), error))
                if error is not None and self.stop_on_rejection and is_rejection(error):
                    return

    def completed(self) -> int:
        with self._lock:
            return len(self.calls)

    def wait_for(self, n: int, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.completed() < n:
            if time.monotonic() > deadline:
                raise DetserveError(f"the load made {self.completed()} of {n} requests in {timeout_s:.0f} s")
            time.sleep(0.05)

    def __enter__(self) -> ClientLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout_s + 10)


@dataclass
class Row:
    scenario: str
    users: int
    seconds: float
    fault: str
    tally: Tally
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        t = self.tally
        return {
            "scenario": self.scenario,
            "load": {"users": self.users, "seconds": round(self.seconds, 1), "requests": t.sent},
            "fault": self.fault,
            "sent": t.sent,
            "ok": t.ok,
            "failed_or_rejected_expected": t.expected,
            "lost": t.lost,
            "lost_errors": sorted(set(t.lost_errors))[:5],
            "expected_errors": sorted({e[:160] for e in t.expected_errors})[:5],
            "notes": self.notes,
        }


@dataclass(frozen=True)
class Setup:
    """The repositories the scenarios copy, and the photos the clients send."""

    base: Path  # ssdlite version 1, Triton's default version policy
    rollout: Path  # the same plus a version 2 from other weights (for promote/rollback)
    images: list[bytes]
    work: Path
    users: int
    duration_s: float


def ensure_repositories(repository: Path, echo: Echo) -> tuple[Path, Path]:
    """``<repository>/base`` (version 1) and ``<repository>/rollout`` (versions 1 and 2), built once (~20 s each)."""
    from converters.repository import build_repository

    base, rollout = repository / "base", repository / "rollout"
    if not (base / MODEL / "config.pbtxt").is_file():
        echo(f"building {MODEL} version 1 into {base}")
        shutil.rmtree(base, ignore_errors=True)
        build_repository(build_request(base, 1, seed=0))
    if not (rollout / model_name(MODEL, CORE) / "2").is_dir():
        echo(f"building {MODEL} version 2 into {rollout}")
        shutil.rmtree(rollout, ignore_errors=True)
        shutil.copytree(base, rollout)
        build_repository(build_request(rollout, 2, seed=1))
    return base, rollout


def build_request(repo: Path, version: int, seed: int) -> Any:
    from converters.repository import BuildRequest

    return BuildRequest(
        detector=DETECTOR, repository=repo, name=MODEL, num_classes=5, version=version,
        max_image_pixels=20_000_000, spread_init_seed=seed,
    )  # fmt: skip


def copy_repository(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


@contextlib.contextmanager
def scenario_server(repo: Path, key: bool = False, **options: Any) -> Iterator[Any]:
    from detserve.ops.server import running_server

    with running_server(repo, admin_key=KEY if key else None, **options) as server:
        yield server


def hold(load: ClientLoad, seconds: float) -> float:
    t0 = time.monotonic()
    time.sleep(seconds)
    return time.monotonic() - t0


def stub_pids(server: Any, model: str) -> list[int]:
    """This server's stubs of ``model`` (its children only: other servers run the same model)."""
    out = subprocess.run(
        ["pgrep", "-P", str(server.process.pid), "-f", f"triton_python_backend_stub.*/{model}/"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return [int(p) for p in out.stdout.split()]
