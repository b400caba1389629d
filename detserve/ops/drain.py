"""Drain a tritonserver before it stops: unload its ensembles, outermost first, and wait for them.

On SIGTERM Triton 2.51 stops every model's scheduler at once, composing models included, so an
ensemble request that already passed its first step is rejected at the next one ("scheduler ...
has stopped accepting new inference requests"). Unloading an ensemble instead refuses new
requests for it at once ("unknown model" / "not found": fast and clear) and destroys it only when
its in-flight requests are done; its composing models stay loaded meanwhile.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from detserve.errors import ServerError
from detserve.ops.admin import ModelAdmin


@dataclass
class DrainReport:
    """What a drain did: the ensembles it unloaded, how long it waited, what failed."""

    unloaded: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


def drain_ensembles(internal_url: str, timeout_s: float) -> DrainReport:
    """Unload every loaded ensemble through tritonserver's own socket and wait until Triton has.

    Best effort: a drain that fails or times out says so in the report (the caller stops the
    server anyway), it does not raise.
    """
    report = DrainReport()
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    try:
        with ModelAdmin(internal_url, None, timeout_s=timeout_s) as admin:
            for level in _ensemble_levels(admin):
                for name in level:
                    admin.unload_model(name)
                report.unloaded += level
                _wait_unloaded(admin, level, deadline)
    except Exception as e:  # the drain is best effort: SIGTERM still stops the server
        report.error = str(e)
    report.seconds = time.monotonic() - t0
    return report


def _ensemble_levels(admin: ModelAdmin) -> list[list[str]]:
    """The loaded ensembles in unload order: those no other ensemble uses first, then the next level."""
    names = {e.name for e in admin.get_model_repository_index() if e.state == "READY"}
    steps: dict[str, set[str]] = {}
    for name in sorted(names):
        config = admin.model_config(name)
        if config.get("platform") == "ensemble":
            steps[name] = {s["model_name"] for s in config.get("ensemble_scheduling", {}).get("step", [])}
    levels: list[list[str]] = []
    while steps:
        used = set().union(*steps.values())
        level = sorted(n for n in steps if n not in used) or sorted(steps)  # a cycle cannot load; be safe
        levels.append(level)
        for n in level:
            del steps[n]
    return levels


def _wait_unloaded(admin: ModelAdmin, names: list[str], deadline: float) -> None:
    """Until no version of ``names`` is READY or UNLOADING (its in-flight requests are done)."""
    while True:
        busy = {e.name for e in admin.get_model_repository_index() if e.name in names and e.state in ("READY", "UNLOADING")}
        if not busy:
            return
        if time.monotonic() > deadline:
            raise ServerError(f"drain timed out: {', '.join(sorted(busy))} still busy")
        time.sleep(0.1)
