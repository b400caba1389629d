"""The served GPU pipeline checked on a GPU machine in a few minutes (issue 28, part 4); run by gpu_serve_check.sh.

Steps, each written to OUT/gpu_serve_check.json as soon as it ends (a step that fails is recorded and
the next runs), then OUT/gpu_serve_check.md:
  environment   python, torch, torchvision, numpy, the GPU
  pytest_gpu    the GPU tests (``pytest -m gpu``; they skip themselves without CUDA)
  preprocess    the GPU pre-processing bound: runtime/gpu_preprocess.py on the device vs the CPU tensor of
                the same file, max |delta| per resize mode (0 on a CPU device: the function is the same)
  build         the demo detector, ``--target python-torch --device gpu`` (``--dry-run``: the CPU build)
  parity        the embedded server (no gate: its private gRPC socket) vs eager PyTorch on the same device,
                order-free (detserve.verification.matching.check_parity), per image
  load          closed-loop users 1..64: served vs eager PyTorch (threads sharing one model on the device):
                images/s, latency p50/p99, and the server-side split per composing model (Triton statistics)
  targets       served >= 5x eager throughput at the most users; served p99 at 32 users <= 3x unloaded p50

``--dry-run`` runs every step on the CPU with tiny loads, so that only the device part can fail there.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAME = "demo"
DETECTOR = "ssdlite320_mobilenet_v3_large"
CHECKPOINT = ROOT / "detserve" / "weights" / "demo_ssdlite320_shapes.pt"


def gpu_test_files() -> list[str]:
    """The unit test files with GPU tests, but TensorRT's (no TensorRT on the GPU machine: gpu_check.sh's part)."""
    files = sorted((ROOT / "tests" / "unit").glob("test_*.py"))
    return [str(f.relative_to(ROOT)) for f in files if "tensorrt" not in f.name and "mark.gpu" in f.read_text()]


class Results:
    """The JSON written after every step; the Markdown summary at the end."""

    def __init__(self, out: Path, dry_run: bool) -> None:
        self.out = out
        self.data: dict[str, Any] = {"dry_run": dry_run, "steps": {}}
        out.mkdir(parents=True, exist_ok=True)

    def step(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        t0 = time.monotonic()
        print(f"== {name}", flush=True)
        try:
            result: dict[str, Any] = {"ok": True, **fn()}
        except Exception as e:  # recorded, the next step runs
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        result["seconds"] = round(time.monotonic() - t0, 1)
        self.data["steps"][name] = result
        (self.out / "gpu_serve_check.json").write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        print(f"   {'ok' if result['ok'] else 'FAILED: ' + result['error']} ({result['seconds']} s)", flush=True)
        return result if result["ok"] else None


def environment(device: str) -> dict[str, Any]:
    import numpy
    import torch
    import torchvision

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__}
    env |= {"numpy": numpy.__version__, "device": device, "cuda": torch.version.cuda}
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA GPU")
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def pytest_gpu(out: Path) -> dict[str, Any]:
    files = gpu_test_files()
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    (out / "pytest_gpu.txt").write_text(run.stdout + run.stderr)
    tail = (run.stdout.strip().splitlines() or [""])[-1]
    if run.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest -m gpu exit {run.returncode}: {tail}")
    return {"files": files, "summary": tail}


def preprocess_bound(device: str, images: dict[str, bytes]) -> dict[str, Any]:
    """max |GPU tensor - CPU tensor| per resize mode over the images (same shapes and sizes required)."""
    from detserve.runtime.gpu_preprocess import preprocess_on
    from detserve.runtime.imaging import decode_image
    from detserve.runtime.preprocess import preprocess
    from tests.unit.test_gpu_preprocess import SPECS

    rows = {}
    for mode, spec in SPECS.items():
        worst, where = 0.0, ""
        for name, blob in images.items():
            ref = preprocess(decode_image(blob, 10**9), spec)
            (ours,) = preprocess_on([blob], spec, device)
            if ours.tensor.shape != ref.tensor.shape or ours.resized_hw != ref.resized_hw:
                raise RuntimeError(f"{mode} {name}: shape {tuple(ours.tensor.shape)} vs {tuple(ref.tensor.shape)}")
            d = float((ours.tensor.cpu() - ref.tensor).abs().max())
            if d >= worst:
                worst, where = d, name
        rows[mode] = {"max_abs_delta": worst, "worst_image": where, "in_uint8_levels": worst * 255 * min(spec.image_std)}
    return {"modes": rows}


def build(out: Path, gpu: bool) -> dict[str, Any]:
    """The demo detector on the torch core target; ``--device gpu`` where the CLI has it (B24's option)."""
    cli = [sys.executable, "-m", "detserve.app.cli"]
    helptext = subprocess.run([*cli, "build", "--help"], cwd=ROOT, capture_output=True, text=True, check=False).stdout
    target = "python-torch" if "python-torch" in helptext else "python-onnxruntime"
    cmd = [*cli, "build", DETECTOR, "--repository", str(out / "repo"), "--name", NAME, "--num-classes", "6"]
    cmd += ["--checkpoint", str(CHECKPOINT), "--target", target]
    blocked = None
    if gpu and "--device" in helptext:
        cmd += ["--device", "gpu"]
    elif gpu:
        blocked = "this checkout's `detserve build` has no --device option: the pipeline is served with CPU steps"
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    (out / "build.txt").write_text(" ".join(cmd) + "\n" + run.stdout + run.stderr)
    if run.returncode != 0:
        raise RuntimeError(f"build exit {run.returncode} (build.txt): {(run.stderr.strip().splitlines() or [''])[-1]}")
    return {"command": " ".join(cmd[2:]), "target": target, "device_option": "--device" in cmd, "blocked": blocked}


def test_images(out: Path, n: int) -> dict[str, bytes]:
    """The sample photos plus generated shapes test images, each as PNG and as JPEG (q95: the device decode)."""
    import io

    from PIL import Image

    from detserve.runtime.samples import sample_files

    folder = out / "shapes_test"
    cmd = [sys.executable, "-m", "detserve.app.cli", "dataset", "test", str(folder), "--limit", str(n)]
    subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True, timeout=120)
    images = dict(sample_files())
    for path in sorted((folder / "images").iterdir())[:n]:
        images[path.name] = path.read_bytes()
        buf = io.BytesIO()
        Image.open(path).convert("RGB").save(buf, "JPEG", quality=95)
        images[path.stem + ".jpg"] = buf.getvalue()
    return images


class Eager:
    """The served weights as eager PyTorch on ``device``: torchvision's own ``model([image])``."""

    def __init__(self, repo: Path, device: str) -> None:
        import torch

        from detserve.verification.reference import build_record, reference_model

        _, record = build_record(repo, NAME)
        self.model = reference_model(record).model.to(device).eval()
        self.device, self.torch = device, torch

    def detect(self, blob: bytes) -> tuple[Any, Any, Any]:
        from detserve.runtime.imaging import decode_image

        rgb = decode_image(blob, 10**9)
        with self.torch.no_grad():
            x = self.torch.from_numpy(rgb).to(self.device).permute(2, 0, 1).float().div(255.0)
            out = self.model([x])[0]
        return tuple(out[k].cpu().numpy() for k in ("boxes", "scores", "labels"))  # type: ignore[return-value]


def parity(client: Any, eager: Eager, images: dict[str, bytes], gpu: bool) -> dict[str, Any]:
    """Served vs eager per image, order-free. On a GPU the two inputs differ by the pre-processing bound
    (nvJPEG and CUDA's resize vs Pillow and torch on the CPU): looser score/IoU rules there, stated."""
    from detserve.verification.matching import check_parity

    rules = (
        {"score_floor": 0.05, "iou_min": 0.95, "score_tol": 2e-2}
        if gpu
        else {"score_floor": 0.05, "iou_min": 0.99, "score_tol": 1e-3}
    )
    rows, failures = [], []
    for name, blob in images.items():
        d = client.detect(blob)
        check = check_parity((d.boxes, d.scores, d.labels), eager.detect(blob), **rules)
        rows.append({"image": name, "total": check.total, "matched": check.matched, "max_score_delta": check.max_score_delta,
                     "max_box_delta": check.max_box_delta, "min_iou": check.min_iou, "failures": check.failures[:3]})  # fmt: skip
        failures += [f"{name}: {f}" for f in check.failures[:3]]
    if failures:
        raise RuntimeError(f"{len(failures)} parity failure(s), first: {failures[0]}")
    return {"rules": rules, "images": rows}


def _closed_loop(call: Callable[[int, int], object], users: int, seconds: float) -> dict[str, Any]:
    """``users`` threads calling ``call(user, i)`` back to back for ``seconds``: images/s and latency percentiles."""
    import numpy as np

    latencies: list[list[float]] = [[] for _ in range(users)]
    errors: list[str] = []
    stop_at = time.monotonic() + seconds

    def user(u: int) -> None:
        i = 0
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            try:
                call(u, i)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
                return
            latencies[u].append((time.monotonic() - t0) * 1000)
            i += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=user, args=(u,)) for u in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    every = np.array([x for lat in latencies for x in lat]) if any(latencies) else np.zeros(1)
    return {"users": users, "requests": int(sum(len(lat) for lat in latencies)), "images_per_s": sum(len(lat) for lat in latencies) / wall,
            "p50_ms": float(np.percentile(every, 50)), "p99_ms": float(np.percentile(every, 99)), "errors": errors[:3]}  # fmt: skip


def _split(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per composing model over a step: mean ms per request in queue / compute input / infer / output, mean batch."""
    out = {}
    for name, a in after.items():
        b = before.get(name)
        n = a.success.count - (b.success.count if b else 0)
        if n <= 0 or name == NAME:
            continue
        row = {
            p: (getattr(a, p).ns - (getattr(b, p).ns if b else 0)) / n / 1e6
            for p in ("queue", "compute_input", "compute_infer", "compute_output")
        }
        execs = a.execution_count - (b.execution_count if b else 0)
        row["mean_batch"] = (a.inference_count - (b.inference_count if b else 0)) / max(execs, 1)
        out[name] = {k: round(v, 3) for k, v in row.items()}
    return out


def _send(clients: list[Any], pool: list[bytes], u: int, i: int) -> object:
    return clients[u].detect(pool[(u + i) % len(pool)])


def load(url: str, eager: Eager, images: dict[str, bytes], users: list[int], seconds: float) -> dict[str, Any]:
    import tritonclient.grpc as grpcclient

    from clients.grpc_client import DetectorClient
    from detserve.ops.tritonstats import snapshot

    pool = [b for n, b in images.items() if n.endswith(".jpg")]  # JPEGs: the device decode path
    stats_client = grpcclient.InferenceServerClient(url)
    served, baseline = [], []
    for n in users:
        clients = [DetectorClient(url, NAME) for _ in range(n)]
        before = snapshot(stats_client)
        row = _closed_loop(functools.partial(_send, clients, pool), n, seconds)
        row["server_split_ms"] = _split(before, snapshot(stats_client))
        served.append(row)
        for c in clients:
            c.close()
        baseline.append(_closed_loop(lambda u, i: eager.detect(pool[(u + i) % len(pool)]), n, seconds))
        print(f"   {n:>3} users: served {served[-1]['images_per_s']:.1f} img/s p99 {served[-1]['p99_ms']:.1f} ms | "
              f"eager {baseline[-1]['images_per_s']:.1f} img/s p99 {baseline[-1]['p99_ms']:.1f} ms", flush=True)  # fmt: skip
    stats_client.close()
    return {"served": served, "eager": baseline, "seconds_per_step": seconds, "images": len(pool)}


def targets(result: dict[str, Any]) -> dict[str, Any]:
    served, eager = result["served"], result["eager"]
    ratio = served[-1]["images_per_s"] / max(eager[-1]["images_per_s"], 1e-9)
    at32 = next((r for r in served if r["users"] == 32), served[-1])
    p99_ratio = at32["p99_ms"] / max(served[0]["p50_ms"], 1e-9)
    return {"throughput_ratio": round(ratio, 2), "throughput_target_met": ratio >= 5.0, "p99_users": at32["users"],
            "p99_over_unloaded_p50": round(p99_ratio, 2), "latency_target_met": p99_ratio <= 3.0}  # fmt: skip


def pytriton_binary_only() -> None:
    """detserve needs only the tritonserver binary and stubs inside nvidia-pytriton's wheel, found through
    ``pytriton.__file__``; the package's Python API imports pyzmq, sh and geventhttpclient, which the GPU
    machine lacks and which are not carried. There, ``pytriton`` is a bare module pointing at its files."""
    try:
        import pytriton  # noqa: F401
    except ImportError:
        import importlib.util
        import types

        spec = importlib.util.find_spec("pytriton")
        if spec is None or spec.origin is None:
            raise
        module = types.ModuleType("pytriton")
        module.__file__ = spec.origin
        sys.modules["pytriton"] = module


def render(data: dict[str, Any]) -> str:
    """The Markdown summary of the JSON (tables of the parity, the bound and the load sweep)."""
    steps = data["steps"]
    lines = [f"# GPU serving check{' (dry run, CPU)' if data['dry_run'] else ''}", ""]
    lines += [f"- {name}: {'ok' if s['ok'] else 'FAILED ' + s['error']} ({s['seconds']} s)" for name, s in steps.items()]
    env = steps.get("environment", {})
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("ok", "seconds"))]
    if steps.get("build", {}).get("blocked"):
        lines += ["", f"**Blocked**: {steps['build']['blocked']}"]
    if "modes" in steps.get("preprocess", {}):
        lines += [
            "",
            "## Pre-processing: device tensor vs CPU tensor of the same file",
            "",
            "| mode | max abs delta | uint8 levels | worst image |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {m} | {r['max_abs_delta']:.3g} | {r['in_uint8_levels']:.2f} | {r['worst_image']} |"
            for m, r in steps["preprocess"]["modes"].items()
        ]
    if "images" in steps.get("parity", {}):
        p = steps["parity"]
        lines += [
            "",
            f"## Parity: served vs eager PyTorch, order-free ({p['rules']})",
            "",
            "| image | matched/total | max abs dscore | max box delta px | min IoU |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['image']} | {r['matched']}/{r['total']} | {r['max_score_delta']:.2e} | {r['max_box_delta']:.3f} | {r['min_iou']:.4f} |"
            for r in p["images"]
        ]
    if "served" in steps.get("load", {}):
        ld = steps["load"]
        lines += ["", f"## Load: closed loop, {ld['seconds_per_step']} s per step, {ld['images']} JPEGs", ""]
        lines += [
            "| users | served img/s | p50 ms | p99 ms | eager img/s | p50 ms | p99 ms | served/eager |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s, e in zip(ld["served"], ld["eager"], strict=True):
            lines.append(f"| {s['users']} | {s['images_per_s']:.1f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {e['images_per_s']:.1f} | "
                         f"{e['p50_ms']:.1f} | {e['p99_ms']:.1f} | {s['images_per_s'] / max(e['images_per_s'], 1e-9):.2f} |")  # fmt: skip
        last = ld["served"][-1]
        lines += [
            "",
            f"Server-side split at {last['users']} users (ms per request; mean batch):",
            "",
            "| model | queue | input | infer | output | batch |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {m} | {r['queue']} | {r['compute_input']} | {r['compute_infer']} | {r['compute_output']} | {r['mean_batch']} |"
            for m, r in last["server_split_ms"].items()
        ]
    if "throughput_ratio" in steps.get("targets", {}):
        t = steps["targets"]
        lines += ["", f"Targets: served/eager throughput {t['throughput_ratio']}x (>= 5: {t['throughput_target_met']}); "
                  f"p99 at {t['p99_users']} users / unloaded p50 {t['p99_over_unloaded_p50']}x (<= 3: {t['latency_target_met']})"]  # fmt: skip
    return "\n".join(lines) + "\n"


# GPU tensors between the stubs and Triton travel through its CUDA memory pool (64 MiB by default): one
# 64-user step of images + raw core outputs in flight can exceed it, and the python backend then copies
# through the host instead (a slower path than the one measured here should be)
GPU_ARGS = ["--cuda-memory-pool-byte-size=0:1073741824"]


def _started(repo: Path, log: Path, gpu: bool) -> Any:
    """The embedded server without a gate (its private gRPC socket); a second try if the first lost its
    free metrics port to another process during a slow start (seen on the shared CPU machine)."""
    from detserve.errors import ServerError
    from detserve.ops.server import running_server

    pytriton_binary_only()
    for attempt in (1, 2):
        ctx = running_server(repo, public=False, log_file=log, extra_args=GPU_ARGS if gpu else [])
        try:
            return ctx, ctx.__enter__()
        except ServerError as e:
            if attempt == 2 or "already in use" not in str(e):
                raise
    raise AssertionError("unreachable")


def serve_and_measure(
    res: Results, out: Path, device: str, images: dict[str, bytes], users: list[int], step_s: float
) -> dict[str, Any]:
    from clients.grpc_client import DetectorClient

    ctx, server = _started(out / "repo", out / "tritonserver.log", device != "cpu")
    try:
        eager = Eager(out / "repo", device)
        client = DetectorClient(server.internal_url, NAME)
        res.step("parity", lambda: parity(client, eager, images, device != "cpu"))
        client.close()
        sweep = res.step("load", lambda: load(server.internal_url, eager, images, users, step_s))
        if sweep is not None:
            res.step("targets", lambda: targets(sweep))
    finally:
        ctx.__exit__(None, None, None)
    return {"log": "tritonserver.log"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true", help="every step on the CPU, tiny loads")
    ap.add_argument("--users", default="1,2,4,8,16,32,64")
    ap.add_argument("--step-s", type=float, default=8.0)
    ap.add_argument("--shapes-images", type=int, default=8)
    args = ap.parse_args()
    if args.dry_run:
        args.users, args.step_s, args.shapes_images = "1,2", 1.0, 2
    device = "cpu" if args.dry_run else "cuda"
    gpu = not args.dry_run
    res = Results(args.out, args.dry_run)
    res.step("environment", lambda: environment(device))
    res.step("pytest_gpu", lambda: pytest_gpu(args.out))
    images = test_images(args.out, args.shapes_images)
    res.step("preprocess", lambda: preprocess_bound(device, images))
    if res.step("build", lambda: build(args.out, gpu)) is not None:
        users = [int(u) for u in args.users.split(",")]
        res.step("serve", lambda: serve_and_measure(res, args.out, device, images, users, args.step_s))
    (args.out / "gpu_serve_check.md").write_text(render(res.data))
    failed = [n for n, s in res.data["steps"].items() if not s["ok"]]
    print(f"results: {args.out}/gpu_serve_check.{{md,json}}; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
