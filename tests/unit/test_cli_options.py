"""Build options that only `detserve build --help` shows, typed as a user types them: each refusal is one
clear message (no traceback) before anything is exported or written. The options that need a build or a
server are typed in tests/integration/test_cli_options.py (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BUILD = ["build", "ssdlite320_mobilenet_v3_large", "--random-weights", "--num-classes", "3"]


def _build(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detserve.app.cli", *BUILD, "--repository", str(repo), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "gpu"], "--device gpu needs --target python-torch, not python-onnxruntime"),
        (["--device", "tpu", "--target", "python-torch"], "device must be one of cpu, gpu, got 'tpu'"),
        (["--target", "python-tensorflow"], "unknown target 'python-tensorflow'"),
        (["--postprocess-on-gpu"], "post-processing on the GPU needs --target tensorrt"),
        (["--precision", "fp16"], "--precision/--calibration-images apply to --target tensorrt, not python-onnxruntime"),
        (["--target", "python-torch", "--fused-out", "fused"], "the fused CPU layout runs the cores in onnxruntime"),
        (["--max-batch-size", "0"], "max_batch_size must be >= 1, got 0"),
    ],
)
def test_build_refuses_options_of_another_target_before_writing(tmp_path: Path, args: list[str], message: str) -> None:
    repo = tmp_path / "repo"
    proc = _build(repo, *args)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"error: {message}" in proc.stderr and "Traceback" not in proc.stderr
    assert not repo.exists(), sorted(p.name for p in repo.iterdir())


@pytest.mark.skipif(_cuda(), reason="this machine has a CUDA GPU: --device gpu builds (tests/integration)")
def test_build_device_gpu_without_a_gpu_is_refused_naming_why(tmp_path: Path) -> None:
    """Before: the build wrote KIND_GPU configs (9 s) that this machine's server then refused to load
    ("kind KIND_GPU but no GPUs are available"), its artifact never run on a GPU."""
    repo = tmp_path / "repo"
    proc = _build(repo, "--target", "python-torch", "--device", "gpu")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error: --device gpu: torch sees no CUDA GPU on this machine" in proc.stderr
    assert "hint:" in proc.stderr and "Traceback" not in proc.stderr
    assert not repo.exists()


def _check(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detserve.app.cli", "check-images", str(folder), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 200x100 and a 40x20 PNG (noise: no two alike) and a non-image file without an image suffix."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("check_images")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"big.png": (100, 200), "small.png": (20, 40)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.dat").write_bytes(b"garbage")
    return folder


@pytest.mark.parametrize(
    ("args", "rc", "lines"),
    [
        ([], 0, ["small            small.png: 40x20, a side below 32 px", "checked 2 files: small 1"]),
        (["--min-side", "10"], 0, ["checked 2 files: no problems"]),
        (["--max-pixels", "10000", "--min-side", "10"], 1, ["bomb             big.png: PNG image declares 200x100"]),
        (["--all-files", "--min-side", "10"], 1, ["undecodable      notes.dat: not a decodable image"]),
    ],
)
def test_check_images_options_take_effect(image_folder: Path, args: list[str], rc: int, lines: list[str]) -> None:
    proc = _check(image_folder, *args)
    assert proc.returncode == rc, proc.stdout + proc.stderr
    assert all(line in proc.stdout for line in lines), proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--phash-distance", "99", "--near-duplicates"], "--phash-distance must be in 0..16 bits, got 99"),
        (["--max-pixels", "0"], "--max-pixels must be at least 1, got 0"),
        (["--min-side", "-1"], "--min-side must be at least 0, got -1"),
    ],
)
def test_check_images_refuses_meaningless_limits(image_folder: Path, args: list[str], message: str) -> None:
    """Before: --max-pixels 0 flagged every image as a decompression bomb ("over the limit of 0") and
    --min-side -1 passed silently."""
    proc = _check(image_folder, *args)
    assert proc.returncode == 1 and f"error: {message}" in proc.stderr, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--in-flight", "0"], "--in-flight"),
        (["--in-flight-total", "0"], "--in-flight-total"),
        (["--max-fps", "0"], "--max-fps"),
        (["--stall", "0"], "--stall"),
    ],
)
def test_stream_refuses_limits_that_cannot_run_before_connecting(tmp_path: Path, args: list[str], option: str) -> None:
    """Before: --in-flight-total 0 was silently raised to 1; --in-flight 0 and --max-fps 0 reached the session
    (no server is needed to refuse them: nothing listens at the URL given here)."""
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")  # never opened: the options are refused first
    proc = subprocess.run(
        [sys.executable, "-m", "detserve.app.cli", "stream", str(video), "--model", "demo", "--url", "127.0.0.1:1",
         "--out", str(tmp_path / "out"), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert option in proc.stderr and "no Triton server answers" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--repeat", "0"], "--repeat must be at least 1, got 0"), (["--torch-threads", "-1"], "--torch-threads must be")],
)
def test_stages_refuses_counts_it_cannot_run(args: list[str], message: str) -> None:
    """Before: --repeat 0 timed the detector for ~11 s, then a StatisticsError traceback ("no median for empty
    data"); --torch-threads -1 a RuntimeError traceback from torch.set_num_threads."""
    proc = subprocess.run(
        [sys.executable, "-m", "detserve.app.cli", "stages", "--detector", "ssdlite320_mobilenet_v3_large", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "Error:" not in proc.stderr, proc.stderr
    assert f"error: {message}" in proc.stderr, proc.stderr


@pytest.mark.parametrize("profile", ["1,two,4", "0,4"])
def test_tune_refuses_a_profile_that_is_not_user_counts(tmp_path: Path, profile: str) -> None:
    """Before: `--profile 1,two,4` ended in a ValueError traceback (int('two'))."""
    proc = subprocess.run(
        [sys.executable, "-m", "detserve.app.cli", "tune", "--repository", str(tmp_path), "--model", "demo",
         "--profile", profile, "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: --profile must be comma-separated user counts of 1 or more, got {profile!r}" in proc.stderr


def test_mine_min_score_and_prelabel_image_prefix(tmp_path: Path) -> None:
    """`mine --empty --min-score`: an image is empty below the score given (the default 0.3 picks only the one
    without detections); `prelabel --image-prefix`: each Label Studio task's image path starts with it."""
    from tests.unit.test_jobs import RECORDS, _results

    results = _results(tmp_path, RECORDS)
    cli = [sys.executable, "-m", "detserve.app.cli"]
    for min_score, picked in (("0.3", {"sub/b.png"}), ("0.95", {"a.png", "sub/b.png", "c.png", "d.png"})):
        out = tmp_path / f"mined-{min_score}"
        proc = subprocess.run([*cli, "mine", "--results", str(results), "--out", str(out), "--empty",
                               "--min-score", min_score], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        assert {m["path"] for m in manifest} == picked, min_score
    proc = subprocess.run([*cli, "mine", "--results", str(results), "--out", str(tmp_path / "bad"), "--empty",
                           "--min-score", "2"], capture_output=True, text=True, timeout=60)  # fmt: skip
    # before: accepted, every image "empty" (a score is at most 1); prelabel's --threshold already refused it
    assert proc.returncode == 1 and "error: --min-score must be in 0..1, got 2" in proc.stderr, proc.stderr
    proc = subprocess.run([*cli, "prelabel", "--results", str(results), "--out", str(tmp_path / "ls"), "--format",
                           "labelstudio", "--image-prefix", "s3://bucket/shapes/"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert [t["data"]["image"] for t in tasks][:2] == ["s3://bucket/shapes/a.png", "s3://bucket/shapes/sub/b.png"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-failure-increase", "-0.1"], "--max-failure-increase must be in 0..1, got -0.1"),
        (["--max-p99-ratio", "0.5"], "--max-p99-ratio must be at least 1, got 0.5"),
        (["--p99-slack-ms", "-5"], "--p99-slack-ms must be at least 0, got -5"),
        (["--max-detections-drop", "2"], "--max-detections-drop must be in 0..1, got 2"),
    ],
)
def test_promote_canary_thresholds_that_judge_nothing_are_refused(tmp_path: Path, args: list[str], message: str) -> None:
    """Before: accepted, and the canary ran its watch window against them (a drop limit of 2 never fires: the
    detections check was off; a negative failure allowance rolls back every canary)."""
    import os
    import secrets

    env = {**os.environ, "DETSERVE_ADMIN_KEY": secrets.token_hex(20)}
    proc = subprocess.run(
        [sys.executable, "-m", "detserve.app.cli", "promote", "demo", "--version", "2", "--repository", str(tmp_path),
         "--url", "127.0.0.1:1", "--canary", "1", *args],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == 1 and f"error: {message}" in proc.stderr, proc.stderr


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "detserve.app.cli", *args], capture_output=True, text=True, timeout=120, env=env)


def _python_model_repository(root: Path) -> Path:
    """One python-backend model: a server without the python backend cannot load it (exits; never serves on)."""
    repo = root / "repo"
    (repo / "m" / "1").mkdir(parents=True)
    (repo / "m" / "config.pbtxt").write_text('backend: "python"\nmax_batch_size: 0\n')
    (repo / "m" / "1" / "model.py").write_text("class TritonPythonModel:\n    def execute(self, requests):\n        return []\n")
    return repo


@pytest.mark.parametrize("option", ["--tritonserver", "--backend-directory"])
def test_serve_refuses_a_tritonserver_or_backends_that_cannot_serve_naming_them(tmp_path: Path, option: str) -> None:
    """`serve --tritonserver PATH` / `--backend-directory PATH` (a container's own Triton): before, a missing binary
    ended as "FileNotFoundError: [Errno 2] No such file or directory" without the path; a backend folder without the
    python backend started a tritonserver whose every model failed to load. Now both are refused before any start."""
    from detserve.ops.embedded import pytriton_root
    from detserve.ops.server import free_port

    empty = tmp_path / "backends"
    empty.mkdir()
    given = {"--tritonserver": tmp_path / "nonexistent" / "tritonserver", "--backend-directory": empty}[option]
    binary = ["--tritonserver", str(pytriton_root() / "bin" / "tritonserver")] if option == "--backend-directory" else []
    ports = [a for what in ("grpc", "http", "metrics") for a in (f"--{what}-port", str(free_port()))]
    proc = _cli("serve", "--repository", str(_python_model_repository(tmp_path)), *ports, *binary, option, str(given))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    why = "not an executable file" if option == "--tritonserver" else "no python backend (python/libtriton_python.so)"
    assert f"error: {option} {given}: {why}" in proc.stderr, proc.stderr
    assert "ready:" not in proc.stdout


def test_run_refuses_negative_retries() -> None:
    """`run --retries -1`: before, accepted and run as 0 (no retry) after a readiness check of the server."""
    proc = _cli("run", "--model", "demo", "--images", ".", "--out", "/nonexistent/r.jsonl", "--classes", "a",
                "--url", "127.0.0.1:1", "--retries", "-1")  # fmt: skip
    assert proc.returncode == 1 and "error: --retries must be at least 0, got -1" in proc.stderr, proc.stderr


def test_promote_no_force_refuses_what_the_default_refuses_and_force_overrides_it(tmp_path: Path) -> None:
    """`promote --no-force` refuses an unverified (`build --no-verify`) version 2 as the default does, and a failed one,
    before anything connects; `--force` passes that check (it then stops only at the server: nothing listens here)."""
    import os
    import secrets

    from tests.unit.test_shared_preprocess import _build

    repo = tmp_path / "repo"
    for version in (1, 2):
        _build(repo, "m", version=version)
    env = {**os.environ, "DETSERVE_ADMIN_KEY": secrets.token_hex(20)}
    env.pop("DETSERVE_ADMIN_KEY_FILE", None)
    common = ["promote", "m", "--version", "2", "--repository", str(repo), "--url", "127.0.0.1:1"]
    cases = [
        ('{"verification": {"core": null, "ok": null}}', "it was built with --no-verify (nothing checked)", [[], ["--no-force"]]),
        ('{"verification": {"ok": false}}', "its build.json says verification failed", [["--no-force"]]),
    ]
    for record, message, refused in cases:
        for step in ("m_preprocess", "m_core", "m_postprocess"):
            (repo / step / "2" / "build.json").write_text(record)
        for flags in refused:
            proc = _cli(*common, *flags, env=env)
            assert proc.returncode == 1, proc.stderr
            assert f"m_preprocess version 2: check 'verification.ok' failed: {message}" in proc.stderr, proc.stderr
            assert "--force" in proc.stderr, proc.stderr  # the hint names the override
    proc = _cli(*common, "--force", env=env)
    assert proc.returncode == 1 and "verification" not in proc.stderr and "127.0.0.1:1" in proc.stderr, proc.stderr


def test_memory_refuses_an_unknown_variant_and_a_fused_folder_without_the_models(tmp_path: Path) -> None:
    """`memory --variant NAME` names the variants on a typo; `memory --fused DIR` without the models' fused layouts is
    refused before any server starts (before: after the whole ensemble layout was measured, ~1 min per count)."""
    common = ["memory", "--repository", str(tmp_path), "--model", "demo", "--out", str(tmp_path / "out")]
    proc = _cli(*common, "--variant", "core x9")
    assert proc.returncode == 1 and "error: no tuning variant named 'core x9'" in proc.stderr, proc.stderr
    assert "hint: choose one of: " in proc.stderr and "core x2 + post x1" in proc.stderr
    proc = _cli(*common, "--fused", str(tmp_path / "fused"))
    assert proc.returncode == 1 and f"error: --fused {tmp_path / 'fused'}: no fused layout of demo" in proc.stderr
    assert not (tmp_path / "out").exists(), proc.stdout


def test_bench_stream_refuses_an_unknown_transport_before_building(tmp_path: Path) -> None:
    """`bench-stream --transport bogus`: before, accepted; the demo was built and served and the 30 s capacity run
    done before the first stream refused it (and a SIGTERM then left that server running)."""
    repo, out = tmp_path / "repo", tmp_path / "out"
    proc = _cli("bench-stream", "--transport", "bogus", "--repository", str(repo), "--streams", "1", "--seconds", "1",
                "--out", str(out))  # fmt: skip
    assert proc.returncode == 1 and "error: --transport must be one of jpeg, raw, got 'bogus'" in proc.stderr, proc.stderr
    assert not repo.exists() and not out.exists()


def test_eval_refuses_no_requests_in_flight(tmp_path: Path) -> None:
    """`eval --max-in-flight 0`: before, a ValueError traceback from the bulk client ("max_in_flight must be >= 1")."""
    proc = _cli("eval", "--model", "demo", "--annotations", str(tmp_path / "a.json"), "--images", str(tmp_path),
                "--repository", str(tmp_path), "--url", "127.0.0.1:1", "--max-in-flight", "0", "--out", str(tmp_path / "o"))  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: --max-in-flight must be >= 1, got 0" in proc.stderr, proc.stderr


def test_serve_triton_arg_refuses_detserve_flags_abbreviated_too(tmp_path: Path) -> None:
    """`serve --triton-arg` passes a flag to tritonserver, but not one detserve sets: tritonserver takes any
    unambiguous prefix of a long option (getopt_long; checked with 2.51), so `--grpc-addr=0.0.0.0` would have moved
    its keyless gRPC (the admin APIs included) off the private socket, past the gate. Before: only full names refused."""
    from detserve.errors import ServerError
    from detserve.ops.server import ServerOptions
    from detserve.ops.server_options import owned_flag

    proc = _cli("serve", "--repository", str(tmp_path), "--triton-arg=--grpc-addr=0.0.0.0")
    assert proc.returncode == 1 and "ready:" not in proc.stdout, proc.stdout + proc.stderr
    assert (
        "error: --grpc-addr (tritonserver reads it as --grpc-address) is set by detserve and cannot be passed" in proc.stderr
    ), proc.stderr
    for arg, owned in [("--model-control=poll", "--model-control-mode"), ("--grpc-restricted-proto=x:y=z",
                       "--grpc-restricted-protocol"), ("--http-p", "--http-port"), ("--allow-g=true", "--allow-grpc")]:  # fmt: skip
        assert owned_flag(arg) == owned, arg
        with pytest.raises(ServerError, match="is set by detserve"):
            ServerOptions(tmp_path, extra_args=[arg])
    for arg in ["--log-verbose=1", "--http-thread-count=4", "--allow-metrics=false", "--exit-timeout-secs=30", "-v"]:
        assert owned_flag(arg) is None and ServerOptions(tmp_path, extra_args=[arg]).extra_args == [arg]


def test_build_calibration_images_outside_tensorrt_int8_is_refused(tmp_path: Path) -> None:
    """`build --calibration-images DIR` (TensorRT int8 only) on the default target: refused before writing."""
    repo = tmp_path / "repo"
    proc = _build(repo, "--calibration-images", str(tmp_path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: --precision/--calibration-images apply to --target tensorrt, not python-onnxruntime" in proc.stderr
    assert not repo.exists()


def test_a_containers_own_triton_needs_no_nvidia_pytriton(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NVIDIA's image (docker/Dockerfile) has no nvidia-pytriton: `serve --tritonserver /opt/... --backend-directory
    /opt/...` must not look for it (the check of whether the binary is nvidia-pytriton's own stays quiet there)."""
    import detserve.ops.server_options as server_options
    from detserve.errors import ServerError
    from detserve.ops.embedded import backend_directory, pytriton_root

    binary, backends = pytriton_root() / "bin" / "tritonserver", backend_directory()
    theirs = server_options.ServerOptions(tmp_path, tritonserver=tmp_path / "tritonserver", backend_directory=tmp_path)
    assert not theirs.embedded
    assert server_options.ServerOptions(tmp_path, tritonserver=binary, backend_directory=backends).embedded
    assert server_options.ServerOptions(tmp_path, tritonserver=tmp_path / "tritonserver").embedded  # the wheel's stub

    def missing() -> Path:
        raise ServerError("nvidia-pytriton is not installed")

    monkeypatch.setattr(server_options, "pytriton_root", missing)
    assert not theirs.embedded


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        (["memory", "--model", "demo"], ["--users", "0"], "--users must be at least 1, got 0"),
        (["tune", "--model", "demo"], ["--duration", "0s"], "--duration must be above 0, got '0s'"),
        (["bench"], ["--users", "-2"], "--users must be at least 1, got -2"),
        (["ops-report"], ["--duration", "-5s"], "--duration must be above 0, got '-5s'"),
    ],
)
def test_serving_measurements_refuse_an_empty_load_before_starting(
    tmp_path: Path, command: list[str], args: list[str], message: str
) -> None:
    """`memory`/`tune`/`bench`/`ops-report --users 0` or `--duration 0s`: before, the load generator refused them only
    once the models were built (bench, ops-report) or copied and served (memory, tune)."""
    where = ["--work", str(tmp_path / "work")] if command == ["ops-report"] else ["--repository", str(tmp_path / "repo")]
    proc = _cli(*command, *where, "--out", str(tmp_path / "out"), *args)
    assert proc.returncode == 1 and f"error: {message}" in proc.stderr, proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "repo").exists() and not (tmp_path / "work").exists()
