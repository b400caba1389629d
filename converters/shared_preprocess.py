"""One pre-processing model per spec: ``detserve build --share-preprocessing``.

Every pre-processing stub imports torch (about 285 MB USS at rest, 415 MB under load: docs/performance.md,
"Memory per served model"), and two ensembles whose pre-processing configs are equal but for the name do
the same work. With the option, a build whose pre-processing config equals another ensemble's (same spec,
instances, limits, inputs) points its ensemble's first step at that model, pinned to the version it
serves, and writes no ``<name>_preprocess``; ``build.json`` records what it shares. With none to share it
builds its own, as without the option (the next build can then share it).

While another ensemble runs it, a pre-processing model's config is fixed: a build that would change it
(its owner rebuilt with another spec or options) is refused (``guard``). Rollouts keep the versions the
sharers pin (``detserve.ops.versions.models_of``).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detserve.errors import SpecError
from detserve.ops.versions import step_pins, versions_of
from detserve.pipeline import PREPROCESS, model_name, role_of
from detserve.tritonconfig import read_config, render


def comparable(config: Any) -> str:
    """The config without what names it or says which version serves: equal texts do equal work."""
    out = type(config)()
    out.CopyFrom(config)
    out.name = ""
    out.ClearField("version_policy")
    return render(out)


def served_version(repository: Path, model: str) -> int:
    """The version of ``model`` that serves: its owner ensemble's pin, else its version policy, else the latest."""
    owner = [v for e, v in step_pins(repository, model).items() if role_of(model, e) is not None and v > 0]
    if owner:
        return owner[0]
    policy = read_config(repository / model).version_policy
    if policy.HasField("specific") and policy.specific.versions:
        return int(max(policy.specific.versions))
    return versions_of(repository / model)[-1]


def find_shareable(repository: Path, config: Any, name: str, owners: Sequence[str] | None = None) -> tuple[str, int] | None:
    """(model, version) of another ensemble's pre-processing model whose config equals ``config``, or None
    (``owners``: only those ensembles', first match first; default: every ensemble of the repository)."""
    want = comparable(config)
    for owner in owners if owners is not None else sorted(p.parent.name for p in repository.glob("*/config.pbtxt")):
        path = repository / owner / "config.pbtxt"
        if owner == name or not path.is_file() or "ensemble" not in path.read_text():
            continue
        steps = read_config(path.parent).ensemble_scheduling.step
        first = steps[0].model_name if steps else ""
        mine = role_of(first, owner) == PREPROCESS and (repository / first / "config.pbtxt").is_file()
        if mine and comparable(read_config(repository / first)) == want:
            return first, served_version(repository, first)
    return None


def guard(repository: Path, config: Any, name: str) -> None:
    """Refuse a build that would change a pre-processing model other ensembles run."""
    model_dir = repository / config.name
    if not (model_dir / "config.pbtxt").is_file():
        return
    users = {e: v for e, v in step_pins(repository, config.name).items() if e != name}
    if users and comparable(read_config(model_dir)) != comparable(config):
        sharers = ", ".join(f"{e} (pins version {v})" for e, v in sorted(users.items()))
        raise SpecError(
            f"{config.name} is shared by {sharers}: this build would change its config, and with it what they serve",
            hint=f"build the change under another --name or into another repository; or rebuild {', '.join(sorted(users))} "
            "first without --share-preprocessing (each then owns its pre-processing model)",
        )


def share(repository: Path, configs: dict[str, Any], name: str, enabled: bool, fused: bool = False) -> dict[str, Any] | None:
    """Apply the option to a build's configs (model -> config, the ensemble ``name`` among them), in place:
    the ensemble's first step pointed at a shareable model and ``<name>_preprocess`` dropped. Returns
    what ``build.json`` records ({model, version}), or None when the build keeps its own."""
    pre = configs[model_name(name, PREPROCESS)]
    guard(repository, pre, name)
    # an ensemble that has its own (a rebuild of the owner) stays the owner: its sharers pin it
    mine = (repository / pre.name / "config.pbtxt").is_file()
    found = find_shareable(repository, pre, name) if enabled and not mine else None
    if found is None:
        return None
    model, version = found
    if fused:
        raise SpecError(
            f"--fused-out builds the fused layout from {name}'s own pre-processing model; this build would share {model}",
            hint="build the fused layout without --share-preprocessing (it runs one process per model anyway)",
        )
    del configs[pre.name]
    step = configs[name].ensemble_scheduling.step[0]
    step.model_name, step.model_version = model, version
    return {"model": model, "version": version}


def reshare(repository: Path, name: str, owners: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Point the built ensemble ``name`` at a shareable pre-processing model and remove its own (what the build
    option does, for a repository built without it: ``detserve memory --share-preprocessing`` on its copy)."""
    ensemble = read_config(repository / name)
    own = model_name(name, PREPROCESS)
    steps = ensemble.ensemble_scheduling.step
    if not steps or steps[0].model_name != own or any(e != name for e in step_pins(repository, own)):
        return None  # shares already, or is shared: nothing to do
    found = find_shareable(repository, read_config(repository / own), name, owners)
    if found is None:
        return None
    steps[0].model_name, steps[0].model_version = found
    target = repository / name / "config.pbtxt"
    target.unlink()  # may be a hard link to another repository's file: never write through it
    target.write_text(render(ensemble))
    shutil.rmtree(repository / own)
    return {"model": found[0], "version": found[1]}
