"""The phased rollout of an ensemble's version over every server that serves it (``ops/fleet.py`` targets).

Why phases: an admin call through a ``--replicas N`` gate reached one replica, so a promote left the
others on the old version while the repository's files said the new one. The rollout now runs over a
list of targets (the replicas behind one gate, and those of every endpoint: ``ops/endpoints.py``):

1. **load beside**, on every target: the ensemble is pinned to the version that target serves (if it
   was not: with ``-1``, "latest", a step would pick each composing model's newest version at request
   time), then each composing model is loaded with ``specific { versions: [served, new] }``: ``served``
   keeps serving, ``new`` loads beside it. If any target fails, every target is narrowed back to what it
   served and the rollout stops: the old version serves everywhere;
2. **switch**, one target at a time: the ensemble is loaded with its steps pinned to ``new``; from then
   on every request that target receives runs on ``new`` end to end (one that began before holds the
   old steps until it finishes). A failure here switches the switched targets back, then undoes 1;
3. **narrow**, on every target: each composing model is loaded with ``[new]``; Triton unloads the old
   version once the requests holding it are done.

What each target serves is read from that target (its ensemble's pins), not assumed from the
repository: a replica an earlier tool left behind is brought along instead of losing its version.

The repository's files are written once per phase, with what the targets then serve, so that at every
moment they name a version some target serves and whose composing models every target holds: a server
(a replica, or one machine of several sharing the repository) that restarts mid-rollout comes up on a
version the others serve. After 1 succeeded everywhere: the ensemble pinned to the old version and the
composing models ``[old, new]``; in 2, as soon as the first target switched: the ensemble pinned to
``new`` (written after the last switch instead, there was an instant with every target on ``new`` and the
files on ``old``: a rollout interrupted then left them so); after 3 succeeded everywhere: the composing
models ``[new]``. On an abort the files are set back to the old version *before* the targets are undone,
so a target the undo cannot reach (down) comes back on the old version.

The switch window (first switch started to last switch done) is reported: phase 2 reloads only each
target's ensemble (a config over models already loaded, no weights), one after the other, so it spans
about one ensemble load per target; meanwhile each request is still served by one complete version.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc

from detserve.errors import ClientError, DetserveError
from detserve.ops.admin import ModelAdmin
from detserve.ops.fleet import Target, admins
from detserve.tritonconfig import render

Echo = Callable[[str], None]


class RolloutError(DetserveError):
    """A rollout that stopped; the message says what serves now."""


@dataclass(frozen=True)
class Models:
    """An ensemble and the composing models it owns, as the repository holds them.

    A step it shares (``build --share-preprocessing``: another ensemble's pre-processing model) is in
    ``fixed``, not ``steps``: a rollout of this ensemble never loads it and its pin never moves, since
    its versions are the owner's numbers, not this ensemble's. ``keep``: per owned step, the versions
    other ensembles pin; every load of that step keeps them, so no rollout unloads them from under them."""

    ensemble_dir: Path
    ensemble: mc.ModelConfig
    steps: tuple[tuple[Path, mc.ModelConfig], ...]
    fixed: frozenset[str] = frozenset()
    keep: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def policy(self, model_dir: Path, config: mc.ModelConfig, versions: Sequence[int]) -> mc.ModelConfig:
        return with_policy(config, [*versions, *self.keep.get(model_dir.name, ())])

    def pins(self, version: int) -> mc.ModelConfig:
        return with_pins(self.ensemble, version, self.fixed)

    @property
    def entry(self) -> str:
        """The first step whose request counters are this ensemble's alone (a canary's failure count): a
        shared pre-processing model also counts its other ensembles' requests, so the step after it."""
        alone = [d.name for d, _ in self.steps if d.name not in self.keep]
        return alone[0] if alone else self.steps[0][0].name

    def own_pins(self, steps: Sequence[tuple[str, int]]) -> set[int]:
        """The versions the ensemble's own steps pin, of (step model, version) pairs."""
        return {v for m, v in steps if m not in self.fixed}


@dataclass(frozen=True)
class Load:
    phase: int  # 1 load beside, 2 switch, 3 narrow
    model_dir: Path
    config: mc.ModelConfig


@dataclass(frozen=True)
class FleetRollout:
    """What a rollout did: what each target served before, and how long the targets' switches spanned."""

    served_before: tuple[tuple[str, int], ...]  # (target label, version)
    switch_window_s: float  # first switch started to last switch done (0 with one target: a single load)


def with_policy(config: mc.ModelConfig, versions: Sequence[int]) -> mc.ModelConfig:
    out = mc.ModelConfig()
    out.CopyFrom(config)
    out.ClearField("version_policy")
    out.version_policy.specific.versions.extend(sorted(set(versions)))
    return out


def with_pins(config: mc.ModelConfig, version: int, fixed: frozenset[str] = frozenset()) -> mc.ModelConfig:
    """The ensemble with its steps pinned to ``version``, but those in ``fixed`` (shared steps keep their pin)."""
    out = mc.ModelConfig()
    out.CopyFrom(config)
    for step in out.ensemble_scheduling.step:
        if step.model_name not in fixed:
            step.model_version = version
    return out


def describe(config: mc.ModelConfig) -> str:
    if config.platform == "ensemble":
        return "steps pinned to version " + ",".join(sorted({str(s.model_version) for s in config.ensemble_scheduling.step}))
    return "versions " + ",".join(str(v) for v in config.version_policy.specific.versions)


def plan(models: Models, served: int, new: int, pinned: bool | None = None) -> list[Load]:
    """The loads on one target that serves ``served`` (``pinned``: its ensemble is pinned to it; None: as the files say)."""
    if pinned is None:
        pinned = models.own_pins([(s.model_name, s.model_version) for s in models.ensemble.ensemble_scheduling.step]) == {served}
    loads = [] if pinned else [Load(1, models.ensemble_dir, models.pins(served))]
    loads += [Load(1, d, models.policy(d, c, [served, new])) for d, c in models.steps]
    loads.append(Load(2, models.ensemble_dir, models.pins(new)))
    loads += [Load(3, d, models.policy(d, c, [new])) for d, c in models.steps]
    return loads


def served_on(admin: ModelAdmin, models: Models, fallback: int) -> tuple[int, bool]:
    """(version, pinned): what the target's loaded ensemble runs, read from the target itself."""
    try:
        config = admin.model_config(models.ensemble_dir.name)
        steps = config.get("ensemble_scheduling", {}).get("step", [])
        pins = models.own_pins([(s.get("model_name", ""), int(s.get("model_version", -1))) for s in steps])
        if len(pins) == 1 and min(pins) > 0:
            return min(pins), True
        step = admin.model_config(models.steps[0][0].name) if models.steps else {}  # the steps share one policy
        loaded = [int(v) for v in step.get("version_policy", {}).get("specific", {}).get("versions", [])]
        return (max(loaded) if loaded else fallback), False
    except DetserveError:  # not loaded there: the repository's version is what it should serve
        return fallback, False


def _load(admin: ModelAdmin, load: Load) -> None:
    admin.load_model(load.model_dir.name, config=json_format.MessageToJson(load.config, preserving_proto_field_name=True))


def _write(loads: Sequence[Load]) -> None:
    for load in loads:
        replace_file(load.model_dir / "config.pbtxt", render(load.config))


def replace_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` all at once: a server starting meanwhile (another pod on a shared
    volume) reads the old file or the new one, never half of one (write beside it, then rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run_rollout(
    fleet: Sequence[Target], key: str, models: Models, old: int, new: int, on_step: Echo | None = None
) -> FleetRollout:
    """The three phases over ``fleet`` (see the module docstring); raises RolloutError after undoing."""
    echo = on_step or (lambda _: None)
    with admins(fleet, key) as conns:
        state = [served_on(a, models, old) for a in conns]
        loads = [plan(models, served, new, pinned) for served, pinned in state]
        done: list[list[Load]] = [[] for _ in conns]
        at: list[Target] = []  # the target being changed, for the message
        try:
            window = _load_and_switch(fleet, conns, loads, done, plan(models, old, new), echo, at)
        except (DetserveError, KeyboardInterrupt) as e:  # an interrupt (Ctrl-C, SIGTERM of a Job) undoes as a failure does
            # the files first: from here on a server that restarts (or one the undo cannot reach) serves ``old``
            _write([x for x in plan(models, old, old, pinned=False) if x.phase == 1])
            lost = _undo(fleet, conns, models, state, done, echo)
            where = at[-1].label if at else fleet[0].label
            if isinstance(e, ClientError):  # it did not answer (down), rather than refused the load
                lost = [where, *lost]
            why = e.message if isinstance(e, DetserveError) else "interrupted (Ctrl-C or SIGTERM)"
            text = f"rollout of {models.ensemble_dir.name} to version {new} stopped on {where}: {why}; "
            hint = e.hint if isinstance(e, DetserveError) else None
            raise RolloutError(text + _after_abort(old, fleet, state, lost), hint=hint) from e
        _narrow(fleet, conns, loads, echo, len(conns) > 1)
    _write([x for x in plan(models, old, new) if x.phase == 3])
    return FleetRollout(tuple((t.label, s) for t, (s, _) in zip(fleet, state, strict=True)), window if len(fleet) > 1 else 0.0)


def _load_and_switch(
    fleet: Sequence[Target],
    conns: Sequence[ModelAdmin],
    loads: Sequence[list[Load]],
    done: Sequence[list[Load]],
    files: Sequence[Load],
    echo: Echo,
    at: list[Target],
) -> float:
    """Phases 1 and 2; returns the switch window. The files follow (module docstring): phase 1's once it
    succeeded everywhere; the ensemble's new pin as soon as the first target serves ``new``, so that at every
    moment the files name a version some target serves (the last switch done, all serve ``new``)."""
    window = 0.0
    for phase in (1, 2):
        t0 = time.monotonic()
        for i, (t, admin, target_loads, applied) in enumerate(zip(fleet, conns, loads, done, strict=True)):
            at.append(t)
            for load in (x for x in target_loads if x.phase == phase):
                echo(f"{t.label + ': ' if len(fleet) > 1 else ''}load {load.model_dir.name}: {describe(load.config)}")
                _load(admin, load)
                applied.append(load)
            if phase == 2 and i == 0:
                _write([x for x in files if x.phase == 2])
        if phase == 1:
            _write([x for x in files if x.phase == 1])
        window = time.monotonic() - t0
    return window


def _narrow(fleet: Sequence[Target], conns: Sequence[ModelAdmin], loads: Sequence[list[Load]], echo: Echo, many: bool) -> None:
    """Phase 3: the new version serves everywhere already; a target that cannot unload the old one keeps both."""
    failed = []
    for t, admin, target_loads in zip(fleet, conns, loads, strict=True):
        for load in (x for x in target_loads if x.phase == 3):
            echo(f"{t.label + ': ' if many else ''}load {load.model_dir.name}: {describe(load.config)}")
            try:
                _load(admin, load)
            except DetserveError as e:
                failed.append(f"{t.label}: {e.message}")
    if failed:
        raise RolloutError(
            "the new version serves on every target, but the old one could not be unloaded on: " + "; ".join(failed),
            hint="`detserve models list` shows each replica's versions; promote again to narrow them",
        )


def _undo(
    fleet: Sequence[Target],
    conns: Sequence[ModelAdmin],
    models: Models,
    state: Sequence[tuple[int, bool]],
    done: Sequence[list[Load]],
    echo: Echo,
) -> list[str]:
    """Every target back on the version it served: switched ensembles first, then the composing models narrowed.
    Returns the labels of those that did not answer (they come back from the repository's files)."""
    lost = []
    for t, admin, (served, _), applied in zip(fleet, conns, state, done, strict=True):
        if not applied:
            continue
        undo = [x for x in plan(models, served, served, pinned=True) if x.phase in (2, 3)]
        if not any(x.phase == 2 for x in applied):
            undo = [x for x in undo if x.phase == 3]
        for load in undo:
            echo(f"abort: {t.label}: load {load.model_dir.name}: {describe(load.config)}")
            try:
                _load(admin, load)
            except DetserveError as e:  # a target that is down comes back from the repository's files
                echo(f"abort: {t.label}: {e.message}")
                lost.append(t.label)
                break
    return lost


def _after_abort(old: int, fleet: Sequence[Target], state: Sequence[tuple[int, bool]], lost: Sequence[str]) -> str:
    """What serves after an abort, and what a server that did not answer serves when it is back."""
    back = [(t, s) for t, s in zip(fleet, state, strict=True) if t.label not in lost]
    text = "back on the version each served: " + _served_text([t for t, _ in back], [s for _, s in back]) if back else ""
    if not lost:
        return text
    unreached = ", ".join(dict.fromkeys(lost))
    return f"{text}{'; ' if text else ''}the repository's files say version {old}, which {unreached} serves once it answers again"


def _served_text(fleet: Sequence[Target], state: Sequence[tuple[int, bool]]) -> str:
    return ", ".join(f"{t.label}: {served}" for t, (served, _) in zip(fleet, state, strict=True))


def run_stage(fleet: Sequence[Target], key: str, models: Models, old: int, new: int, on_step: Echo | None = None) -> FleetRollout:
    """Phases 1 and 2 on ``fleet`` only (a canary's targets, ``ops/canary.py``); phase 3 is left out, so the old
    version stays loaded beside the new one there and ``unstage`` switches back without loading weights.
    The files get phase 1 only (the ensemble pinned to ``old``, the composing models ``[old, new]``): a server
    that restarts meanwhile, canary or not, serves ``old``, what the rest serve. A failure undoes it."""
    echo = on_step or (lambda _: None)
    with admins(fleet, key) as conns:
        state = [served_on(a, models, old) for a in conns]
        done: list[list[Load]] = [[] for _ in conns]
        t0 = time.monotonic()
        try:
            for t, admin, (served, pinned), applied in zip(fleet, conns, state, done, strict=True):
                for load in (x for x in plan(models, served, new, pinned) if x.phase in (1, 2)):
                    echo(f"canary {t.label}: load {load.model_dir.name}: {describe(load.config)}")
                    _load(admin, load)
                    applied.append(load)
        except DetserveError as e:
            _undo(fleet, conns, models, state, done, echo)
            raise RolloutError(f"canary of {models.ensemble_dir.name} version {new} stopped: {e.message}", hint=e.hint) from e
    _write([x for x in plan(models, old, new) if x.phase == 1])
    return FleetRollout(tuple((t.label, s) for t, (s, _) in zip(fleet, state, strict=True)), time.monotonic() - t0)


def unstage(fleet: Sequence[Target], key: str, models: Models, old: int, on_step: Echo | None = None) -> list[str]:
    """Undo ``run_stage``: each target's ensemble pinned to ``old`` again, then its composing models narrowed to
    ``[old]``; the files say ``[old]``. Returns the targets that could not be reached (they come back from the files)."""
    echo = on_step or (lambda _: None)
    loads = [x for x in plan(models, old, old, pinned=True) if x.phase in (2, 3)]
    failed = []
    with admins(fleet, key) as conns:
        for t, admin in zip(fleet, conns, strict=True):
            for load in loads:
                echo(f"canary rollback {t.label}: load {load.model_dir.name}: {describe(load.config)}")
                try:
                    _load(admin, load)
                except DetserveError as e:
                    failed.append(f"{t.label}: {e.message}")
                    break
    _write([x for x in loads if x.phase == 3])
    return failed
