"""Roll an ensemble's composing models forward to another version, and back, without dropping a request.

``promote`` switches the ensemble ``<name>`` from the version it serves (``old``) to ``new`` through
Triton's explicit model control (admin key), in this order:

0. the ensemble is pinned to ``old`` (steps ``model_version: old``), if it was not already: with
   ``-1`` ("latest") a step would pick each composing model's newest version at request time, and
   a request could meet preprocess ``old`` next to a core ``new`` that is already loaded;
1. each composing model is loaded with ``version_policy: specific { versions: [old, new] }``:
   ``old`` keeps serving (Triton swaps a reloaded version only once its replacement is ready),
   ``new`` loads beside it; the ensemble still sends everything to ``old``;
2. the ensemble is loaded with its steps pinned to ``new``: the three ``new`` versions are all
   ready, so every request arriving from now on runs on ``new`` end to end; a request that began
   on the old ensemble holds its ``old`` step models until it finishes;
3. each composing model is narrowed to ``specific { versions: [new] }``: Triton unloads ``old``
   once the requests that hold it are done.

At every moment each request is served by one complete version. The steps run on every server
behind the URL (each replica of a ``--replicas N`` server, ``ops/fleet.py``), phase by phase:
``ops/rollout.py``. Every load sends the config as an override; once a phase succeeded everywhere
the same configs are written to the models' ``config.pbtxt`` (once), so a reload or a restart serves
what the others serve (an interrupted promote leaves a consistent repository: the ensemble pinned
to a version its composing models serve). ``<repo>/<name>/rollout.json`` keeps the history;
``rollback`` promotes the version the last promote came from.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from detserve.errors import DetserveError
from detserve.ops.admin import ENV_VAR, FILE_ENV
from detserve.ops.fleet import Target, targets
from detserve.ops.rollout import Models, replace_file, run_rollout
from detserve.ops.rollout import plan as rollout_plan
from detserve.pipeline import CORE, model_name, role_of
from detserve.tritonconfig import read_config

ROLES = ("preprocess", "core", "postprocess")
HISTORY = "rollout.json"


class VersionError(DetserveError):
    """A promote or rollback that cannot (or must not) be done."""


@dataclass(frozen=True)
class Rollout:
    name: str
    old: int
    new: int
    forced: bool
    at: str
    served_before: tuple[tuple[str, int], ...] = ()  # per target (a replica, or the server): what it served
    switch_window_s: float = 0.0  # first target switched to last (several targets)

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "from": self.old, "to": self.new, "forced": self.forced}


def composing(name: str, repository: Path | None = None) -> list[str]:
    """The ensemble's composing models: its steps as its config lists them (a multi-step family
    has more than the default three), or the default three when there is no config to read."""
    config = None if repository is None else repository / name / "config.pbtxt"
    if config is not None and config.is_file():
        steps = [s.model_name for s in read_config(config.parent).ensemble_scheduling.step]
        if steps:
            return steps
    return [f"{name}_{role}" for role in ROLES]


def step_pins(repository: Path, model: str) -> dict[str, int]:
    """Every ensemble of ``repository`` that runs ``model`` as a step -> the version it pins (-1: latest).
    More than one where ensembles share a step (``build --share-preprocessing``)."""
    users = {}
    for config in sorted(repository.glob("*/config.pbtxt")):
        if "ensemble" not in config.read_text():  # cheap: most models are no ensemble
            continue
        for step in read_config(config.parent).ensemble_scheduling.step:
            if step.model_name == model:
                users[config.parent.name] = int(step.model_version)
    return users


def shared_steps(repository: Path, name: str) -> set[str]:
    """The steps of ``name`` that another ensemble owns (their names are not ``<name>_<role>``)."""
    return {m for m in composing(name, repository) if role_of(m, name) is None}


def _model_dir(repository: Path, model: str) -> Path:
    path = repository / model
    if not (path / "config.pbtxt").is_file():
        raise VersionError(f"unknown model {model!r}: no {path / 'config.pbtxt'}", hint="build it with `detserve build`")
    return path


def versions_of(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def serving_version(repository: Path, name: str) -> int:
    """The version the repository says ``name`` serves: the ensemble's pin, else the composing models' policy."""
    ensemble = read_config(_model_dir(repository, name))
    # a shared step's pin is its owner's version, not this ensemble's (build --share-preprocessing)
    pins = {s.model_version for s in ensemble.ensemble_scheduling.step if role_of(s.model_name, name) is not None}
    if len(pins) == 1 and min(pins) > 0:
        return int(min(pins))
    core_dir = _model_dir(repository, model_name(name, CORE))
    core = read_config(core_dir)
    if core.version_policy.HasField("specific") and core.version_policy.specific.versions:
        return int(max(core.version_policy.specific.versions))
    available = versions_of(core_dir)
    if not available:
        raise VersionError(f"{model_name(name, CORE)} has no version directories")
    return available[-1]  # Triton's default policy: the latest version


def check_version(repository: Path, name: str, version: int, force: bool) -> None:
    """Every composing model has ``version`` (a shared step: the version the ensemble pins); its build
    records say verification passed (unless forced)."""
    ensemble = read_config(_model_dir(repository, name))
    fixed = {s.model_name: int(s.model_version) for s in ensemble.ensemble_scheduling.step if role_of(s.model_name, name) is None}
    for model in composing(name, repository):
        model_dir = _model_dir(repository, model)
        if model in fixed:
            _check_shared(repository, name, model, fixed[model])
        elif not (model_dir / str(version)).is_dir():
            raise VersionError(
                f"{model} has no version {version} (has {versions_of(model_dir)})",
                hint=f"build it with `detserve build ... --name {name} --version {version}`",
            )
        if not force:
            mine = fixed.get(model, version)
            _check_build_record(model_dir / str(mine) / "build.json", model, mine)


def _check_shared(repository: Path, name: str, model: str, pin: int) -> None:
    if pin < 1 or not (repository / model / str(pin)).is_dir():
        raise VersionError(
            f"{name} shares {model} pinned to version {pin}, which {repository / model} does not hold",
            hint=f"rebuild {name} with `detserve build ... --name {name} --share-preprocessing`",
        )


def _check_build_record(path: Path, model: str, version: int) -> None:
    hint = "fix and rebuild it, or pass --force to serve it anyway"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise VersionError(f"{model} version {version}: check 'build record readable' failed: {path}: {e}", hint=hint) from e
    verification = record.get("verification") or {}
    if "ok" in verification and verification["ok"] is None:  # written by a --no-verify build: nothing was checked
        raise VersionError(
            f"{model} version {version}: check 'verification.ok' failed: it was built with --no-verify (nothing checked)",
            hint="rebuild it without --no-verify, or pass --force to serve it unchecked",
        )
    ok = verification.get("ok")
    if ok is False:
        raise VersionError(
            f"{model} version {version}: check 'verification.ok' failed: its build.json says verification failed",
            hint=hint,
        )


def models_of(repository: Path, name: str) -> Models:
    """The ensemble, the steps it owns, the steps it shares (fixed), and what other ensembles pin of its own steps."""
    ensemble_dir = _model_dir(repository, name)
    fixed = shared_steps(repository, name)
    dirs = [_model_dir(repository, m) for m in composing(name, repository) if m not in fixed]
    keep = {d.name: tuple(v for e, v in step_pins(repository, d.name).items() if e != name and v > 0) for d in dirs}
    steps = tuple((d, read_config(d)) for d in dirs)
    return Models(ensemble_dir, read_config(ensemble_dir), steps, frozenset(fixed), {m: k for m, k in keep.items() if k})


def plan(repository: Path, name: str, old: int, new: int) -> list[tuple[Path, mc.ModelConfig]]:
    """The loads of a promote on one server, in order (phases: ``detserve.ops.rollout``)."""
    return [(load.model_dir, load.config) for load in rollout_plan(models_of(repository, name), old, new)]


def read_history(repository: Path, name: str) -> list[dict[str, Any]]:
    path = repository / name / HISTORY
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text())["history"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise VersionError(f"unreadable rollout history {path}: {e}") from e


def _record(repository: Path, rollout: Rollout, action: str) -> None:
    history = [*read_history(repository, rollout.name), {**rollout.to_dict(), "action": action}]
    path = repository / rollout.name / HISTORY
    replace_file(path, json.dumps({"serving": rollout.new, "history": history}, indent=2) + "\n")


def _require_key(key: str | None) -> str:
    if not key:
        raise VersionError(
            f"promote and rollback load models through the admin API: no admin key ({ENV_VAR} is not set)",
            hint=f"set {ENV_VAR} (or {FILE_ENV}) to the server's admin key; a server started without one has "
            f"its admin API closed: restart it with {ENV_VAR} or {FILE_ENV} set, then set the same key here",
        )
    return key


def promote(
    url: str,
    key: str | None,
    repository: Path,
    name: str,
    version: int,
    force: bool = False,
    *,
    _action: str = "promote",
    on_step: Callable[[str], None] | None = None,
    fleet: Sequence[Target] | None = None,
) -> Rollout:
    """Make the ensemble ``name`` serve ``version`` on every server behind ``url`` (or on ``fleet``), without
    dropping a request: the phases of ``detserve.ops.rollout``."""
    key = _require_key(key)
    repository = Path(repository).resolve()
    check_version(repository, name, version, force)
    old = serving_version(repository, name)
    rollout = Rollout(name, old, version, force, dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    done = run_rollout(fleet if fleet is not None else targets(url, key), key, models_of(repository, name), old, version, on_step)
    _record(repository, rollout, _action)
    return replace(rollout, served_before=done.served_before, switch_window_s=done.switch_window_s)


def rollback(
    url: str,
    key: str | None,
    repository: Path,
    name: str,
    on_step: Callable[[str], None] | None = None,
    fleet: Sequence[Target] | None = None,
) -> Rollout:
    """Promote the version that the last promote (or rollback) of ``name`` came from."""
    repository = Path(repository).resolve()
    _model_dir(repository, name)
    history = read_history(repository, name)
    if not history:
        raise VersionError(f"no previous version of {name!r}: {repository / name / HISTORY} records no promote")
    previous = int(history[-1]["from"])
    return promote(url, key, repository, name, previous, _action="rollback", on_step=on_step, fleet=fleet)
