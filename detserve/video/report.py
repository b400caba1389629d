"""The run's report, like the load test's: ``stream.json`` (machines), ``stream.md`` (people) and
``stream.png`` (per stream, latency p50/p99 and source/processed FPS over time)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detserve.video.metrics import StreamStats

COLUMNS = (
    ("stream", "stream"), ("state", "state"), ("read", "read"), ("answered", "answered"), ("dropped", "dropped"),
    ("failed", "failed"), ("decode_errors", "decode err"), ("reconnects", "reconnects"), ("stalls", "stalls"),
    ("source_fps_avg", "source fps"), ("processed_fps_avg", "processed fps"), ("latency_p50_ms", "p50 ms"),
    ("latency_p99_ms", "p99 ms"),
)  # fmt: skip


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def render_markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"# detserve stream: {doc['model']} at {doc['url']}",
        "",
        f"{len(doc['streams'])} stream(s), transport `{doc['transport']}`, {doc['seconds']:.1f} s; "
        f"latency is capture (frame decoded) to answer (detections back in this process).",
        "",
        "| " + " | ".join(h for _, h in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cell(s.get(k)) for k, _ in COLUMNS) + " |" for s in doc["streams"]]
    t = doc["totals"]
    lines += [
        "",
        f"Total: {t['answered']} frames answered ({t['processed_fps']:.1f} frames/s), {t['dropped']} dropped "
        f"(newest-frame policy on live sources), {t['failed']} failed, {t['bytes_per_frame']:.0f} bytes sent per frame.",
    ]
    return "\n".join(lines) + "\n"


def plot(stats: Sequence[StreamStats], path: Path) -> Path | None:
    """Latency p50/p99 and FPS over time per stream; None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_lat, ax_fps) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for s in stats:
        t = [p["t_s"] for p in s.timeline]
        for key, style in (("p50_ms", "-"), ("p99_ms", ":")):
            ys = [p[key] for p in s.timeline]
            if any(not math.isnan(y) for y in ys):
                ax_lat.plot(t, ys, style, label=f"{s.stream} {key[:3]}")
        ax_fps.plot(t, [p["processed_fps"] for p in s.timeline], "-", label=f"{s.stream} processed")
        ax_fps.plot(t, [p["source_fps"] for p in s.timeline], ":", label=f"{s.stream} source")
    ax_lat.set_ylabel("capture → answer, ms")
    ax_fps.set_ylabel("frames/s (5 s window)")
    ax_fps.set_xlabel("seconds since the stream started")
    for ax in (ax_lat, ax_fps):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def build(stats: Sequence[StreamStats], model: str, url: str, transport: str, seconds: float, bytes_sent: int) -> dict[str, Any]:
    summaries = [s.summary() for s in stats]
    answered = sum(s["answered"] for s in summaries)
    sent = sum(s["sent"] for s in summaries)
    return {
        "model": model,
        "url": url,
        "transport": transport,
        "seconds": seconds,
        "streams": summaries,
        # NaN (a second without answers) is not JSON: null
        "timelines": {s.stream: [{k: None if math.isnan(v) else v for k, v in p.items()} for p in s.timeline] for s in stats},
        "totals": {
            "answered": answered,
            "dropped": sum(s["dropped"] for s in summaries),
            "failed": sum(s["failed"] for s in summaries),
            "processed_fps": answered / seconds if seconds > 0 else 0.0,
            "bytes_per_frame": bytes_sent / sent if sent else 0.0,
        },
    }


def write_report(doc: dict[str, Any], stats: Sequence[StreamStats], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "stream.json", "md": out_dir / "stream.md"}
    files["json"].write_text(json.dumps(doc, indent=1, allow_nan=False))
    files["md"].write_text(render_markdown(doc))
    png = plot(stats, out_dir / "stream.png")
    if png is not None:
        files["png"] = png
    return files
