"""A load test's result as JSON (for machines), markdown (for people) and a latency/throughput plot.

The markdown puts the measured throughput beside the naive ``1000 / ms per inference`` and the
server's own time split, so a reader sees *why* the number is what it is (queueing, batching,
which composing model dominates) and on what machine it was measured.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from loadtest.stats import PERCENTILES, PhaseSplit, Window, stability

PCT_KEYS = tuple(f"p{q}" for q in PERCENTILES)
SPLIT_NOTE = (
    "Per-request averages from Triton's statistics over the run. `failures` is Triton's own counter: "
    "Triton 2.51 counts a failed ensemble request twice and python-backend models count an error "
    "response as a success, so the client-side failure count above is the one to trust."
)
NAIVE_NOTE = (
    "The naive estimate assumes one request at a time, no queueing and no overlap between pipeline "
    "stages; the measured number differs by what batching, concurrency and CPU contention do."
)


@dataclass
class LoadReport:
    """Everything one load test (fixed load, or a sweep of concurrency levels) established.

    ``users`` is the number of concurrent closed-loop clients (the peak, for a sweep). ``steps`` has
    one dict per sweep level: ``users``, ``throughput_rps``, ``p50``, ``p90``, ``p95``, ``p99`` (ms).
    ``naive_throughput_rps`` of 0 means the server statistics gave no compute time to base it on.
    """

    title: str
    model: str
    users: int
    duration_s: float
    requests: int
    failures: int
    throughput_rps: float
    latency_ms: dict[str, float]
    windows: list[Window]
    stable: bool
    server_split: dict[str, PhaseSplit]
    naive_throughput_rps: float
    fingerprint: dict[str, Any]
    steps: list[dict[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stability_n: int = 3
    stability_tolerance: float = 0.10

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; each split also carries its ``compute_ms`` so readers need not add it up."""
        out = asdict(self)
        for name, split in self.server_split.items():
            out["server_split"][name]["compute_ms"] = split.compute_ms
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LoadReport:
        """Read back a ``report.json`` (to re-render or compare runs)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        values["windows"] = [Window.from_dict(w) for w in raw.get("windows", [])]
        split_fields = {f.name for f in fields(PhaseSplit)}
        values["server_split"] = {
            name: PhaseSplit(**{k: v for k, v in s.items() if k in split_fields})
            for name, s in raw.get("server_split", {}).items()
        }
        return cls(**values)

    def stability_verdict(self) -> str:
        return stability(self.windows, self.stability_n, self.stability_tolerance)[1]


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _step_pct(step: Mapping[str, float], key: str) -> float | None:
    """Sweep steps may name percentiles ``p95`` or ``p95_ms``."""
    value = step.get(key, step.get(f"{key}_ms"))
    return None if value is None else float(value)


def _headline(r: LoadReport) -> list[str]:
    rows = [
        ["model", f"`{r.model}`"],
        ["concurrent users", str(r.users)],
        ["duration", f"{r.duration_s:.1f} s"],
        ["requests", f"{r.requests:,}"],
        ["failures", f"{r.failures:,} ({r.failures / r.requests:.1%})" if r.requests else str(r.failures)],
        ["throughput", f"{r.throughput_rps:.2f} req/s"],
    ]
    rows += [[f"latency {k}", f"{_fmt(r.latency_ms.get(k))} ms"] for k in PCT_KEYS]
    return _table(["metric", "value"], rows)


def _split_order(r: LoadReport) -> list[str]:
    """The ensemble first, then its composing models in pipeline order, then anything else."""
    order = [r.model] + [f"{r.model}_{s}" for s in ("preprocess", "core", "postprocess")]
    known = [n for n in order if n in r.server_split]
    return known + sorted(n for n in r.server_split if n not in order)


def _split_section(r: LoadReport) -> list[str]:
    lines = ["## Server-side split", ""]
    if not r.server_split:
        return [*lines, "No server statistics were recorded.", ""]
    header = [
        "model",
        "requests",
        "failures",
        "avg batch",
        "queue ms",
        "compute input ms",
        "compute infer ms",
        "compute output ms",
    ]
    rows = []
    for name in _split_order(r):
        s = r.server_split[name]
        label = f"`{name}` (ensemble)" if name == r.model else f"`{name}`"
        label += " (reloaded mid-run, see notes)" if s.reset else ""
        row = [label, f"{s.requests:,}", f"{s.failures:,}", _fmt(s.avg_batch_size, 2)]
        rows.append(row + [_fmt(v, 2) for v in (s.queue_ms, s.compute_input_ms, s.compute_infer_ms, s.compute_output_ms)])
    return [*lines, *_table(header, rows), "", SPLIT_NOTE, ""]


def _throughput_section(r: LoadReport) -> list[str]:
    lines = ["## Measured vs naive throughput", ""]
    if r.naive_throughput_rps <= 0:
        return [*lines, f"measured: {r.throughput_rps:.2f} req/s; naive estimate: not available (no server compute time)", ""]
    ratio = r.throughput_rps / r.naive_throughput_rps
    rows = [
        ["measured", f"{r.throughput_rps:.2f}"],
        ["naive (1000 / compute ms per inference)", f"{r.naive_throughput_rps:.2f}"],
        ["measured / naive", f"{ratio:.2f}×"],
    ]
    return [*lines, *_table(["", "req/s"], rows), "", NAIVE_NOTE, ""]


def _steps_section(r: LoadReport) -> list[str]:
    if not r.steps:
        return []
    header = ["users", "throughput req/s", *(f"{k} ms" for k in PCT_KEYS)]
    rows = [
        [str(int(s.get("users", 0))), _fmt(s.get("throughput_rps"), 2), *(_fmt(_step_pct(s, k)) for k in PCT_KEYS)]
        for s in r.steps
    ]
    return ["## Concurrency sweep", "", *_table(header, rows), ""]


def _stability_section(r: LoadReport) -> list[str]:
    lines = ["## Stability", "", f"**{r.stability_verdict()}**", ""]
    if not r.windows:
        return lines
    header = ["window", "start s", "throughput req/s", "p95 ms"]
    rows = [[str(i + 1), _fmt(w.start_s), _fmt(w.throughput, 2), _fmt(w.p95_ms)] for i, w in enumerate(r.windows)]
    return [*lines, *_table(header, rows), ""]


def _flatten(info: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Nested fingerprint entries (packages, one dict per GPU) as dotted rows."""
    rows: list[tuple[str, str]] = []
    for key, value in info.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += _flatten(value, f"{name}.")
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                rows += _flatten(item, f"{name}[{i}].")
        else:
            rows.append((name, "not installed" if value is None else str(value)))
    return rows


def _fingerprint_section(r: LoadReport) -> list[str]:
    rows = [[k, v.replace("|", "\\|")] for k, v in _flatten(r.fingerprint)]
    return ["## Environment", "", *_table(["", "value"], rows), ""]


def render_markdown(report: LoadReport) -> str:
    """The human-readable report: headline, server split, naive comparison, sweep, stability, environment."""
    lines = [f"# {report.title}", "", *_headline(report), ""]
    lines += _split_section(report) + _throughput_section(report) + _steps_section(report) + _stability_section(report)
    if report.notes:
        lines += ["## Notes", "", *(f"- {n}" for n in report.notes), ""]
    lines += _fingerprint_section(report)
    return "\n".join(lines)


def _plot_points(report: LoadReport) -> tuple[str, list[float], dict[str, list[float | None]], list[str]]:
    """One point per sweep step, else one per window: (what, throughputs, latencies by percentile, labels)."""
    if report.steps:
        xs = [float(s.get("throughput_rps", 0.0)) for s in report.steps]
        ys = {k: [_step_pct(s, k) for s in report.steps] for k in PCT_KEYS}
        return "sweep step", xs, ys, [f"{int(s.get('users', 0))}u" for s in report.steps]
    xs = [w.throughput for w in report.windows]
    ys = {k: [getattr(w, f"{k}_ms") for w in report.windows] for k in PCT_KEYS}
    return "window", xs, ys, [f"w{i + 1}" for i in range(len(report.windows))]


def plot_latency(report: LoadReport, path: Path) -> Path:
    """Latency percentiles against throughput; the knee shows where added load only adds queueing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on the Agg canvas: no pyplot global state, no display needed, safe beside Locust.
    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    what, xs, ys, labels = _plot_points(report)
    for key, values in ys.items():
        pts = [(x, y) for x, y in zip(xs, values, strict=True) if y is not None]
        if pts:
            # a sweep is a curve (load rises step by step); windows are samples of one load level
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="-" if report.steps else "none", label=key)
    for x, y, label in zip(xs, ys["p99"], labels, strict=True):
        if y is not None and report.steps:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if not any(v is not None for values in ys.values() for v in values):
        ax.text(0.5, 0.5, "no completed requests", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(title="latency")
    ax.set(
        xlabel="throughput (req/s)", ylabel="latency (ms)", title=f"{report.model}: latency vs throughput (one point per {what})"
    )
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_report(report: LoadReport, out_dir: Path) -> dict[str, Path]:
    """``report.json``, ``report.md`` and ``latency.png`` in ``out_dir`` (created if missing)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md", "plot": out_dir / "latency.png"}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    paths["markdown"].write_text(render_markdown(report))
    plot_latency(report, paths["plot"])
    return paths
