"""A canary promote with an automatic verdict: ``detserve promote NAME --version V --canary K --watch 5m``.

K targets (replicas of a ``--replicas N`` server, or endpoints: any list of ``ops/fleet.py`` targets)
are switched first (``rollout.run_stage``: phases 1 and 2 there, the old version still loaded beside,
the files still saying the old version); the rest keep the old version. Over the window the canary is
compared with the rest on:

- **failure ratio** of the ensemble's requests: failed / received, the increase of each target's own
  counters over the window (its metrics endpoint, as the server names it); failed = what the ensemble's
  first step received minus the ensemble's successes (``canary_metrics.parse_sample`` says why);
- **p99 per request** of the ensemble: ``nv_inference_request_summary_us{quantile="0.99"}`` read at the
  end of the window. The ensemble's request time is its queue + compute (every step) on the server, which is
  what the brief asks for as one quantile; a sum of the steps' p99s would overstate it. Triton's summaries
  slide (prometheus-cpp: the last 60 s), so the p99 covers the window's last minute. Where no summary is
  exported (``summary_latencies=false``), or the window is shorter than 60 s (the summary would still hold
  the warm-up's cold answers), the window's mean from the duration counters is compared instead, same rule;
- **detections per image**: no metric says how many boxes an answer had (Triton counts requests, not
  what they returned), so the command sends a fixed probe set (the five sample photographs,
  ``detserve/samples.py``) to every canary and baseline target, addressed one by one with the admin key
  (``detserve-replica``), in rounds through the window. Both sides see the same images, so the comparison
  does not depend on which live requests each happened to get, and it still works with no live traffic;
  a canary that answers nothing where the baseline finds boxes is caught even when it is fast.

A canary worse beyond the thresholds is switched back (``rollout.unstage``) and the command fails with
the comparison table; otherwise the promote continues over every target (``versions.promote``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from detserve.errors import DetserveError
from detserve.ops.admin import GRPC_HEADER
from detserve.ops.canary_metrics import Sample, metrics_urls, read_sample
from detserve.ops.fleet import Target, targets
from detserve.ops.gate_fleet import REPLICA_HEADER
from detserve.ops.rollout import run_stage, unstage
from detserve.ops.versions import Rollout, check_version, models_of, promote, serving_version

Echo = Callable[[str], None]
# Triton's latency summaries slide over the last 60 s (prometheus-cpp's max_age): a shorter window's p99
# would include requests from before it, such as the canary's cold first answers
SUMMARY_AGE_S = 60.0
PROBE_INTERVAL_S = 5.0  # a probe round every 5 s at most: ~1 request in flight, small beside live traffic


class CanaryError(DetserveError):
    """The canary was worse than the rest, or could not be judged: it was switched back."""


@dataclass(frozen=True)
class Thresholds:
    """How much worse than the rest the canary may be; the defaults reject an outage, not noise."""

    max_failure_increase: float = 0.01  # failure ratio, absolute: 1 % more failed requests than the rest
    max_p99_ratio: float = 1.5  # p99 per request up to 1.5 x the rest's ...
    p99_slack_ms: float = 50.0  # ... plus 50 ms: on a busy CPU one slow request moves a short window's p99
    max_detections_drop: float = 0.5  # mean detections per probe image down to half the rest's

    def __post_init__(self) -> None:
        # values outside these judge nothing: a drop of 2 never fires, a negative allowance rejects every canary
        for option, value in (
            ("--max-failure-increase", self.max_failure_increase),
            ("--max-detections-drop", self.max_detections_drop),
        ):
            if not 0.0 <= value <= 1.0:
                raise DetserveError(f"{option} must be in 0..1, got {value:g}")
        if self.max_p99_ratio < 1.0:
            raise DetserveError(
                f"--max-p99-ratio must be at least 1, got {self.max_p99_ratio:g}", hint="1: no slower than the rest"
            )
        if self.p99_slack_ms < 0:
            raise DetserveError(f"--p99-slack-ms must be at least 0, got {self.p99_slack_ms:g}")

    def describe(self) -> str:
        return (
            f"thresholds: failure ratio +{self.max_failure_increase:.3f}, p99 x{self.max_p99_ratio:g} + "
            f"{self.p99_slack_ms:g} ms, detections per image -{self.max_detections_drop:.0%}"
        )


@dataclass
class Side:
    """One side (canary or the rest) over the window."""

    label: str
    requests: int = 0
    failures: int = 0
    p99_ms: float | None = None  # the worst of the side's targets
    mean_ms: float | None = None
    detections: list[int] = field(default_factory=list)  # per probe answer
    probe_failures: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def failure_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    @property
    def mean_detections(self) -> float | None:
        return statistics.fmean(self.detections) if self.detections else None

    def row(self) -> list[str]:
        d = self.detections
        dist = f"{min(d)}/{statistics.median(d):g}/{max(d)}" if d else "-"
        empty = f"{sum(1 for x in d if x == 0) / len(d):.0%}" if d else "-"
        return [
            self.label, str(self.requests), f"{self.failures} ({self.failure_ratio:.1%})", _ms(self.p99_ms), _ms(self.mean_ms),
            f"{self.mean_detections:.2f}" if d else "-", dist, empty, str(self.probe_failures),
        ]  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    canary: Side
    rest: Side
    thresholds: Thresholds
    reasons: tuple[str, ...]  # why the canary is worse; empty: it passes

    @property
    def ok(self) -> bool:
        return not self.reasons

    def table(self) -> str:
        head = ["", "requests", "failed", "p99 ms", "mean ms", "det/img", "min/med/max", "empty", "probe err"]
        rows = [head, self.canary.row(), self.rest.row()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
        lines.append(self.thresholds.describe())
        lines += [f"note: {n}" for n in (*self.canary.notes, *self.rest.notes)]
        lines += [f"worse: {r}" for r in self.reasons] or ["verdict: the canary is not worse"]
        return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def judge(canary: Side, rest: Side, th: Thresholds) -> Verdict:
    reasons = []
    if canary.probe_failures and not rest.probe_failures:
        reasons.append(f"{canary.probe_failures} probe request(s) failed on the canary, none on the rest")
    if canary.failure_ratio > rest.failure_ratio + th.max_failure_increase:
        reasons.append(f"failure ratio {canary.failure_ratio:.1%} vs {rest.failure_ratio:.1%}")
    # the p99 where both sides export it, else the window's mean under the same rule
    p99 = canary.p99_ms is not None and rest.p99_ms is not None
    what, c_ms, r_ms = ("p99", canary.p99_ms, rest.p99_ms) if p99 else ("mean (no p99 exported)", canary.mean_ms, rest.mean_ms)
    if c_ms is not None and r_ms is not None and c_ms > r_ms * th.max_p99_ratio + th.p99_slack_ms:
        reasons.append(f"{what} {c_ms:.1f} ms vs {r_ms:.1f} ms")
    c, r = canary.mean_detections, rest.mean_detections
    if r is not None and r > 0 and (c is None or c < r * (1 - th.max_detections_drop)):
        reasons.append(f"detections per image {c or 0:.2f} vs {r:.2f}")
    if not canary.requests and not canary.detections:
        reasons.append("no request reached the canary in the window: nothing to judge")
    return Verdict(canary, rest, th, tuple(reasons))


def _window(side: Side, label: str, start: Sample | str, end: Sample | str) -> None:
    """Add one target's increase over the window to its side (a counter that went down was reset: a reload)."""
    if isinstance(start, str) or isinstance(end, str):
        side.notes.append(f"{label}: metrics unavailable ({start if isinstance(start, str) else end})")
        return
    # failed = what the first step received that the ensemble did not answer (see Sample.received)
    got = (start.received, end.received) if start.received is not None and end.received is not None else None
    reset = end.success < start.success or end.failure < start.failure or (got is not None and got[1] < got[0])
    base = Sample(0.0, 0.0, 0.0, None, 0.0) if reset else start
    ok = end.success - base.success
    failed = end.failure - base.failure if got is None else max(0.0, got[1] - (0.0 if reset else got[0]) - ok)
    side.requests += int(ok + failed)
    side.failures += int(failed)
    if ok + failed > 0:
        mean = (end.request_us - base.request_us) / (ok + failed) / 1000.0
        side.mean_ms = mean if side.mean_ms is None else max(side.mean_ms, mean)
    if end.p99_us is not None:
        p99 = end.p99_us / 1000.0
        side.p99_ms = p99 if side.p99_ms is None else max(side.p99_ms, p99)


def _probe(target: Target, key: str, model: str, images: Sequence[bytes], side: Side) -> None:
    """The probe set to one target, addressed to it with the key; each answer's detection count."""
    import tritonclient.grpc as grpcclient

    from clients.grpc_client import split_result

    headers = {GRPC_HEADER: key} | ({REPLICA_HEADER: str(target.replica)} if target.replica is not None else {})
    client = grpcclient.InferenceServerClient(target.url)
    try:
        for image in images:
            inp = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
            import numpy as np

            inp.set_data_from_numpy(np.array([[image]], dtype=np.object_))
            try:
                result = client.infer(model, [inp], headers=headers, client_timeout=60.0)
                side.detections.append(len(split_result(result)[0]))
            except Exception as e:  # a failed answer is the canary's fault or the rest's: counted, shown
                side.probe_failures += 1
                if len(side.notes) < 3:
                    side.notes.append(f"{side.label} probe on {target.label}: {str(e)[:160]}")
    finally:
        client.close()


def watch(
    canary: Sequence[Target], rest: Sequence[Target], key: str, model: str, entry: str, window_s: float, echo: Echo
) -> tuple[Side, Side]:
    """Probe both sides in rounds for ``window_s`` and read each target's metrics at both ends."""
    from detserve.samples import sample_files

    images = list(sample_files().values())
    groups = (("canary", list(canary)), ("rest", list(rest)))
    urls = {t: u for _, ts in groups for t, u in zip(ts, metrics_urls(ts), strict=True)}
    for t in urls:  # warm-up, outside the window: a version's first answers are cold (measured: ~1.1 s vs ~0.07 s)
        _probe(t, key, model, images, Side("warm-up"))
    start: dict[Target, Sample | str] = {t: read_sample(urls[t], model, entry) for t in urls}
    sides = {name: Side(name) for name, _ in groups}
    deadline = time.monotonic() + window_s
    rounds = 0
    while True:
        t0 = time.monotonic()
        for name, ts in groups:
            for t in ts:
                _probe(t, key, model, images, sides[name])
        rounds += 1
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(left, max(0.0, PROBE_INTERVAL_S - (time.monotonic() - t0))))
    echo(f"canary: watched {window_s:g} s, {rounds} probe round(s) of {len(images)} images per target")
    for name, ts in groups:
        for t in ts:
            _window(sides[name], t.label, start[t], read_sample(urls[t], model, entry))
    if window_s < SUMMARY_AGE_S:  # the summaries still hold the cold warm-up answers: compare the window's means
        for side in sides.values():
            side.p99_ms = None
        sides["canary"].notes.append(
            f"window under {SUMMARY_AGE_S:g} s: p99 not compared (Triton's summary covers the last 60 s)"
        )
    return sides["canary"], sides["rest"]


@dataclass(frozen=True)
class CanaryResult:
    verdict: Verdict
    rollout: Rollout


def run_canary(
    url: str,
    key: str | None,
    repository: Path,
    name: str,
    version: int,
    count: int,
    window_s: float,
    thresholds: Thresholds = Thresholds(),
    force: bool = False,
    on_step: Echo | None = None,
    fleet: Sequence[Target] | None = None,
) -> CanaryResult:
    """Switch ``count`` targets, watch, then promote everywhere or switch the canary back (CanaryError)."""
    echo = on_step or (lambda _: None)
    if not key:  # promote says what is missing
        promote(url, key, repository, name, version, force)
    assert key
    repository = Path(repository).resolve()
    check_version(repository, name, version, force)
    fleet = list(fleet) if fleet is not None else targets(url, key)
    if not 0 < count < len(fleet):
        raise CanaryError(
            f"--canary {count}: needs at least one target on each side; {len(fleet)} target(s) behind {url}",
            hint="a canary needs a server with --replicas 2 or more, or several --endpoints",
        )
    old = serving_version(repository, name)
    models = models_of(repository, name)
    echo(thresholds.describe())
    run_stage(fleet[:count], key, models, old, version, echo)
    try:
        verdict = judge(*watch(fleet[:count], fleet[count:], key, name, models.entry, window_s, echo), thresholds)
    except BaseException:  # interrupted (Ctrl-C) or unexpected: the canary must not stay switched
        unstage(fleet[:count], key, models, old, echo)
        raise
    echo(verdict.table())
    if not verdict.ok:
        failed = unstage(fleet[:count], key, models, old, echo)
        raise CanaryError(
            f"canary of {name} version {version} is worse than version {old}; switched back, every target serves "
            f"version {old}{' (not reached: ' + '; '.join(failed) + ')' if failed else ''}:\n{verdict.table()}",
            hint="widen a threshold (see `detserve promote --help`) only if the difference is expected",
        )
    try:
        return CanaryResult(verdict, promote(url, key, repository, name, version, force, on_step=echo, fleet=fleet))
    except DetserveError:  # the rest could not follow: the rollout switched them back; the canary goes back too
        unstage(fleet[:count], key, models, old, echo)
        raise
