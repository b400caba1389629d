"""JPEG through ``IMAGE`` vs raw pixels through ``FRAMES`` on the same frames (issue 25 part 3).

The same moving-shapes frames (640x480, training/moving_shapes.py) go to one demo server either
JPEG-encoded by the client (quality 90, as ``detserve stream --transport jpeg`` sends them) or as
raw uint8 RGB. Per transport and number of streams (each stream one request in flight, closed
loop, as fast as it is answered): bytes per frame on the wire, the client's encode time and CPU per
frame, the server's CPU per frame (tritonserver and every python stub, from /proc), the
pre-processing step's own compute per frame (Triton's statistics: JPEG decode or none, then the
same resize), latency p50/p99 and frames/s. Run (it builds the demo repository if needed and
starts its own server):

    python -m loadtest.frames_vs_jpeg --repository /tmp/demo_repo --seconds 40 --rounds 4 --streams 1 4 --out frames.json
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

JPEG_QUALITY = 90


def _jpeg(rgb: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _request(transport: str, rgb: np.ndarray) -> tuple[Any, int]:
    import tritonclient.grpc as grpcclient

    if transport == "raw":
        pixels = rgb[None]
        inp = grpcclient.InferInput("FRAMES", list(pixels.shape), "UINT8")
        inp.set_data_from_numpy(pixels)
        return inp, pixels.nbytes
    blob = _jpeg(rgb)
    inp = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[blob]], dtype=np.object_))
    return inp, len(blob) + 4  # BYTES elements carry a 4-byte length


def _stream(url: str, model: str, transport: str, frames: list[np.ndarray], stop: threading.Event, out: dict[str, list]) -> None:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        i = 0
        while not stop.is_set():
            t0 = time.perf_counter()
            inp, nbytes = _request(transport, frames[i % len(frames)])
            t1 = time.perf_counter()
            client.infer(model, [inp])
            t2 = time.perf_counter()
            out["bytes"].append(nbytes)
            out["encode_ms"].append((t1 - t0) * 1e3)
            out["latency_ms"].append((t2 - t0) * 1e3)
            i += 1


def _compute_ns(client: Any, model: str) -> tuple[int, int]:
    stats = client.get_inference_statistics(model).model_stats[0].inference_stats
    return int(stats.success.count), int(stats.compute_input.ns + stats.compute_infer.ns + stats.compute_output.ns)


def run_one(server: Any, model: str, transport: str, streams: int, seconds: float, frames: list[np.ndarray]) -> dict[str, Any]:
    import resource

    import tritonclient.grpc as grpcclient

    from detserve.ops.versions import composing
    from loadtest.procstats import CpuSampler

    url = server.options.grpc_url
    pre = composing(model, server.options.repository)[0]  # the ensemble's first step: shared or its own
    out: dict[str, list] = {"bytes": [], "encode_ms": [], "latency_ms": []}
    stop = threading.Event()
    threads = [threading.Thread(target=_stream, args=(url, model, transport, frames, stop, out)) for _ in range(streams)]
    with grpcclient.InferenceServerClient(url) as admin, CpuSampler(server.process.pid) as cpu:
        n0, ns0 = _compute_ns(admin, pre)
        me0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.time()
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        t1 = time.time()
        me1 = resource.getrusage(resource.RUSAGE_SELF)
        n1, ns1 = _compute_ns(admin, pre)
    frames_done = len(out["latency_ms"])
    server_cpu = sum(cpu.series.window(t0, t1).values())
    client_cpu = (me1.ru_utime + me1.ru_stime) - (me0.ru_utime + me0.ru_stime)
    return {
        "transport": transport,
        "streams": streams,
        "seconds": t1 - t0,
        "frames": frames_done,
        "bytes": float(np.sum(out["bytes"])),
        "encode_ms": float(np.sum(out["encode_ms"])),
        "client_cpu_s": client_cpu,
        "server_cpu_s": server_cpu,
        "preprocess_ns": ns1 - ns0,
        "preprocess_requests": n1 - n0,
        "latencies_ms": out["latency_ms"],
    }


def merged(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one transport and stream count (interleaved with the other transport's, so that the load
    of whatever else runs on the machine falls on both alike) -> its figures per frame."""
    frames = sum(r["frames"] for r in rounds)
    total = {k: sum(r[k] for r in rounds) for k in ("seconds", "bytes", "encode_ms", "client_cpu_s", "server_cpu_s")}
    lat = np.concatenate([np.asarray(r["latencies_ms"]) for r in rounds])
    return {
        "transport": rounds[0]["transport"],
        "streams": rounds[0]["streams"],
        "rounds": len(rounds),
        "frames": frames,
        "frames_per_s": frames / total["seconds"],
        "bytes_per_frame": total["bytes"] / frames,
        "client_encode_ms": total["encode_ms"] / frames,
        "client_cpu_ms_per_frame": total["client_cpu_s"] / frames * 1e3,
        "server_cpu_ms_per_frame": total["server_cpu_s"] / frames * 1e3,
        "preprocess_compute_ms": sum(r["preprocess_ns"] for r in rounds)
        / max(sum(r["preprocess_requests"] for r in rounds), 1)
        / 1e6,
        "latency_p50_ms": float(np.percentile(lat, 50)),
        "latency_p99_ms": float(np.percentile(lat, 99)),
    }


def compare(
    server: Any, model: str, frames: list[np.ndarray], streams: list[int], seconds: float, rounds: int
) -> list[dict[str, Any]]:
    """Both transports per stream count, ``rounds`` alternating rounds of ``seconds / rounds`` each."""
    rows = []
    for n in streams:
        got: dict[str, list[dict[str, Any]]] = {"jpeg": [], "raw": []}
        for i in range(rounds):
            for transport in ("jpeg", "raw") if i % 2 == 0 else ("raw", "jpeg"):
                got[transport].append(run_one(server, model, transport, n, seconds / rounds, frames))
        rows += [merged(got["jpeg"]), merged(got["raw"])]
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| transport | streams | frames/s | bytes/frame | client encode ms | client CPU ms/frame | server CPU ms/frame | preprocess ms | p50 ms | p99 ms |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['transport']} | {r['streams']} | {r['frames_per_s']:.1f} | {r['bytes_per_frame']:,.0f} | "
            f"{r['client_encode_ms']:.2f} | {r['client_cpu_ms_per_frame']:.1f} | {r['server_cpu_ms_per_frame']:.1f} | "
            f"{r['preprocess_compute_ms']:.2f} | {r['latency_p50_ms']:.1f} | {r['latency_p99_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, required=True, help="the demo repository (built here when empty)")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds per transport (cancels the machine's drift)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from detserve.ops.server import running_server
    from loadtest.bench_model import DEMO_NAME, demo_build_request
    from training.moving_shapes import MovingShapes, VideoConfig

    if not (args.repository / DEMO_NAME / "config.pbtxt").is_file():
        from converters.repository import build_repository

        build_repository(demo_build_request(args.repository))
    video = MovingShapes(VideoConfig(frames=50))
    frames = [video.frame(t)[0] for t in range(50)]
    with running_server(args.repository) as server:
        run_one(server, DEMO_NAME, "raw", 1, 3.0, frames)  # warm-up: first requests load lazily
        rows = compare(server, DEMO_NAME, frames, args.streams, args.seconds, args.rounds)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
