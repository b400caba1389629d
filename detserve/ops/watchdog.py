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
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from detserve.ops.stubshm import StubJanitor

STUB_BINARY = "triton_python_backend_stub"
STUB_CHECK_S = 0.5
RESTART_PARAMETER = "detserve_stub_restart"

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
        stubs: dict[int, tuple[str, str]] = {}  # live stubs seen: pid -> (model, instance)
        janitor = StubJanitor()  # the replaced stubs' regions, and replaced stubs that outlive their reload
        suspects: set[int] = set()  # zombies seen once
        handled: set[int] = set()  # dead stubs whose model was reloaded (Triton may never reap them)
        while not self._stop.wait(self.interval_s):
            try:
                children = children_of(self.server_pid)
            except OSError:
                continue
            dead: dict[str, list[int]] = {}
            zombies = set()
            for pid, (state, args) in children.items():
                if state == "Z":
                    zombies.add(pid)
                    if pid in stubs and pid not in handled and pid in suspects:
                        dead.setdefault(stubs[pid][0], []).append(pid)
                elif (who := stub_identity(args)) is not None:
                    stubs[pid] = who
            suspects = zombies
            stubs = {p: w for p, w in stubs.items() if p in children}
            handled &= set(children)
            janitor.observe(children, stubs)
            for model, pids in sorted(dead.items()):
                if self._stop.is_set():
                    return
                if self._reload(model, sorted(stubs[p][1] for p in pids)):
                    handled.update(pids)
                    janitor.reloaded(model)
                else:
                    self._stop.wait(5.0)  # and try again

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
