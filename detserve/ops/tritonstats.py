"""Triton's own per-model statistics: parsed, differenced, summed across model reloads.

Used by ``detserve status`` (totals since a model loaded) and by load tests (where the time goes:
queue vs compute, per composing model of the ensemble, and how well the dynamic batcher groups
requests). Both read cumulative counters on the server, so a measurement is the difference of
snapshots; a model reloaded mid-run (a killed stub brought back) restarts its counters, so a run
is polled every second and the increases are summed (``accumulate``) rather than failing.

Checked against Triton 2.51 (the embedded server):
- JSON int64 values arrive as strings; a model that has served nothing has no ``inference_count``,
  ``execution_count`` or ``last_inference`` keys and empty ``{}`` phases.
- queue/compute counts are per *request*; ``execution_count`` is per batch, so
  ``inference_count / execution_count`` is the average batch size the batcher achieved.
- ``fail.count`` of an ensemble counts each failed request twice, and a python-backend model whose
  response carries an error counts it as a success: trust the client's failure count.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from detserve.errors import ClientError, DetserveError

PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


class StatsError(DetserveError):
    """Server statistics cannot be read or do not form a valid measurement window."""


@dataclass(frozen=True)
class Phase:
    """One cumulative counter pair: how many requests, and their summed duration."""

    count: int = 0
    ns: int = 0


@dataclass(frozen=True)
class ModelStats:
    """One model version's cumulative statistics at one instant."""

    name: str
    version: str
    inference_count: int
    execution_count: int
    success: Phase
    fail: Phase
    queue: Phase
    compute_input: Phase
    compute_infer: Phase
    compute_output: Phase

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> ModelStats:
        """Parse one ``model_stats`` entry; absent keys are zero (a model that served nothing has none)."""
        phases = entry.get("inference_stats") or {}
        return cls(
            name=str(entry["name"]),
            version=str(entry.get("version", "")),
            inference_count=int(entry.get("inference_count", 0)),
            execution_count=int(entry.get("execution_count", 0)),
            **{p: _phase(phases.get(p)) for p in PHASES},
        )


def _phase(raw: Mapping[str, Any] | None) -> Phase:
    raw = raw or {}
    return Phase(count=int(raw.get("count", 0)), ns=int(raw.get("ns", 0)))


def parse_statistics(stats: Mapping[str, Any]) -> dict[str, ModelStats]:
    """Key by model name; a name loaded in several versions is keyed ``name@version`` so nothing is merged."""
    try:
        models = [ModelStats.from_json(e) for e in stats.get("model_stats", [])]
    except (KeyError, TypeError, ValueError) as e:
        raise StatsError(f"unexpected inference statistics from Triton: {e!r}") from e
    names = [m.name for m in models]
    return {(m.name if names.count(m.name) == 1 else f"{m.name}@{m.version}"): m for m in models}


def snapshot(client: Any) -> dict[str, ModelStats]:
    """All loaded models' statistics now, from a ``tritonclient.grpc.InferenceServerClient``."""
    try:
        raw = client.get_inference_statistics(as_json=True)
    except Exception as e:
        raise ClientError(f"cannot read inference statistics: {e}", hint="is the Triton server still running?") from e
    return parse_statistics(raw)


class SnapshotPoller:
    """Statistics snapshots every ``interval_s`` while a run goes on, for ``accumulate``.

    A model reloaded mid-run (a killed stub brought back) restarts its counters: with only a
    snapshot at each end of the run, everything it served before the reload would be lost. The
    first and last snapshots are taken in ``start``/``stop`` and must succeed; one in between that
    fails (the server busy restarting something) is skipped.
    """

    def __init__(self, grpc_url: str, interval_s: float = 1.0) -> None:

        self.grpc_url, self.interval_s = grpc_url, interval_s
        self.snapshots: list[dict[str, ModelStats]] = []
        self.skipped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="detserve-stats-poller", daemon=True)
        self._client: Any = None

    def start(self) -> None:
        import tritonclient.grpc as grpcclient

        self._client = grpcclient.InferenceServerClient(self.grpc_url)
        self.snapshots.append(snapshot(self._client))
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.snapshots.append(snapshot(self._client))
            except DetserveError:
                self.skipped += 1

    def stop(self) -> list[dict[str, ModelStats]]:
        """The last snapshot, then all of them in time order."""
        self._stop.set()
        self._thread.join()
        try:
            self.snapshots.append(snapshot(self._client))
        finally:
            with contextlib.suppress(Exception):
                self._client.close()
        return self.snapshots


@dataclass(frozen=True)
class PhaseSplit:
    """Where a model's time went over one measurement window; ``*_ms`` are averages per request.

    ``reset`` is true when the model's counters restarted inside the window (it was reloaded: a
    dead stub brought back, a rollout, a server restart); its numbers then sum the increments seen
    between snapshots, and what it served between the last snapshot and the reload is missing.
    """

    model: str
    requests: int
    failures: int
    inferences: int
    executions: int
    avg_batch_size: float
    request_ms: float
    queue_ms: float
    compute_input_ms: float
    compute_infer_ms: float
    compute_output_ms: float
    reset: bool = False

    @property
    def compute_ms(self) -> float:
        """Input + infer + output: the time an instance was busy per request."""
        return self.compute_input_ms + self.compute_infer_ms + self.compute_output_ms


def _avg_ms(phase: Phase) -> float:
    return phase.ns / phase.count / 1e6 if phase.count else 0.0


def _counters(s: ModelStats) -> list[int]:
    """Every cumulative counter of a snapshot, in a fixed order (``_from_counters`` reads it back)."""
    return [s.inference_count, s.execution_count, *(v for p in PHASES for v in (getattr(s, p).count, getattr(s, p).ns))]


def _from_counters(name: str, version: str, values: Sequence[int]) -> ModelStats:
    phases = {p: Phase(values[2 + 2 * i], values[3 + 2 * i]) for i, p in enumerate(PHASES)}
    return ModelStats(name, version, values[0], values[1], **phases)


def increase(before: ModelStats | None, after: ModelStats) -> tuple[ModelStats, bool]:
    """What a model served between two snapshots, and whether its counters restarted in between.

    Counters only grow while a model stays loaded; any one of them lower than before means the
    model was reloaded (its counters start again from zero), so ``after`` itself is the increase.
    A model absent from ``before`` (loaded in between) also counts from zero, without a reset.
    """
    if before is None:
        return after, False
    b, a = _counters(before), _counters(after)
    if any(x < y for x, y in zip(a, b, strict=True)):
        return after, True
    return _from_counters(after.name, after.version, [x - y for x, y in zip(a, b, strict=True)]), False


def _split(name: str, served: ModelStats, reset: bool) -> PhaseSplit:
    executions = served.execution_count
    return PhaseSplit(
        model=name,
        requests=served.success.count,
        failures=served.fail.count,
        inferences=served.inference_count,
        executions=executions,
        avg_batch_size=served.inference_count / executions if executions else 0.0,
        request_ms=_avg_ms(served.success),
        queue_ms=_avg_ms(served.queue),
        compute_input_ms=_avg_ms(served.compute_input),
        compute_infer_ms=_avg_ms(served.compute_infer),
        compute_output_ms=_avg_ms(served.compute_output),
        reset=reset,
    )


def accumulate(snapshots: Sequence[Mapping[str, ModelStats]]) -> dict[str, PhaseSplit]:
    """Per-model split over a window from its snapshots in time order (two or more).

    Each step between consecutive snapshots adds its increase (see ``increase``), so a model
    reloaded mid-window keeps what was seen before the reload and what it served after; only
    the requests between the last snapshot before the reload and the reload itself are lost.
    Snapshots taken often (``SnapshotPoller``) keep that gap small. Models in the last snapshot only.
    """
    if len(snapshots) < 2:
        raise StatsError(f"a measurement window needs at least 2 statistics snapshots, got {len(snapshots)}")
    totals: dict[str, list[int]] = {}
    resets: set[str] = set()
    seen = set(snapshots[0])
    for before, after in itertools.pairwise(snapshots):
        for name, a in after.items():
            served, reset = increase(before.get(name), a)
            if reset or (name in seen and name not in before):  # gone from a snapshot: unloaded, then loaded again
                resets.add(name)
            totals[name] = [x + y for x, y in zip(totals.get(name, [0] * len(_counters(a))), _counters(served), strict=True)]
        seen |= set(after)
    last = snapshots[-1]
    return {name: _split(name, _from_counters(name, last[name].version, totals[name]), name in resets) for name in last}


def delta(before: Mapping[str, ModelStats], after: Mapping[str, ModelStats]) -> dict[str, PhaseSplit]:
    """Per-model split between two snapshots; a model loaded mid-window starts from zero, one
    reloaded mid-window (counters went backwards) counts from zero and is marked ``reset``."""
    return accumulate([before, after])


def reset_notes(split: Mapping[str, PhaseSplit]) -> list[str]:
    """A report's note for each model whose counters restarted during the run."""
    return [
        f"Triton's counters of `{name}` restarted during the run (the model was reloaded: a stub died and was "
        "brought back, a rollout, or a server restart); its server-side row sums the statistics snapshots "
        "taken during the run and misses what it served between the last snapshot and the reload."
        for name, s in sorted(split.items())
        if s.reset
    ]
