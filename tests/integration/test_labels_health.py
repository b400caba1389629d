"""Class names on open paths, health per model, no silent random weights (issue 24, parts 2, 4, 6).

One server behind the real gate serves the demo detector (built by the README's command, names from its
weights' record) and a non-demo model built with ``--random-weights`` and no names (``class_<label>``).
Health messages are encoded and decoded with protobuf from the official grpc.health.v1 schema, not by
detserve's own encoder. The last test kills a stub whose reload then fails: run in file order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from clients.labels import fetch_labels
from detserve.app.demo import DEMO_WEIGHTS, demo_images
from detserve.ops.server import TritonServer
from tests.integration.test_documented_commands import detserve, lines, ok

DEMO_NAMES = ["__background__", "circle", "square", "triangle", "star", "cross"]
SERVING, NOT_SERVING = 1, 2


def _health_messages() -> tuple[Any, Any]:
    """HealthCheckRequest / HealthCheckResponse from grpc/health/v1/health.proto's definitions."""
    f = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="v_health_test.proto", package="grpc.health.v1", syntax="proto3")
    fdp.message_type.add(name="HealthCheckRequest").field.add(name="service", number=1, type=f.TYPE_STRING, label=1)
    resp = fdp.message_type.add(name="HealthCheckResponse")
    enum = resp.enum_type.add(name="ServingStatus")
    for number, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        enum.value.add(name=name, number=number)
    resp.field.add(
        name="status", number=1, type=f.TYPE_ENUM, label=1, type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus"
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    get = message_factory.GetMessageClass
    return (
        get(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")),
        get(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")),
    )


def health(url: str, service: str) -> int | grpc.StatusCode:
    """The status of ``service``, or the gRPC error code."""
    request, response = _health_messages()
    with grpc.insecure_channel(url) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=request.SerializeToString,
            response_deserializer=response.FromString,
        )
        try:
            return int(check(request(service=service), timeout=10).status)
        except grpc.RpcError as e:
            return e.code()


def http_get(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, json.loads(body) if body.startswith(b"{") else body


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("labels_health")
    repo = work / "model_repository"
    ok(detserve("build", "ssdlite320_mobilenet_v3_large", "--repository", str(repo), "--name", "demo",
                "--num-classes", "6", "--checkpoint", str(DEMO_WEIGHTS), timeout=900))  # fmt: skip
    untrained = detserve("build", "ssdlite320_mobilenet_v3_large", "--repository", str(repo), "--name", "tiny",
                         "--num-classes", "4", "--random-weights", "--spread-init-seed", "0", timeout=900)  # fmt: skip
    ok(untrained)
    return repo, untrained.stderr


@pytest.fixture(scope="module")
def served(built: tuple[Path, str]) -> Iterator[TritonServer]:
    from detserve.ops.server import running_server

    with running_server(built[0]) as srv:
        yield srv


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return demo_images(tmp_path_factory.mktemp("shapes"))[:3]


@pytest.mark.documents(
    "detserve build ssdlite320_mobilenet_v3_large --repository R --name demo --num-classes 6 --checkpoint W",
)
def test_demo_names_recorded_random_weights_build_warns_and_records_no_names(built: tuple[Path, str]) -> None:
    repo, stderr = built
    assert "warning: building with untrained random weights" in stderr
    assert json.loads((repo / "tiny" / "1" / "labels.json").read_text())["names"] == [f"class_{i}" for i in range(4)]
    demo = json.loads((repo / "demo" / "1" / "labels.json").read_text())
    assert demo["names"] == DEMO_NAMES and "provenance" in demo["source"]


def test_class_names_on_open_paths_http_and_grpc(served: TritonServer) -> None:
    port, url = served.options.http_port, served.options.grpc_url
    status, doc = http_get(port, "/v2/models/demo/labels")
    assert status == 200 and doc["names"] == DEMO_NAMES and doc["version"] == 1
    assert http_get(port, "/v2/models/demo/versions/1/labels") == (200, doc)
    assert http_get(port, "/v2/models/tiny/labels")[1]["names"] == ["class_0", "class_1", "class_2", "class_3"]
    missing, body = http_get(port, "/v2/models/nope/labels")
    assert missing == 404 and "no class names" in body["error"]
    assert http_get(port, "/v2/models/demo/versions/7/labels")[0] == 404
    assert fetch_labels(url, "demo") == doc  # gRPC: detserve.v1.Labels/Get, no admin key
    assert fetch_labels(url, "nope") is None


def test_names_of_a_version_built_while_serving_appear_and_go(served: TritonServer, built: tuple[Path, str]) -> None:
    """A version built (or promoted) after ``serve`` started: its labels document reaches the open paths
    within the helper's refresh, over HTTP (nginx's copy) and gRPC; a removed one is gone again."""
    port, url, repo = served.options.http_port, served.options.grpc_url, built[0]
    version_dir = repo / "tiny" / "9"  # labels only: Triton (explicit model control) never looks at it
    version_dir.mkdir()
    try:
        document = {"model": "tiny", "version": 9, "names": ["bg", "later"], "source": "test", "weights": "test"}
        (version_dir / "labels.json").write_text(json.dumps(document))
        deadline = time.monotonic() + 30
        while http_get(port, "/v2/models/tiny/versions/9/labels")[0] != 200:
            assert time.monotonic() < deadline, "a version's names did not reach the gate while serving"
            time.sleep(0.5)
        assert http_get(port, "/v2/models/tiny/versions/9/labels")[1]["names"] == ["bg", "later"]
        assert fetch_labels(url, "tiny", "9") == document
    finally:
        (version_dir / "labels.json").unlink(missing_ok=True)
        version_dir.rmdir()
    deadline = time.monotonic() + 30
    while http_get(port, "/v2/models/tiny/versions/9/labels")[0] != 404:
        assert time.monotonic() < deadline, "a removed version's names stayed on the gate"
        time.sleep(0.5)


@pytest.mark.documents("detserve detect photo.jpg --model m --draw out/")
def test_detect_text_json_and_draw_name_the_classes(served: TritonServer, images: list[Path], tmp_path: Path) -> None:
    url = served.options.grpc_url
    report = json.loads(ok(detserve("detect", *map(str, images), "--model", "demo", "--url", url, "--json",
                                    "--draw", str(tmp_path / "drawn"))))  # fmt: skip
    assert sum(r["num_detections"] for r in report) > 0
    for item in report:  # one name per real detection: padding rows never show up as class 0
        assert len(item["classes"]) == len(item["labels"]) == len(item["scores"]) == item["num_detections"]
        assert all(DEMO_NAMES[label] == name for label, name in zip(item["labels"], item["classes"], strict=True))
        assert 0 not in item["labels"]
    assert len(list((tmp_path / "drawn").glob("*.png"))) == len(images)
    text = ok(detserve("detect", str(images[0]), "--model", "demo", "--url", url))
    first = report[0]
    assert f"label {first['labels'][0]:>3} {first['classes'][0]:<16} score" in text
    tiny = json.loads(ok(detserve("detect", str(images[0]), "--model", "tiny", "--url", url, "--json", "--max-det", "5")))
    assert tiny[0]["num_detections"] <= 5 and all(
        c == f"class_{v}" for v, c in zip(tiny[0]["labels"], tiny[0]["classes"], strict=True)
    )


def test_run_and_prelabel_get_the_names_from_the_server(served: TritonServer, images: list[Path], tmp_path: Path) -> None:
    url = served.options.grpc_url
    results = tmp_path / "results.jsonl"
    ok(detserve("run", "--model", "demo", "--images", str(images[0].parent), "--out", str(results), "--url", url,
                "--no-progress"))  # fmt: skip
    detections = [d for row in lines(results) for d in row.get("detections", [])]
    assert detections and all(d["class"] == DEMO_NAMES[d["label"]] for d in detections)
    ok(detserve("prelabel", "--results", str(results), "--out", str(tmp_path / "coco"), "--format", "coco"))
    coco = json.loads(next((tmp_path / "coco").rglob("*.json")).read_text())
    assert {c["name"] for c in coco["categories"]} <= set(DEMO_NAMES[1:])


def test_health_per_model_and_unknown_service(served: TritonServer) -> None:
    url, port = served.options.grpc_url, served.options.http_port
    assert health(url, "") == SERVING
    assert health(url, "demo") == SERVING and health(url, "tiny") == SERVING
    assert health(url, "nope") == grpc.StatusCode.NOT_FOUND  # before: SERVING for any name
    assert http_get(port, "/v2/models/demo/ready")[0] == 200


def test_killed_stub_makes_its_model_unhealthy_not_the_others(served: TritonServer, built: tuple[Path, str]) -> None:
    """demo's post-processing stub killed, and its reload made to fail (a broken model.py): demo and the
    server are NOT_SERVING, tiny stays SERVING; fixed and reloaded, all SERVING again."""
    url, repo = served.options.grpc_url, built[0]
    model_py = repo / "demo_postprocess" / "1" / "model.py"
    good = model_py.read_text()
    model_py.write_text("raise RuntimeError('broken on purpose by test_labels_health')\n")
    try:
        assert served.process is not None
        pids = subprocess.run(["pgrep", "-P", str(served.process.pid), "-f", "triton_python_backend_stub.*demo_postprocess"],
                              capture_output=True, text=True).stdout.split()  # fmt: skip
        assert pids, "no demo_postprocess stub to kill"
        for pid in pids:
            os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 120
        while health(url, "demo") != NOT_SERVING or "reload failed" not in str(served.failing):
            assert time.monotonic() < deadline, f"demo stayed healthy: {served.failing}"
            time.sleep(0.2)
        assert health(url, "") == NOT_SERVING
        assert health(url, "tiny") == SERVING
        assert health(url, "nope") == grpc.StatusCode.NOT_FOUND
    finally:
        model_py.write_text(good)
    deadline = time.monotonic() + 180  # the watchdog retries the reload every 5 s: with model.py fixed it succeeds
    while served.failing:
        assert time.monotonic() < deadline, f"the reload did not recover: {served.failing}"
        time.sleep(0.5)
    from detserve.ops.admin import ModelAdmin

    if health(url, "demo") != SERVING:  # a failed step load may have taken the ensemble with it
        with ModelAdmin(served.internal_url, None, timeout_s=300.0) as admin:
            admin.load_model("demo")
    assert health(url, "demo") == SERVING and health(url, "") == SERVING


@pytest.mark.slow  # a ResNet50-FPN RetinaNet export and check: minutes on 2 cores
@pytest.mark.documents(
    "detserve build retinanet_resnet50_fpn_v2 --repository R --name retina_untrained --random-weights"
    " --kw min_size=512 --kw max_size=683",
)
def test_readme_untrained_retinanet_builds_with_coco_names(tmp_path: Path) -> None:
    repo = tmp_path / "model_repository"
    proc = detserve("build", "retinanet_resnet50_fpn_v2", "--repository", str(repo), "--name", "retina_untrained",
                    "--random-weights", "--kw", "min_size=512", "--kw", "max_size=683", timeout=1800)  # fmt: skip
    ok(proc)
    assert "warning: building with untrained random weights" in proc.stderr
    names = json.loads((repo / "retina_untrained" / "1" / "labels.json").read_text())["names"]
    assert len(names) == 91 and names[:3] == ["__background__", "person", "bicycle"]
