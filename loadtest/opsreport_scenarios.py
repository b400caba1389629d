"""The ops report's scenarios: load held while a fault happens, each against its own real tritonserver.

Steady load; a python stub killed; the server restarted; a graceful drain (stop under load); a
rollout to version 2 and a rollback; a broken model and a corrupted version loaded; an overload
burst past bounded queues; bad inputs mixed into good traffic. Each returns one ``Row``
(``opsreport_base.py``); the attacks of the hardening rounds are in ``opsreport_hardening.py``.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import struct
import threading
import time
import zlib
from collections.abc import Callable

from detserve.pipeline import CORE, POSTPROCESS, model_name
from loadtest.opsreport_base import (
    KEY,
    MODEL,
    ROLES,
    Call,
    ClientLoad,
    Row,
    Setup,
    Tally,
    copy_repository,
    hold,
    scenario_server,
    stub_pids,
)


def steady(s: Setup) -> Row:
    with (
        scenario_server(copy_repository(s.base, s.work / "steady")) as server,
        ClientLoad(server.options.grpc_url, s.images, s.users) as load,
    ):
        held = hold(load, s.duration_s)
    return Row("steady load", s.users, held, "none", Tally.of(load.calls))


def stub_killed(s: Setup) -> Row:
    with (
        scenario_server(copy_repository(s.base, s.work / "stub")) as server,
        ClientLoad(server.options.grpc_url, s.images, s.users, retries=12) as load,
    ):
        time.sleep(s.duration_s / 3)
        pids = stub_pids(server, model_name(MODEL, POSTPROCESS))
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        held = s.duration_s / 3 + hold(load, s.duration_s * 2 / 3)
    fault = f"SIGKILL of {len(pids)} post-processing stub(s) mid-load; clients retry transient errors (<= 12, 120 s)"
    restarts = "; ".join(
        f"{r.model} reloaded by the stub watchdog in {r.seconds:.1f} s" + (f" (failed: {r.error})" if r.error else "")
        for r in server.stub_restarts
    )  # Triton 2.51 does not restart a dead stub itself (detserve/ops/watchdog.py)
    return Row("python stub killed", s.users, held, fault, Tally.of(load.calls), restarts or "no stub restart")


def server_restarted(s: Setup) -> Row:
    from detserve.ops.server import TritonServer

    with scenario_server(copy_repository(s.base, s.work / "restart")) as first:
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
    with scenario_server(copy_repository(s.base, s.work / "drain")) as server:
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

    repo = copy_repository(s.rollout, s.work / "rollout")
    with scenario_server(repo, key=True) as server:
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

    repo = copy_repository(s.base, s.work / "failed-load")
    errors: list[str] = []
    with scenario_server(repo, key=True) as server:
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

    repo = copy_repository(s.base, s.work / "overload")
    for role in ROLES[1:]:
        config = read_config(repo / f"{MODEL}{role}")
        config.dynamic_batching.default_queue_policy.max_queue_size = QUEUE
        (repo / f"{MODEL}{role}" / "config.pbtxt").write_text(render(config))
    calls: list[Call] = []
    lock = threading.Lock()
    with scenario_server(repo) as server, DetectorClient(server.options.grpc_url, MODEL) as client:
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
    with scenario_server(copy_repository(s.base, s.work / "bad-input")) as server:
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
            held = hold(load, 1.0) + time.monotonic() - t0 - 1.0
    tally = Tally.of(load.calls + bad_calls)
    fault = ", ".join(f"{n}" for n, _, _ in cases) + f" (x3 each, {len(bad_calls)} in all) beside good traffic"
    notes = "; ".join(f"{n} -> {o}" for n, o in outcome.items())
    return Row("bad inputs", s.users + 1, held, fault, tally, notes)


SCENARIOS: list[Callable[[Setup], Row]] = [
    steady, stub_killed, server_restarted, graceful_drain, rollout_and_rollback, failed_load, overload_burst,
    bad_inputs_under_load,
]  # fmt: skip
