"""The admin API on the embedded server: explicit model control behind the admin key.

Its own server started with an admin key (the gate checks it; tritonserver never sees it), on its own
ssdlite-only repository (built here, ~20 s; not the four-detector session repository).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from detserve.app.cli import app
from detserve.ops.admin import AdminRefusedError, ModelAdmin
from detserve.ops.server import TritonServer, running_server

KEY = "test-admin-key-0123456789abcdef"
REFUSED = "refused: the admin key is missing or wrong"


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    from converters.repository import BuildRequest, build_repository

    repo = tmp_path_factory.mktemp("admin_repo")
    build_repository(
        BuildRequest(
            detector="ssdlite320_mobilenet_v3_large",
            repository=repo,
            name="ssdlite",
            num_classes=5,
            max_image_pixels=20_000_000,
            spread_init_seed=0,
        )
    )
    with running_server(repo, admin_key=KEY) as srv:
        yield srv


def _detect(url: str, image: bytes) -> int:
    from clients.grpc_client import DetectorClient

    with DetectorClient(url, "ssdlite") as client:
        return len(client.detect(image, score_threshold=0.0))


def _ready(url: str) -> bool:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        return bool(client.is_model_ready("ssdlite"))
    finally:
        client.close()


@pytest.mark.parametrize("key", [None, "wrong-key-0123456789abcdef"])
def test_admin_calls_without_the_right_key_are_refused(
    admin_server: TritonServer, samples: dict[str, bytes], key: str | None
) -> None:
    url = admin_server.options.grpc_url
    with ModelAdmin(url, key) as admin:
        for call in (
            lambda: admin.unload_model("ssdlite"),
            lambda: admin.load_model("ssdlite"),
            admin.get_model_repository_index,
        ):
            with pytest.raises(AdminRefusedError, match=REFUSED) as e:
                call()
            assert e.value.hint and "DETSERVE_ADMIN_KEY" in e.value.hint
    assert _ready(url)
    assert _detect(url, samples["astronaut.jpg"]) > 0  # inference needs no key


def test_unload_and_reload_with_the_key(admin_server: TritonServer, samples: dict[str, bytes]) -> None:
    url = admin_server.options.grpc_url
    with ModelAdmin(url, KEY) as admin:
        admin.unload_model("ssdlite")
        assert not _ready(url)
        # unload returns before Triton has finished (UNLOADING on a busy machine): wait for the state, not a duration
        deadline = time.monotonic() + 60
        while True:
            state = {(e.name, e.state) for e in admin.get_model_repository_index()}
            if ("ssdlite", "UNLOADING") not in state or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert ("ssdlite", "UNAVAILABLE") in state and ("ssdlite_core", "READY") in state
        with pytest.raises(Exception, match="ssdlite"):
            _detect(url, samples["astronaut.jpg"])
        admin.load_model("ssdlite")
    assert _ready(url)
    assert _detect(url, samples["astronaut.jpg"]) > 0


@pytest.mark.documents(
    "detserve models list --url U --repository R", "detserve status --url U --metrics-url M", "detserve models load N --url U"
)
def test_cli_models_and_status(admin_server: TritonServer, samples: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    url = admin_server.options.grpc_url
    metrics = f"http://127.0.0.1:{admin_server.options.metrics_port}/metrics"
    repo = admin_server.options.repository
    monkeypatch.delenv("DETSERVE_ADMIN_KEY_FILE", raising=False)
    monkeypatch.delenv("DETSERVE_ADMIN_KEY", raising=False)
    runner = CliRunner()
    for _ in range(3):
        assert _detect(url, samples["chelsea.png"]) > 0

    refused = runner.invoke(app, ["models", "unload", "ssdlite", "--url", url])
    assert refused.exit_code == 1 and REFUSED in refused.output and "Traceback" not in refused.output

    no_key = runner.invoke(app, ["models", "list", "--url", url, "--repository", str(repo)])
    assert no_key.exit_code == 0, no_key.output
    assert "ssdlite " in no_key.output and "READY" in no_key.output and "verification ok" in no_key.output

    env = {"DETSERVE_ADMIN_KEY": KEY}
    listed = runner.invoke(app, ["models", "list", "--url", url, "--repository", str(repo)], env=env)
    assert listed.exit_code == 0, listed.output
    lines = [ln.split() for ln in listed.output.splitlines() if not ln.startswith(" ")]
    assert {ln[0] for ln in lines} == {"ssdlite", "ssdlite_preprocess", "ssdlite_core", "ssdlite_postprocess"}
    assert all(ln[1:] == ["version", "1", "READY"] for ln in lines)
    assert "ssdlite320_mobilenet_v3_large" in listed.output and "fp32" in listed.output

    status = runner.invoke(app, ["status", "--url", url, "--metrics-url", metrics])
    assert status.exit_code == 0, status.output
    assert "live yes, ready yes" in status.output
    rows = {ln.split()[0]: ln.split() for ln in status.output.splitlines()[2:] if ln.startswith("ssdlite")}
    assert set(rows) == {"ssdlite", "ssdlite_preprocess", "ssdlite_core", "ssdlite_postprocess"}
    _, version, ready, ok, failed, queue_ms, compute_ms, batch, pending = rows["ssdlite_core"]
    assert (version, ready, failed, pending) == ("1", "yes", "0", "0")
    assert int(ok) >= 3 and float(compute_ms) > 0 and float(queue_ms) >= 0 and float(batch) >= 1
    assert "pending requests unavailable" not in status.output

    loaded = runner.invoke(app, ["models", "load", "ssdlite", "--url", url], env=env)
    assert loaded.exit_code == 0 and "loaded ssdlite" in loaded.output


def test_a_failed_ensemble_load_names_the_steps_configs(admin_server: TritonServer, samples: dict[str, bytes]) -> None:
    # Triton polls an ensemble's steps on its load: a broken step config fails the ensemble's load
    url = admin_server.options.grpc_url
    config = admin_server.options.repository / "ssdlite_postprocess" / "config.pbtxt"
    good = config.read_text()
    config.write_text(good + "\nbroken {{{\n")
    try:
        result = CliRunner().invoke(app, ["models", "load", "ssdlite", "--url", url], env={"DETSERVE_ADMIN_KEY": KEY})
    finally:
        config.write_text(good)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "ssdlite_postprocess/config.pbtxt" in result.output and "still serving ssdlite version 1" in result.output
    assert _detect(url, samples["astronaut.jpg"]) > 0


# last in the module: the failed versions stay in the server's repository index
def test_a_model_that_fails_to_load_leaves_the_others_serving(admin_server: TritonServer, samples: dict[str, bytes]) -> None:
    url = admin_server.options.grpc_url
    repo = admin_server.options.repository
    broken = repo / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text('backend: "python"\ninput [{ name: "X" data_type: TYPE_NOPE dims: [1] }]\n')
    core_v2 = repo / "ssdlite_core" / "2"  # the core's version policy is "latest": a load picks version 2
    shutil.copytree(repo / "ssdlite_core" / "1", core_v2)
    (core_v2 / "model.onnx").write_bytes(b"not an onnx file")
    env = {"DETSERVE_ADMIN_KEY": KEY}
    runner = CliRunner()
    try:
        new = runner.invoke(app, ["models", "load", "broken", "--url", url], env=env)
        assert new.exit_code == 1 and "Traceback" not in new.output, new.output
        assert "load 'broken' failed" in new.output and "config.pbtxt" in new.output
        assert "the other models are unaffected" in new.output and "broken is not serving" in new.output

        corrupted = runner.invoke(app, ["models", "load", "ssdlite_core", "--url", url], env=env)
        assert corrupted.exit_code == 1 and "Traceback" not in corrupted.output, corrupted.output
        assert "load 'ssdlite_core' failed: version 2" in corrupted.output and "Protobuf parsing failed" in corrupted.output
        assert "still serving ssdlite_core version 1" in corrupted.output and "\nAt:" not in corrupted.output

        assert _ready(url)
        assert _detect(url, samples["astronaut.jpg"]) > 0
    finally:
        shutil.rmtree(broken)
        shutil.rmtree(core_v2)
