"""Options that only `--help` shows, typed through the CLI as a user types them and checked by their effect on a
real build and a real server (slow: each builds or starts servers). The refusals that need no build are in
tests/unit/test_cli_options.py.

One repository for the module, built by `detserve build` three times with the trained demo weights: ``onnx``
(as built by default), ``torch`` (``--target python-torch``) and ``noframes`` (``--no-frames-input
--max-batch-size 2 --no-verify --max-image-pixels 400000``)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detserve.ops.server import TritonServer
from loadtest.bench_model import DEMO_DETECTOR, DEMO_WEIGHTS
from tests.integration.test_lifecycle import start_serve
from training.synthetic import NUM_CLASSES

pytestmark = pytest.mark.slow

BUILDS = {
    "onnx": [],
    "torch": ["--target", "python-torch"],
    "noframes": ["--no-frames-input", "--max-batch-size", "2", "--no-verify", "--max-image-pixels", "400000"],
}
FLOOR = 0.3  # detections compared above this score: clear of the edge where one side keeps a box the other drops


def detserve(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "detserve.app.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("cli_options") / "repo"
    for name, args in BUILDS.items():
        proc = detserve(
            "build", DEMO_DETECTOR, "--checkpoint", str(DEMO_WEIGHTS), "--num-classes", str(NUM_CLASSES),
            "--repository", str(repo), "--name", name, *args,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return repo


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from detserve.app.demo import demo_images

    return demo_images(tmp_path_factory.mktemp("cli_options_images"))[:4]


def _detect(url: str, model: str, paths: list[Path], *args: str) -> list[dict[str, Any]]:
    proc = detserve("detect", *map(str, paths), "--model", model, "--url", url, "--json", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return list(json.loads(proc.stdout))


def _arrays(item: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.array(item["boxes"]).reshape(-1, 4), np.array(item["scores"]), np.array(item["labels"])


def test_serve_log_file_request_bytes_and_metrics_host(built: Path, images: list[Path], tmp_path: Path) -> None:
    """`serve --log-file` gets Triton's log, `--max-request-bytes` refuses a larger request at the gate with
    the option named, `--metrics-host` is where the metrics answer."""
    import urllib.request

    from PIL import Image

    big = tmp_path / "noise.png"  # ~1.1 MB: noise does not compress
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 600, 3), dtype=np.uint8)).save(big)
    log = tmp_path / "triton.log"
    s = start_serve(built, tmp_path, "--log-file", str(log), "--max-request-bytes", "800000", "--metrics-host", "127.0.0.1")
    try:
        s.wait_ready()
        s.children("tritonserver"), s.children("nginx")
        assert _detect(s.grpc_url, "onnx", images[:1])[0]["num_detections"] > 0
        proc = detserve("detect", str(big), "--model", "onnx", "--url", s.grpc_url)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "larger than the server's limit of 800000 bytes (0.763 MiB;" in proc.stderr, proc.stderr  # before: (0 MiB;
        with urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=10) as r:
            assert 'nv_inference_request_success{model="onnx"' in r.read().decode()
        assert "successfully loaded 'onnx'" in log.read_text()
    finally:
        assert s.stop() == 0, s.output()
        s.kill_leftovers()


@pytest.fixture(scope="module")
def server(built: Path) -> Iterator[TritonServer]:
    from detserve.ops.server import running_server

    with running_server(built) as srv:
        yield srv


def test_python_torch_target_serves_the_onnx_builds_detections(built: Path, server: TritonServer, images: list[Path]) -> None:
    """`build --target python-torch`: the cores are torch.export artifacts run by torch, no ONNX; served, its
    detections are the ONNX Runtime build's (order-free, IoU >= 0.99, |dscore| <= 1e-3 above the floor)."""
    from detserve.verification.matching import check_parity

    assert (built / "torch_core" / "1" / "model.pt2").is_file()
    assert not list((built / "torch_core").rglob("*.onnx")) and list((built / "onnx_core").rglob("*.onnx"))
    url = server.options.grpc_url
    onnx = _detect(url, "onnx", images, "--score-threshold", "0")
    torch = _detect(url, "torch", images, "--score-threshold", "0")
    compared = 0
    for a, b in zip(onnx, torch, strict=True):
        check = check_parity(_arrays(a), _arrays(b), score_floor=FLOOR, iou_min=0.99, score_tol=1e-3)
        assert check.ok, (a["image"], check.failures)
        compared += check.total
    assert compared >= len(images)  # the trained demo detector finds shapes in every held-out image


def test_no_frames_input_and_its_stream_transports(built: Path, server: TritonServer, images: list[Path], tmp_path: Path) -> None:
    """`build --no-frames-input`: IMAGE is the ensemble's only input; `stream --transport raw` is refused
    naming it, the default transport falls back to JPEG. `--max-batch-size 2` and `--no-verify` took effect."""
    import tritonclient.grpc as grpcclient

    from tests.integration.test_stream import write_video

    url = server.options.grpc_url
    with grpcclient.InferenceServerClient(url) as client:
        assert [i.name for i in client.get_model_metadata("noframes").inputs] == ["IMAGE"]
        assert "FRAMES" in [i.name for i in client.get_model_metadata("onnx").inputs]
    for step in ("preprocess", "core", "postprocess"):  # the config API is the admin's: read the files
        assert "max_batch_size: 2\n" in (built / f"noframes_{step}" / "config.pbtxt").read_text(), step
    record = json.loads((built / "noframes" / "1" / "build.json").read_text())
    assert record["verification"]["core"] is None, record["verification"]  # --no-verify: nothing checked
    assert record["verification"]["ok"] is None  # nothing checked is not "passed": promote asks for --force
    video = write_video(tmp_path / "clip.mp4", frames=10)
    proc = detserve(
        "stream", str(video), "--model", "noframes", "--url", url, "--transport", "raw", "--out", str(tmp_path / "raw")
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "model 'noframes' has no FRAMES input (it has IMAGE): --transport raw needs" in proc.stderr, proc.stderr
    jsonl = tmp_path / "auto.jsonl"
    proc = detserve(
        "stream", str(video), "--model", "noframes", "--url", url, "--jsonl", str(jsonl), "--out", str(tmp_path / "auto")
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(jsonl.read_text().splitlines()) == 10


def test_detect_iou_threshold_is_applied_per_request(server: TritonServer, images: list[Path]) -> None:
    """`detect --iou-threshold`: a lower NMS IoU keeps fewer overlapping boxes of the same class."""
    url = server.options.grpc_url
    loose = _detect(url, "onnx", images, "--score-threshold", "0.01", "--iou-threshold", "0.95")
    tight = _detect(url, "onnx", images, "--score-threshold", "0.01", "--iou-threshold", "0.05")
    assert sum(t["num_detections"] for t in tight) < sum(x["num_detections"] for x in loose)
    for t in tight:  # no two boxes of one class overlap by more than 0.05 after NMS at 0.05
        from detserve.verification.matching import box_iou

        boxes, _, labels = _arrays(t)
        for label in set(labels.tolist()):
            iou = box_iou(boxes[labels == label], boxes[labels == label])
            assert (iou[~np.eye(len(iou), dtype=bool)] <= 0.05 + 1e-3).all()


def test_bench_torch_core_prints_its_row(tmp_path: Path) -> None:
    """`bench --torch-core`: the demo detector served again with torch cores, row (g) and its ratios printed."""
    out = tmp_path / "bench"
    proc = detserve(
        "bench", "--repository", str(tmp_path / "repo"), "--model", "demo", "--users", "2", "--duration", "2s",
        "--out", str(out), "--torch-core", timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(g) Triton ensemble, torch core (python-torch)" in proc.stdout
    assert "torch core / ONNX Runtime core (throughput)" in proc.stdout
    result = json.loads((out / "bench.json").read_text())
    report = result["torch_core"]["report"]
    assert report["failures"] == 0 and report["throughput_rps"] > 0, report


def test_fuse_instances_and_ort_threads_are_written(built: Path, tmp_path: Path) -> None:
    """`fuse --instances 3 --ort-threads 1`: three instances of the fused model, onnxruntime at one thread each;
    a torch-core build is refused (the fused layout runs its cores in onnxruntime)."""
    proc = detserve("fuse", "--repository", str(built), "--model", "onnx", "--out", str(tmp_path / "fused"),
                    "--instances", "3", "--ort-threads", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = (tmp_path / "fused" / "onnx" / "config.pbtxt").read_text()
    assert "count: 3\n" in config and '\\"intra_op_threads\\": 1' in config, config
    proc = detserve("fuse", "--repository", str(built), "--model", "torch", "--out", str(tmp_path / "fused_torch"))
    assert proc.returncode == 1 and "holds no model.onnx" in proc.stderr, proc.stderr


def test_compare_require_tensorrt_and_score_tol(built: Path, images: list[Path], tmp_path: Path) -> None:
    """`compare --require-tensorrt` on a build without an engine fails naming why (exit 1); without it the same
    comparison passes; `--score-tol` is the tolerance the report judged with."""
    args = ["compare", *map(str, images[:1]), "--model", "onnx", "--repository", str(built)]
    proc = detserve(*args, "--require-tensorrt", "--out", str(tmp_path / "trt"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: TensorRT side not compared: no model.plan in this version" in proc.stderr, proc.stderr
    proc = detserve(*args, "--score-tol", "0.002", "--out", str(tmp_path / "cpu"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "cpu" / "compare.json").read_text())["score_tol"] == 0.002


def test_eval_pytorch_and_no_pytorch(built: Path, server: TritonServer, tmp_path: Path) -> None:
    """`eval --pytorch` (the default) scores in-process PyTorch beside the served torch-core build and judges the
    difference; `--no-pytorch` scores the endpoint alone (no PyTorch figures, no verdict)."""
    data = tmp_path / "test_split"
    assert detserve("dataset", "test", str(data), "--limit", "6").returncode == 0
    common = ["eval", "--model", "torch", "--annotations", str(data / "annotations.json"), "--images",
              str(data / "images"), "--url", server.options.grpc_url, "--repository", str(built), "--progress"]  # fmt: skip
    for flag in ("--pytorch", "--no-pytorch"):
        proc = detserve(*common, flag, "--out", str(tmp_path / flag))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        (report,) = (tmp_path / flag).glob("eval_torch_*.json")
        result = json.loads(report.read_text())
        assert result["served"]["mAP"] > 0, result
        if flag == "--pytorch":
            assert result["pytorch"] and result["within_tolerance"] is True, result
        else:
            assert result["pytorch"] is None and result["within_tolerance"] is None, result
            assert "| metric | served |\n" in proc.stdout


def test_stages_detector_repeat_best_torch_threads() -> None:
    """`stages --detector D --repeat 2 --best --torch-threads 1`: that one detector's row, every stage timed
    (no server; slow only for the model build, ~9 s)."""
    proc = detserve("stages", "--detector", "ssdlite320_mobilenet_v3_large", "--repeat", "2", "--best", "--torch-threads", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ssdlite320_mobilenet_v3_large |")]
    assert len(rows) == 1 and len(proc.stdout.split("| detector |")) == 2, proc.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert all(float(ms) > 0 for ms in cells[3:6]), cells  # preprocess, core, decode ms


def test_serve_tritonserver_backend_directory_and_triton_arg(demo_built: Path, images: list[Path], tmp_path: Path) -> None:
    """`serve --tritonserver B --backend-directory D --triton-arg=--id=...`, B and D nvidia-pytriton's own (what a
    container names as /opt/tritonserver/...): a detect answers, and the extra flag reached tritonserver (the
    server's metadata carries the id). Before: the stubs got no environment for this Python (every model failed:
    "No module named 'numpy'"). A missing binary or a backend folder without the python backend: unit tests."""
    import tritonclient.grpc as grpcclient

    from detserve.ops.embedded import backend_directory, pytriton_root

    binary, backends = pytriton_root() / "bin" / "tritonserver", backend_directory()
    s = start_serve(demo_built, tmp_path, "--tritonserver", str(binary), "--backend-directory", str(backends),
                    "--triton-arg=--id=detserve-c27")  # fmt: skip
    try:
        s.wait_ready()
        s.children("tritonserver"), s.children("nginx")
        assert _detect(s.grpc_url, "demo", images[:2])[0]["num_detections"] > 0
        with grpcclient.InferenceServerClient(s.grpc_url) as client:
            assert client.get_server_metadata().name == "detserve-c27"
    finally:
        assert s.stop() == 0, s.output()
        s.kill_leftovers()


def _folder(images: list[Path], root: Path, copies: int) -> Path:
    folder = root / "many"
    folder.mkdir()
    for k in range(copies):
        for p in images:
            (folder / f"{k:03d}_{p.name}").write_bytes(p.read_bytes())
    return folder


def _run_until_lines(args: list[str], out: Path, lines: int) -> subprocess.Popen[str]:
    """`detserve run` started; returns once it has written ``lines`` results (the server is then stopped under it)."""
    import time

    proc = subprocess.Popen([sys.executable, "-m", "detserve.app.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out.is_file() and out.read_bytes().count(b"\n") >= lines):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    return proc


def test_run_retries_zero_leaves_images_to_rerun_and_enough_retries_outlast_a_restart(
    demo_copy: Callable[[str], Path], images: list[Path], tmp_path: Path
) -> None:
    """The server stopped and started again under a folder run (docs/offline-jobs.md): with `--retries 0` the
    images it could not answer are not written, the run exits 1 naming them, and the same command again answers
    exactly those; with `--retries 8` (backoff 0.2 s doubling: ~51 s, within the 60 s request deadline) the run
    outlasts the restart and answers every image, exit 0."""
    from detserve.ops.server import ServerOptions, TritonServer, free_port

    folder = _folder(images, tmp_path, copies=40)  # 160 images, one request in flight: seconds of work
    total = len(list(folder.iterdir()))
    opts = ServerOptions(demo_copy("run_retries"), grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    server = TritonServer(opts)
    server.start()
    try:
        server.wait_ready()
        for retries in ("0", "8"):
            out = tmp_path / f"retries{retries}.jsonl"
            args = ["run", "--model", "demo", "--images", str(folder), "--out", str(out), "--url", opts.grpc_url,
                    "--max-in-flight", "1", "--retries", retries, "--classes", "a,b,c,d,e,f", "--no-progress"]  # fmt: skip
            proc = _run_until_lines(args, out, 3)
            server.stop()  # the outage: drained, then nothing listens
            if retries == "0":
                stdout, stderr = proc.communicate(timeout=120)
                assert proc.returncode == 1 and "image(s) not answered: run the same command again" in stderr, stderr
                written = out.read_bytes().count(b"\n")
                assert 3 <= written < total and "retry later" in stdout, stdout
            server = TritonServer(opts)
            server.start()
            server.wait_ready()
            if retries == "0":
                again = detserve(*args)
                assert again.returncode == 0 and f"({written} already done before this run)" in again.stdout, again.stdout
            else:
                stdout, stderr = proc.communicate(timeout=180)
                assert proc.returncode == 0 and "retry later" not in stdout, stdout + stderr
            paths = [json.loads(line)["path"] for line in out.read_text().splitlines()]
            assert sorted(paths) == sorted(p.name for p in folder.iterdir()), retries  # each image exactly once
            assert not any("error" in json.loads(line) for line in out.read_text().splitlines())
    finally:
        server.stop()


def test_memory_fused_and_variant_rows_say_so(demo_built: Path, tmp_path: Path) -> None:
    """`memory --fused R2 --variant "core x2 + post x1"`: a row per layout; the ensemble's row names the variant and
    ran it (2 core stubs, 1 post-processing stub), the fused row is measured as built and says no variant. Before:
    the variant's row read "ensemble", as the built configs' would."""
    fused = tmp_path / "fused"
    assert detserve("fuse", "--repository", str(demo_built), "--model", "demo", "--out", str(fused)).returncode == 0
    out = tmp_path / "memory"
    proc = detserve("memory", "--repository", str(demo_built), "--model", "demo", "--fused", str(fused),
                    "--variant", "core x2 + post x1", "--users", "1", "--duration", "2s", "--out", str(out), timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["layout"]: r for r in json.loads((out / "memory.json").read_text())}
    assert set(rows) == {"ensemble", "fused"}, rows.keys()
    assert rows["ensemble"]["variant"] == "core x2 + post x1" and rows["fused"]["variant"] == "", rows
    stubs = {role: v["processes"] for role, v in rows["ensemble"]["rest"].items() if role.startswith("stub ")}
    assert stubs["stub demo_core"] == 2 and stubs["stub demo_postprocess"] == 1, stubs
    assert all(v > 0 for r in rows.values() for v in r["throughput_rps"].values()), rows
    table = (out / "memory.md").read_text()
    assert "| ensemble (core x2 + post x1) | 1 |" in table and "| fused | 1 |" in table, table


def _children(pid: int) -> list[int]:
    """Live tritonserver and nginx processes that ``pid`` started (they run in sessions of their own)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            comm = stat.read_text().split("(", 1)[1].rsplit(")", 1)[0]
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and comm in ("tritonserver", "nginx"):
            found.append(int(stat.parent.name))
    return found


def test_sigterm_stops_the_servers_a_measuring_command_started(demo_built: Path, tmp_path: Path) -> None:
    """`detserve memory` (as bench, bench-stream, tune, demo, ops-report) stopped by SIGTERM (`timeout`, a container
    stop) mid-run: its tritonserver and gate stop with it, exit 130. Before: the command died at once and both kept
    running (orphans holding ports and memory)."""
    import os
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "detserve.app.cli", "memory", "--repository", str(demo_built),
                             "--model", "demo", "--users", "1", "--duration", "60s", "--out", str(tmp_path / "memory")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    children: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while len(children := _children(proc.pid)) < 2:  # tritonserver and the gate's nginx master
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
        assert proc.returncode == 130, output
        time.sleep(1)
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)], output
    finally:
        for pid in children:  # whatever a failed run left: only what this command started, each in its own group
            if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
                os.killpg(pid, signal.SIGKILL)  # with the stubs and nginx workers
        if proc.poll() is None:
            proc.kill()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_build_max_image_pixels_is_the_served_limit(built: Path, server: TritonServer, tmp_path: Path) -> None:
    """`build --max-image-pixels 400000` (the ``noframes`` build): a 800x600 image (480,000 pixels) is refused by
    that model naming its limit, a 600x600 one answers; the default build (40 M) answers the 800x600 one."""
    from PIL import Image

    rng = np.random.default_rng(1)
    paths = {}
    for name, (w, h) in {"over": (800, 600), "under": (600, 600)}.items():
        paths[name] = tmp_path / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(paths[name])
    url = server.options.grpc_url
    proc = detserve("detect", str(paths["over"]), "--model", "noframes", "--url", url)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert "800x600 = 480000 pixels, over the limit of 400000" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "num_detections" in _detect(url, "noframes", [paths["under"]])[0]
    assert "num_detections" in _detect(url, "onnx", [paths["over"]])[0]
