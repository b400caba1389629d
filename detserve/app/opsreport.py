"""The ops report: load held, faults injected, bad inputs tried, and how many requests were lost.

``run_ops_report(repository, out, echo)`` builds a small ssdlite repository (untrained heads with a
score spread, the test fixture's recipe) under ``repository`` unless one is there, then runs each
scenario against its own real tritonserver with gRPC clients sending while the fault happens:

- steady load; a python stub killed; the server restarted; a graceful drain (stop under load);
- a rollout to version 2 and a rollback; a broken model and a corrupted version loaded;
- an overload burst past bounded queues; bad inputs (not an image, truncated, empty, a
  decompression bomb, odd modes) mixed into good traffic.

Every request ends in one of three columns: ok; failed/rejected *as expected* (a bad input's
error, a request refused before any work was done: model unloaded for the drain, server not
reachable, queue full); or LOST -- accepted and then failed, or failed for a reason the scenario
does not expect. LOST must be 0. Writes ``ops-report.md`` (a table) and ``ops-report.json``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detserve.errors import DetserveError
from detserve.pipeline import CORE, DEFAULT_ROLES, POSTPROCESS, model_name

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
        build_repository(_build_request(base, 1, seed=0))
    if not (rollout / model_name(MODEL, CORE) / "2").is_dir():
        echo(f"building {MODEL} version 2 into {rollout}")
        shutil.rmtree(rollout, ignore_errors=True)
        shutil.copytree(base, rollout)
        build_repository(_build_request(rollout, 2, seed=1))
    return base, rollout


def _build_request(repo: Path, version: int, seed: int) -> Any:
    from converters.repository import BuildRequest

    return BuildRequest(
        detector=DETECTOR, repository=repo, name=MODEL, num_classes=5, version=version,
        max_image_pixels=20_000_000, spread_init_seed=seed,
    )  # fmt: skip


def _copy(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


@contextlib.contextmanager
def _server(repo: Path, key: bool = False, **options: Any) -> Iterator[Any]:
    from detserve.ops.server import running_server

    with running_server(repo, admin_key=KEY if key else None, **options) as server:
        yield server


def _hold(load: ClientLoad, seconds: float) -> float:
    t0 = time.monotonic()
    time.sleep(seconds)
    return time.monotonic() - t0


def steady(s: Setup) -> Row:
    with _server(_copy(s.base, s.work / "steady")) as server, ClientLoad(server.options.grpc_url, s.images, s.users) as load:
        held = _hold(load, s.duration_s)
    return Row("steady load", s.users, held, "none", Tally.of(load.calls))


def _stub_pids(server: Any, model: str) -> list[int]:
    """This server's stubs of ``model`` (its children only: other servers run the same model)."""
    out = subprocess.run(
        ["pgrep", "-P", str(server.process.pid), "-f", f"triton_python_backend_stub.*/{model}/"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return [int(p) for p in out.stdout.split()]


def stub_killed(s: Setup) -> Row:
    with (
        _server(_copy(s.base, s.work / "stub")) as server,
        ClientLoad(server.options.grpc_url, s.images, s.users, retries=12) as load,
    ):
        time.sleep(s.duration_s / 3)
        pids = _stub_pids(server, model_name(MODEL, POSTPROCESS))
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        held = s.duration_s / 3 + _hold(load, s.duration_s * 2 / 3)
    fault = f"SIGKILL of {len(pids)} post-processing stub(s) mid-load; clients retry transient errors (<= 12, 120 s)"
    restarts = "; ".join(
        f"{r.model} reloaded by the stub watchdog in {r.seconds:.1f} s" + (f" (failed: {r.error})" if r.error else "")
        for r in server.stub_restarts
    )  # Triton 2.51 does not restart a dead stub itself (detserve/ops/watchdog.py)
    return Row("python stub killed", s.users, held, fault, Tally.of(load.calls), restarts or "no stub restart")


def server_restarted(s: Setup) -> Row:
    from detserve.ops.server import TritonServer

    with _server(_copy(s.base, s.work / "restart")) as first:
        opts = first.options
        second = TritonServer(opts)  # same ports
        try:
            with ClientLoad(opts.grpc_url, s.images, s.users, retries=12) as load:
                t0 = time.monotonic()
                load.wait_for(2 * s.users)
                first.stop()
                second.start()
                second.wait_ready()
                load.wait_for(load.completed() + 2 * s.users)
                held = time.monotonic() - t0
        finally:
            second.stop()
    fault = "server stopped (drained) and started again on the same ports; clients retry with backoff"
    return Row("server restarted", s.users, held, fault, Tally.of(load.calls))


def graceful_drain(s: Setup) -> Row:
    users = 3 * s.users
    with _server(_copy(s.base, s.work / "drain")) as server:
        with ClientLoad(server.options.grpc_url, s.images, users, stop_on_rejection=True) as load:
            t0 = time.monotonic()
            load.wait_for(2 * users)
            t_stop = time.monotonic()
            report = server.stop()
        held = time.monotonic() - t0
    in_flight = sum(1 for c in load.calls if c.start < t_stop < c.end)
    drained = "drain skipped" if report is None else f"drain {report.seconds:.1f} s, unloaded {', '.join(report.unloaded)}"
    fault = f"server stopped with {in_flight} requests in flight; requests arriving after the drain began are rejected"
    return Row("graceful drain (stop under load)", users, held, fault, Tally.of(load.calls, rejections_expected=True), drained)


def rollout_and_rollback(s: Setup) -> Row:
    from detserve.ops.versions import promote, rollback

    repo = _copy(s.rollout, s.work / "rollout")
    with _server(repo, key=True) as server:
        url = server.options.grpc_url
        with ClientLoad(url, s.images, s.users) as load:
            t0 = time.monotonic()
            load.wait_for(2 * s.users)
            promote(url, KEY, repo, MODEL, 2)
            load.wait_for(load.completed() + 2 * s.users)
            rollback(url, KEY, repo, MODEL)
            load.wait_for(load.completed() + 2 * s.users)
            held = time.monotonic() - t0
    return Row("rollout + rollback", s.users, held, "promote 1 -> 2, then rollback 2 -> 1, under load", Tally.of(load.calls))


def failed_load(s: Setup) -> Row:
    from detserve.ops.admin import ModelAdmin, ModelLoadError

    repo = _copy(s.base, s.work / "failed-load")
    errors: list[str] = []
    with _server(repo, key=True) as server:
        url = server.options.grpc_url
        with ClientLoad(url, s.images, s.users) as load, ModelAdmin(url, KEY) as admin:
            t0 = time.monotonic()
            load.wait_for(s.users)
            broken = repo / "broken"
            (broken / "1").mkdir(parents=True)
            (broken / "config.pbtxt").write_text('backend: "python"\ninput [{ name: "X" data_type: TYPE_NOPE dims: [1] }]\n')
            shutil.copytree(repo / model_name(MODEL, CORE) / "1", repo / model_name(MODEL, CORE) / "2")
            (repo / model_name(MODEL, CORE) / "2" / "model.onnx").write_bytes(b"not an onnx file")
            for name in ("broken", model_name(MODEL, CORE)):
                try:
                    admin.load_model(name)
                    errors.append(f"{name}: loaded?!")
                except ModelLoadError as e:
                    errors.append(e.message)
            load.wait_for(load.completed() + 2 * s.users)
            held = time.monotonic() - t0
    fault = "a model with a broken config.pbtxt, and a corrupted version 2 of the core, loaded (explicit mode)"
    notes = "both loads refused: " + " | ".join(e[:140] for e in errors)
    return Row("failed model load", s.users, held, fault, Tally.of(load.calls), notes)


BURST = 64
QUEUE = 4


def overload_burst(s: Setup) -> Row:
    from clients.grpc_client import DetectorClient
    from detserve.tritonconfig import read_config, render

    repo = _copy(s.base, s.work / "overload")
    for role in ROLES[1:]:
        config = read_config(repo / f"{MODEL}{role}")
        config.dynamic_batching.default_queue_policy.max_queue_size = QUEUE
        (repo / f"{MODEL}{role}" / "config.pbtxt").write_text(render(config))
    calls: list[Call] = []
    lock = threading.Lock()
    with _server(repo) as server, DetectorClient(server.options.grpc_url, MODEL) as client:
        client.detect(s.images[0])  # warm

        def one(i: int) -> None:
            t0 = time.monotonic()
            error = None
            try:
                client.detect(s.images[i % len(s.images)])
            except Exception as e:
                error = str(e)
            with lock:
                calls.append(Call(t0, time.monotonic(), error))

        t0 = time.monotonic()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(BURST)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        held = time.monotonic() - t0
        client.detect(s.images[1])  # still serving
    fault = f"a burst of {BURST} concurrent requests against queues bounded to {QUEUE} per step"
    return Row("overload burst", BURST, held, fault, Tally.of(calls, rejections_expected=True))


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (width, height), color=(90, 120, 200) if mode == "RGB" else 128).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(side: int = 100_000) -> bytes:
    """A tiny PNG whose header declares side x side pixels (~30 GB decoded)."""
    data = bytearray(_png(8, 8))
    ihdr = bytearray(data[12:29])  # 4-byte type + 13 bytes of IHDR data, after the 8-byte signature and length
    ihdr[4:12] = struct.pack(">II", side, side)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def bad_inputs(images: list[bytes]) -> list[tuple[str, bytes, bool]]:
    """(name, bytes, must fail): inputs a client may send by mistake, and odd but valid ones."""
    jpeg = next((b for b in images if b[:2] == b"\xff\xd8"), images[0])
    return [
        ("not an image (text)", b"this is not an image, it is a text file\n" * 10, True),
        ("empty", b"", True),
        ("truncated JPEG", jpeg[: len(jpeg) // 2], True),
        ("random bytes", os.urandom(4096), True),
        ("decompression bomb PNG (100000x100000 header)", _bomb_png(), True),
        ("1x1 PNG", _png(1, 1), False),
        ("grey PNG", _png(64, 48, "L"), False),
        ("RGBA PNG", _png(64, 48, "RGBA"), False),
    ]


def bad_inputs_under_load(s: Setup) -> Row:
    from clients.grpc_client import DetectorClient

    cases = bad_inputs(s.images)
    bad_calls: list[Call] = []
    outcome: dict[str, str] = {}
    with _server(_copy(s.base, s.work / "bad-input")) as server:
        url = server.options.grpc_url
        with ClientLoad(url, s.images, s.users) as load, DetectorClient(url, MODEL) as client:
            t0 = time.monotonic()
            for _ in range(3):
                for name, blob, must_fail in cases:
                    c0 = time.monotonic()
                    try:
                        client.detect(blob)
                        error = None
                    except Exception as e:
                        error = str(e)
                    outcome[name] = "error: " + error[:100] if error else "answered"
                    bad_calls.append(Call(c0, time.monotonic(), error, expected_error=must_fail))
            held = _hold(load, 1.0) + time.monotonic() - t0 - 1.0
    tally = Tally.of(load.calls + bad_calls)
    fault = ", ".join(f"{n}" for n, _, _ in cases) + f" (x3 each, {len(bad_calls)} in all) beside good traffic"
    notes = "; ".join(f"{n} -> {o}" for n, o in outcome.items())
    return Row("bad inputs", s.users + 1, held, fault, tally, notes)


SCENARIOS: list[Callable[[Setup], Row]] = [
    steady, stub_killed, server_restarted, graceful_drain, rollout_and_rollback, failed_load, overload_burst,
    bad_inputs_under_load,
]  # fmt: skip


def run_ops_report(
    repository: Path, out: Path, echo: Echo = lambda _: None, users: int = 4, duration_s: float = 10.0
) -> tuple[Path, int]:
    """Run every scenario; write ``out/ops-report.md`` and ``out/ops-report.json``; return (the markdown path, requests lost).

    ``repository``: a work directory (the small ssdlite repositories are built there once and
    copied per scenario). Raises DetserveError when a scenario cannot run; a lost request does not
    raise: the table shows it.
    """
    from detserve.runtime.samples import sample_files

    repository, out = Path(repository), Path(out)
    base, rollout = ensure_repositories(repository, echo)
    photos = sample_files()
    images = [photos[n] for n in sorted(photos)][:4]
    setup = Setup(base, rollout, images, repository / "runs", users, duration_s)
    setup.work.mkdir(parents=True, exist_ok=True)
    from detserve.app.opsreport_hardening import HARDENING_SCENARIOS

    rows: list[Row] = []
    for scenario in SCENARIOS + HARDENING_SCENARIOS:
        echo(f"{scenario.__name__} ...")
        row = scenario(setup)
        t = row.tally
        echo(f"  {row.scenario}: sent {t.sent}, ok {t.ok}, expected failures/rejections {t.expected}, LOST {t.lost}")
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": f"{MODEL} ({DETECTOR})",
    }
    data["machine"] = {"cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0]}
    data["rows"] = [r.to_dict() for r in rows]
    data["lost_total"] = sum(r.tally.lost for r in rows)
    (out / "ops-report.json").write_text(json.dumps(data, indent=2) + "\n")
    md = out / "ops-report.md"
    md.write_text(render_markdown(rows, data))
    return md, int(data["lost_total"])


def render_markdown(rows: list[Row], data: dict[str, Any]) -> str:
    lines = [
        "| scenario | load held | fault / bad input | requests sent | failed/rejected (expected) | requests LOST |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r.tally
        load = f"{r.users} users, {r.seconds:.0f} s, {t.sent} requests"
        lines.append(f"| {r.scenario} | {load} | {r.fault} | {t.sent} | {t.expected} | **{t.lost}** |")
    notes = [f"- {r.scenario}: {r.notes}" for r in rows if r.notes]
    head = (
        f"Generated {data['at']} by `detserve.app.opsreport.run_ops_report`: {data['model']}, embedded Triton, "
        f"{data['machine']['cpus']} CPUs (1-minute load average {data['machine']['load_average_1m']:.1f} at the end). "
        f"Requests lost in all: **{data['lost_total']}**."
    )
    return "\n".join([head, "", *lines, "", *notes]) + "\n"
