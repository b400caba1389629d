"""A killed or crashed python stub is brought back by ``StubWatchdog``: Triton 2.51's python backend
never restarts a dead stub (python_backend removed the restart from ``ModelInstanceExecute`` in
r24.07, commit 27f04d1), so every request scheduled on that instance fails for good with "Stub
process '<instance>' is not healthy." and the stub stays a zombie child of tritonserver (nobody
waits for it). The watchdog sees those zombies and reloads their model through the
model-repository API (the same explicit control and key the drain uses). A plain load of an
unchanged model is a no-op in Triton, and a config identical to the served one only "updates" it
in place, so the reload overrides the served config with one parameter changed
(``detserve_stub_restart``): Triton loads fresh instances beside the dead ones and swaps them in
once ready (~10 s here); clients retry the "not healthy" answers meanwhile.

A frozen stub is handled the same way. A stub stopped by SIGSTOP (state ``T``,
or ``t`` under a tracer) answers nothing: Triton failed every request on its instance with "not
healthy" while the server's readiness stayed true. Seen stopped in two checks in a row, it is
killed and its model reloaded like a dead stub, readiness false meanwhile. A stub that runs but
no longer answers Triton's health check cannot be told from an idle one by its process state;
Triton's statistics show it: the model's requests fail and none succeeds, and they fail *slowly*
-- Triton waits 1 s for the stub's health mutex before it answers "not healthy" (measured: 3
failures of the SIGSTOPped core, 3.01 s in all), whereas a request the model rejects (a bad image)
fails in milliseconds or counts as a success (python-backend error responses, tritonstats.py), so
clients cannot trigger a reload with bad inputs. Two such statistics windows in a row (``STATS_CHECK_S``
each) and the model's stubs are killed and reloaded. A stub stuck inside the model's code that still
passes Triton's health check holds its requests until their deadlines; that is not detected here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detserve.ops.stubshm import StubJanitor

STUB_BINARY = "triton_python_backend_stub"
STUB_CHECK_S = 0.5
RESTART_PARAMETER = "detserve_stub_restart"
STOPPED_STATES = ("T", "t")  # /proc/<pid>/stat: stopped by a signal, stopped by a tracer
STATS_CHECK_S = 5.0  # how often Triton's statistics are read for stubs that fail the health check
UNHEALTHY_FAIL_S = 0.5  # a "not healthy" failure takes Triton's 1 s wait for the stub's health mutex

log = logging.getLogger(__name__)


@dataclass
class StubRestart:
    """One reload of a model whose python stub(s) died: what died, how long the reload took, its error."""

    model: str
    instances: list[str]
    at: float  # monotonic seconds, when the watchdog saw the stubs dead
    seconds: float = 0.0
    error: str | None = None


def children_of(pid: int) -> dict[int, tuple[str, list[str]]]:
    """``pid``'s child processes: {pid: (state letter, argv)} (argv is empty for a zombie)."""
    out: dict[int, tuple[str, list[str]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) != pid:
                continue
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        out[int(entry)] = (fields[0], [a.decode(errors="replace") for a in args if a])
    return out


def stub_identity(args: list[str]) -> tuple[str, str] | None:
    """(model, instance) of a model-instance stub's argv, else None.

    argv: stub, <repository>/<model>/<version>/model.py, shm region, shm sizes (2), parent pid,
    backend dir, ipc handle, instance name, runtime model dir (stub_launcher.cc, r24.10).
    """
    if len(args) < 9 or not args[0].endswith(STUB_BINARY):
        return None
    model = Path(args[1]).parents[1].name
    instance = args[8]
    return (model, instance) if instance != model else None  # the auto-complete stub is named after the model


class StubWatchdog:
    """Reloads a model when one of its python stubs dies (module docstring).

    A stub is dead when tritonserver's child that ran it is a zombie in two checks in a row
    (Triton waits for the stubs it stops itself, so their zombies last microseconds).
    """

    def __init__(
        self,
        server_pid: int,
        url: str,
        interval_s: float = STUB_CHECK_S,
        on_failing: Callable[[dict[str, str]], None] | None = None,
    ) -> None:
        self.server_pid, self.url, self.interval_s = server_pid, url, interval_s
        self.restarts: list[StubRestart] = []
        # models that cannot serve now (stub dead, reload pending or failed) -> why; readiness reads it
        self.failing: dict[str, str] = {}
        self.on_failing = on_failing
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="detserve-stub-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)

    def _run(self) -> None:
        seen = _SeenStubs()
        janitor = StubJanitor(server_pid=self.server_pid)  # replaced stubs' regions, stubs outliving a reload
        stuck = _FailingHealthChecks(self.url)
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    children = children_of(self.server_pid)
                except OSError:
                    continue
                dead, frozen = seen.update(children)
                janitor.observe(children, seen.stubs)
                for model, pids in stuck.check(seen.stubs).items():
                    frozen.setdefault(model, []).extend(p for p in pids if p not in frozen.get(model, []))
                for model, pids in sorted(frozen.items()):
                    self._kill_frozen(model, pids, seen)
                    dead.setdefault(model, []).extend(p for p in pids if p not in dead.get(model, []))
                for model, pids in sorted(dead.items()):
                    if self._stop.is_set():
                        return
                    if self._reload(model, sorted(seen.stubs[p][1] for p in pids if p in seen.stubs)):
                        seen.reloaded(model)
                        janitor.reloaded(model)
                    else:
                        self._stop.wait(5.0)  # and try again
        finally:
            stuck.close()

    def _kill_frozen(self, model: str, pids: list[int], seen: _SeenStubs) -> None:
        """Readiness false at once, then SIGKILL: the reload that follows replaces the instances."""
        instances = ", ".join(sorted(seen.stubs[p][1] for p in pids if p in seen.stubs))
        log.warning("python stub(s) %s of %s stopped answering: killing them, reloading %s", instances, model, model)
        self._set_failing(model, f"python stub {instances} stopped answering; reloading")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _set_failing(self, model: str, reason: str | None) -> None:
        if reason is None:
            self.failing.pop(model, None)
        else:
            self.failing[model] = reason
        if self.on_failing is not None:
            try:
                self.on_failing(dict(self.failing))
            except Exception as e:  # readiness reporting must not stop the watchdog
                log.error("could not publish readiness: %s", e)

    def _reload(self, model: str, instances: list[str]) -> bool:
        from detserve.ops.admin import ModelAdmin

        restart = StubRestart(model, instances, time.monotonic())
        self.restarts.append(restart)
        log.warning("python stub(s) %s of %s died: reloading %s", ", ".join(instances), model, model)
        if model not in self.failing:  # a retry keeps the reason of the failed reload
            self._set_failing(model, f"python stub {', '.join(instances)} died; reloading")
        try:
            with ModelAdmin(self.url, None, timeout_s=300.0) as admin:
                config = admin.model_config(model)  # the served config: keeps a rollout's version policy
                config.setdefault("parameters", {})[RESTART_PARAMETER] = {"string_value": str(len(self.restarts))}
                admin.load_model(model, config=json.dumps(config))
        except Exception as e:
            restart.error = str(e)
            log.error("reloading %s after its stub died failed: %s", model, e)
        restart.seconds = time.monotonic() - restart.at
        self._set_failing(model, None if restart.error is None else f"python stub died and its reload failed: {restart.error}")
        return restart.error is None


class _SeenStubs:
    """What the watchdog knows of tritonserver's stubs from one check to the next."""

    def __init__(self) -> None:
        self.stubs: dict[int, tuple[str, str]] = {}  # live stubs seen: pid -> (model, instance)
        self.suspects: set[int] = set()  # zombies seen once
        self.stopped: set[int] = set()  # stubs seen stopped once
        self.handled: set[int] = set()  # stubs of replaced instances (Triton may never reap a dead one)

    def update(self, children: dict[int, tuple[str, list[str]]]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """One look at tritonserver's children: ({model: dead stubs}, {model: frozen stubs}), each seen twice."""
        dead: dict[str, list[int]] = {}
        frozen: dict[str, list[int]] = {}
        zombies, stopped = set(), set()
        for pid, (state, args) in children.items():
            if state == "Z":
                zombies.add(pid)
                if pid in self.stubs and pid not in self.handled and pid in self.suspects:
                    dead.setdefault(self.stubs[pid][0], []).append(pid)
                continue
            if (who := stub_identity(args)) is not None:
                self.stubs[pid] = who
            if state in STOPPED_STATES and pid in self.stubs and pid not in self.handled:
                stopped.add(pid)
                if pid in self.stopped:
                    frozen.setdefault(self.stubs[pid][0], []).append(pid)
        self.suspects, self.stopped = zombies, stopped
        self.stubs = {p: w for p, w in self.stubs.items() if p in children}
        self.handled &= set(children)
        return dead, frozen

    def reloaded(self, model: str) -> None:
        """Every stub of ``model`` seen so far belongs to the replaced instances: none is reloaded again."""
        self.handled |= {p for p, (m, _) in self.stubs.items() if m == model}


class _FailingHealthChecks:
    """Models whose stubs fail Triton's health check while running (module docstring), from its statistics."""

    def __init__(self, url: str, every_s: float | None = None) -> None:
        self.url, self.every_s = url, STATS_CHECK_S if every_s is None else every_s
        self.client: Any = None
        self.last: dict[str, Any] = {}  # model -> ModelStats at the previous read
        self.strikes: dict[str, int] = {}  # model -> windows in a row with slow failures only
        self.next_at = time.monotonic() + self.every_s

    def check(self, stubs: dict[int, tuple[str, str]]) -> dict[str, list[int]]:
        """{model: its live stubs} for each model that failed that way in two windows in a row."""
        if time.monotonic() < self.next_at:
            return {}
        self.next_at = time.monotonic() + self.every_s
        try:
            now = self._read()
        except Exception as e:  # the server may be restarting: the process checks go on
            log.debug("cannot read Triton's statistics: %s", e)
            return {}
        out: dict[str, list[int]] = {}
        for model in sorted({m for m, _ in stubs.values()}):
            before, after = self.last.get(model), now.get(model)
            if before is not None and after is not None and _failing_slowly(before, after):
                self.strikes[model] = self.strikes.get(model, 0) + 1
            else:
                self.strikes.pop(model, None)
            if self.strikes.get(model, 0) >= 2:
                out[model] = sorted(p for p, (m, _) in stubs.items() if m == model)
                del self.strikes[model]
        self.last = now
        return out

    def _read(self) -> dict[str, Any]:
        import tritonclient.grpc as grpcclient

        from detserve.ops.tritonstats import parse_statistics

        if self.client is None:
            self.client = grpcclient.InferenceServerClient(self.url)
        return parse_statistics(self.client.get_inference_statistics(as_json=True, client_timeout=5.0))

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()


def _failing_slowly(before: Any, after: Any) -> bool:
    """Between two ModelStats: at least 2 failures, no success, each failure ``UNHEALTHY_FAIL_S`` or longer."""
    fails = after.fail.count - before.fail.count
    if fails < 2 or after.success.count != before.success.count:
        return False
    return (after.fail.ns - before.fail.ns) / fails >= UNHEALTHY_FAIL_S * 1e9
