"""Every detector family through the real server against its own library (verification rungs 1, 3, 5).

One table (``parity_table.ROWS``: torchvision SSD/RetinaNet/FCOS, YOLO, DETR/RT-DETR, Faster and
Mask R-CNN, RT-DETRv2, D-FINE), one tritonserver: the session server, into whose repository each
family is built on first use and loaded (unloaded and removed when the module ends). Per row:

1. the server's preprocessed tensor equals the library's own (``model.transform``, the image
   processor's ``pixel_values``, ultralytics' predictor), difference 0;
3. served detections equal the library's own (eager ``model([image])``, ``post_process_object_detection``,
   ultralytics ``predict``), order-free, with the row's tolerance; masks: 28x28 probabilities and pasted
   masks vs eager's;
5. an image's detections change neither with its batch neighbours nor with the images of other sizes
   sent beside it in one request;
and where the row says so: the ensemble's declared steps, the in-process chain, ``detserve compare``,
``detserve eval`` (segm mAP with masks), ``detect --draw`` painting masks. Per-request controls and the
checks below the generic ones are family-specific (their semantics differ: NMS or queries).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clients.grpc_client import Detections, DetectorClient
from clients.masks import paste_masks
from detserve.ops.server import TritonServer
from detserve.runtime.imaging import decode_image
from detserve.verification.matching import check_parity
from tests.detector_fixtures import assert_each_image_answered_alone, detection_arrays, eager_model, mixed_size_images
from tests.integration import parity_table as table
from tests.integration.parity_table import BY_NAME, INVARIANCE, Row, image_set, row_param, rows_with

REPORTS = Path(__file__).resolve().parents[2] / "out" / "reports"
MAX_PIXELS = 1 << 30


@dataclass(frozen=True)
class Served:
    row: Row
    url: str
    repository: Path
    reference: Any  # the eager torchvision model (checkpoint rows) or the build's EagerReference

    @property
    def model(self) -> Any:
        return self.reference if self.row.weights == "checkpoint" else self.reference.model


@pytest.fixture(scope="module")
def served(
    request: pytest.FixtureRequest, server: TritonServer, repository: Path, checkpoints: dict[str, Path]
) -> Iterator[Served]:
    """One row, served by the session server. Parametrised indirectly by the row's name, module-scoped:
    pytest runs a row's tests together, so one family at a time is loaded beside the session's models."""
    row = BY_NAME[request.param]
    url = server.options.grpc_url
    if row.weights == "checkpoint":  # built and served by the session fixtures
        yield Served(row, url, repository, eager_model(row.detector, checkpoints[row.detector]))
        return
    with _built_and_loaded(server, repository, row) as reference:
        yield Served(row, url, repository, reference)


@contextlib.contextmanager
def _built_and_loaded(server: TritonServer, repository: Path, row: Row) -> Iterator[Any]:
    """Build ``row`` into the session repository and load it through the server's own socket; after,
    unload it (ensemble first), wait until it is gone and remove its files: later modules see the
    session server as it was."""
    from converters.repository import BuildRequest, build_repository
    from detserve.errors import DetserveError
    from detserve.ops.admin import ModelAdmin
    from detserve.verification.reference import build_record, reference_model

    before = set(repository.iterdir())
    added: list[str] = []
    try:
        request = BuildRequest(
            detector=row.detector, repository=repository, name=row.name, num_classes=row.num_classes,
            spread_init_seed=0, model_kwargs=dict(row.model_kwargs), target=row.target,
        )  # fmt: skip
        try:
            build_repository(request)
        finally:
            added = sorted(p.name for p in set(repository.iterdir()) - before)
        # the ensemble loads its steps; as long as a server start may take (wait_ready) and more: seen
        # 7 min for y8 on a 2-core machine other test runs had driven out of memory
        with ModelAdmin(server.internal_url, None, timeout_s=900) as admin:
            admin.load_model(row.name)
        yield reference_model(build_record(repository, row.name)[1])
    finally:
        with ModelAdmin(server.internal_url, None) as admin:
            for name in sorted(added, key=lambda n: n != row.name):
                with contextlib.suppress(DetserveError):  # a step that never loaded
                    admin.unload_model(name)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                index = admin.get_model_repository_index()
                if not any(e.name in added and e.state in ("READY", "UNLOADING") for e in index):
                    break
                time.sleep(0.2)
        for name in added:
            shutil.rmtree(repository / name, ignore_errors=True)


def _report(file: str, stats: dict[str, Any]) -> None:
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / file).write_text(json.dumps(stats, indent=2))


# --------------------------------------------------------------------------- rungs 1, 3, 5 for every row


@pytest.mark.parametrize("served", rows_with(table.PREPROCESSING), indirect=True)
def test_preprocessing_equals_the_library(served: Served, samples: dict[str, bytes], tmp_path: Path) -> None:
    row = served.row
    expected_of = table.preprocessor(row, served.model)
    with DetectorClient(served.url, row.name) as client:
        for file, blob in image_set(row.images, samples).items():
            (tmp_path / file).write_bytes(blob)
            rgb = decode_image(blob, MAX_PIXELS)
            expected, info_check = expected_of(rgb, tmp_path / file)
            tensor, info = client.preprocessed(blob)
            assert tensor.shape == expected.shape, file
            assert np.array_equal(tensor, expected), f"{file}: max diff {np.abs(tensor - expected).max()}"
            if info_check is not None:
                where, values = info_check
                assert tuple(info.reshape(-1)[where]) == tuple(values), file


@pytest.mark.parametrize("served", rows_with(table.DETECTIONS), indirect=True)
def test_detections_equal_the_library(served: Served, samples: dict[str, bytes]) -> None:
    row = served.row
    stats: dict[str, Any] = {}
    with DetectorClient(served.url, row.name) as client:
        for file, blob in image_set(row.images, samples).items():
            rgb = decode_image(blob, MAX_PIXELS)
            dets = client.detect(blob, **row.controls)
            ref = table.reference_detections(row, served.reference, rgb)
            if row.every_image_detects:
                assert len(ref["scores"]) > 0, f"{file}: the reference found nothing; the fixture needs a score spread"
            stats[file] = {"served": len(dets), "reference": len(ref["scores"])}
            stats[file].update(table.boxes_equal(dets, ref, row.tolerance, f"{row.name} {file}"))
            if row.masks:
                stats[file].update(table.masks_equal(dets, ref, (rgb.shape[0], rgb.shape[1]), f"{row.name} {file}"))
    if row.min_reference_total:
        assert sum(s["total_ge_floor"] for s in stats.values()) > row.min_reference_total, "the fixture needs a score spread"
    if row.masks:
        assert sum(s["masks_matched"] for s in stats.values()) > 50
    _report(f"parity-{row.name}.json", stats)


@pytest.mark.parametrize("served", rows_with(table.BATCH), indirect=True)
def test_batch_neighbours_do_not_change_detections(served: Served, samples: dict[str, bytes]) -> None:
    row = served.row
    images = image_set(row.batch_images, samples)
    names = list(images) * row.batch_repeat
    random.Random(0).shuffle(names)
    with DetectorClient(served.url, row.name) as client:
        single = {n: client.detect(b, **row.invariance_controls) for n, b in images.items()}
        together = client.detect_many([images[n] for n in names], **row.invariance_controls, max_in_flight=len(names))
    for file, res in zip(names, together, strict=True):
        assert isinstance(res, Detections), res
        result = table.check(res, single[file], INVARIANCE)
        assert result.ok, f"{row.name} {file}: {result.failures[:5]}"
        if row.masks:
            alone = single[file].masks
            assert res.masks is not None and alone is not None
            assert np.abs(res.masks.astype(np.float32) - alone.astype(np.float32)).max() <= table.MASK_BATCH


@pytest.mark.parametrize("served", rows_with(table.MULTI_IMAGE), indirect=True)
def test_each_image_of_a_multi_image_request_answers_as_alone(served: Served, samples: dict[str, bytes]) -> None:
    """Five images of different sizes in one request: FCOS/RetinaNet/R-CNN/DETR pad each to its own
    canvas (not the largest of the request), through every step of a multi-step chain; SSD, YOLO and
    RT-DETR resize all to one size. Each answers what it answers alone."""
    row = served.row
    images = mixed_size_images(image_set(row.multi_images, samples))
    assert_each_image_answered_alone(served.url, row.name, images, row.report, **row.multi_controls)


# --------------------------------------------------------------------------- where the row says so


@pytest.mark.parametrize("served", rows_with(table.STEPS), indirect=True)
def test_ensemble_wires_the_declared_steps(served: Served) -> None:
    from detserve.tritonconfig import read_config

    row = served.row
    ensemble = read_config(served.repository / row.name)
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == [f"{row.name}_{s}" for s in row.steps]
    assert all(s.model_version == -1 for s in ensemble.ensemble_scheduling.step)
    assert [o.name for o in ensemble.output] == list(row.outputs)


def _canonical_order(scores: Any, labels: Any, boxes: Any) -> Any:
    """Indices ordering detections by score rounded to 1e-4 (descending), then label, then box corner."""
    keys = [
        (-round(float(s), 4), int(lbl), round(float(b[0]), 1), round(float(b[1]), 1))
        for s, lbl, b in zip(scores, labels, boxes, strict=True)
    ]
    return np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)


@pytest.mark.parametrize("served", rows_with(table.IN_PROCESS), indirect=True)
def test_in_process_chain_equals_the_served_ensemble(served: Served, samples: dict[str, bytes]) -> None:
    """loadtest.inprocess on a multi-step repository (bench's limit, compare's onnxruntime side): the
    declared chain in one process -- the served ONNX files with the served session settings, the
    family's torch steps -- gives the server's detections (and masks); alone or all images in one call."""
    from detserve.specs import RequestControls
    from loadtest.inprocess import InProcessPipeline

    row = served.row
    images = image_set(row.images, samples)
    pipeline = InProcessPipeline.from_repository(served.repository, row.name)
    assert pipeline.steps is not None
    assert set(pipeline.sessions) == {s.role for s in pipeline.steps if s.kind == "core"}
    assert set(pipeline.sessions) == {s for s in row.steps if s.endswith("core")}
    score = row.controls["score_threshold"]
    controls = RequestControls(score, pipeline.spec.postprocess.nms_thresh, 1000)
    blobs = list(images.values())
    together = pipeline.run(blobs, controls)  # the two crops and the photos: several padded sizes at once
    with DetectorClient(served.url, row.name) as client:
        for (file, blob), batched in zip(images.items(), together, strict=True):
            dets = client.detect(blob, score_threshold=score, max_det=1000)
            local = pipeline.run([blob], controls)[0]
            assert len(local["scores"]) == len(dets) > 0, file
            # detections of (nearly) equal score come in either order: compare both sides in one canonical order
            mine, theirs = (
                _canonical_order(local["scores"], local["labels"], local["boxes"]),
                _canonical_order(dets.scores, dets.labels, dets.boxes),
            )
            np.testing.assert_array_equal(local["labels"][mine], dets.labels.astype(np.int64)[theirs], err_msg=file)
            np.testing.assert_allclose(local["scores"][mine], dets.scores[theirs], atol=1e-5, err_msg=file)
            np.testing.assert_allclose(local["boxes"][mine], dets.boxes[theirs], atol=1e-3, err_msg=file)
            if dets.masks is not None:
                assert local["masks"].dtype == dets.masks.dtype
                np.testing.assert_allclose(
                    local["masks"][mine].astype(np.float32), dets.masks[theirs].astype(np.float32), atol=1e-3
                )
                np.testing.assert_array_equal(batched["masks"], local["masks"], err_msg=file)
            result = check_parity(
                detection_arrays(batched), detection_arrays(local), score_floor=0.0, iou_min=0.999, score_tol=1e-5
            )
            assert result.ok, f"{file}: {result.failures[:5]}"
    roles = ["preprocess", *(s.role for s in pipeline.steps)]
    assert list(pipeline.stage_cpu_s) == roles and all(v > 0 for v in pipeline.stage_cpu_s.values())
    sizes = pipeline.tensor_bytes(blobs[:1])
    assert list(sizes) == ["request", "preprocessed", *roles[1:]] and all(v > 0 for v in sizes.values())


@pytest.mark.parametrize("served", rows_with(table.COMPARE_CLI), indirect=True)
def test_compare_cli(served: Served, samples: dict[str, bytes], tmp_path: Path) -> None:
    """``detserve compare`` with the family's library as the reference: the server and onnxruntime sides."""
    from typer.testing import CliRunner

    from detserve.app.cli import app

    row = served.row
    folder = tmp_path / "images"
    folder.mkdir()
    for file, data in list(samples.items())[: row.compare_images]:
        (folder / file).write_bytes(data)
    args = ["compare", "--model", row.name, "--repository", str(served.repository), "--url", served.url, str(folder)]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    assert "server" in result.output and "onnxruntime" in result.output


@pytest.mark.parametrize("served", rows_with(table.EVAL), indirect=True)
def test_eval_served_equals_pytorch(served: Served, tmp_path: Path) -> None:
    """``detserve eval`` on the generated shapes (exact instance masks): served vs PyTorch mAP side by side,
    segm mAP beside box mAP where the model has masks; YOLO's labels as the dataset's category indices."""
    from detserve.verification.evalrun import category_map, run_eval
    from training.synthetic import SPLITS, write_split

    row = served.row
    assert row.eval is not None
    annotations = write_split(SPLITS["test"], tmp_path, limit=row.eval.limit)
    report = run_eval(
        served.url, row.name, annotations, tmp_path / "images", served.repository,
        max_det=row.eval.max_det, progress=False, echo=lambda _: None,
    )  # fmt: skip
    assert report.pytorch is not None and not report.errors
    assert report.detections["served"] == report.detections["pytorch"] > 0
    assert abs(report.delta_points["mAP"]) <= 0.1 and report.within_tolerance
    if row.masks:
        assert report.served_segm is not None and report.pytorch_segm is not None
        assert abs(report.segm_delta_points["mAP"]) <= 0.1 and "segm mAP" in report.markdown()
        _report(f"eval-{row.name}.json", report.to_dict())
    if row.eval.labels_are_indices:
        categories = category_map(json.loads(annotations.read_text()), labels_are_indices=True)
        assert categories is not None and list(categories) == sorted(categories) and len(categories) == 5


@pytest.mark.parametrize("served", rows_with(table.DRAW), indirect=True)
def test_detect_draw_paints_the_masks(served: Served, samples: dict[str, bytes], tmp_path: Path) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from detserve.app.cli import app

    row = served.row
    file, blob = next(iter(samples.items()))
    (tmp_path / file).write_bytes(blob)
    args = ["detect", str(tmp_path / file), "--model", row.name, "--url", served.url]
    result = CliRunner().invoke(app, [*args, "--score-threshold", "0.5", "--max-det", "3", "--draw", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    drawn = np.asarray(Image.open(tmp_path / "out" / f"{Path(file).stem}.png").convert("RGB")).astype(int)
    original = decode_image(blob, MAX_PIXELS).astype(int)
    with DetectorClient(served.url, row.name) as client:
        dets = client.detect(blob, score_threshold=0.5, max_det=3)
    assert dets.masks is not None and len(dets) > 0
    inside = paste_masks(dets.masks, dets.boxes, (original.shape[0], original.shape[1]), threshold=0.5).any(0)
    changed = np.abs(drawn - original).sum(-1) > 0
    assert inside.sum() > 100 and changed[inside].mean() > 0.95  # tinted wherever a mask is


# --------------------------------------------------------------------------- family-specific


@pytest.mark.parametrize("served", [row_param("retinanet")], indirect=True)
def test_retinanet_per_request_controls_reach_the_postprocessing(served: Served, samples: dict[str, bytes]) -> None:
    """NMS controls per request: the served strict answer equals eager with the same thresholds."""
    import torch

    row = served.row
    model, blob = served.model, samples["astronaut.jpg"]
    with DetectorClient(served.url, row.name) as client:
        default = client.detect(blob)
        strict = client.detect(blob, score_threshold=0.2, iou_threshold=0.3, max_det=7)
        many = client.detect(blob, score_threshold=0.0, max_det=1000)
    assert len(strict) <= 7 and (strict.scores >= 0.2).all()
    assert len(many) > len(default)
    saved = model.score_thresh, model.nms_thresh, model.detections_per_img
    model.score_thresh, model.nms_thresh, model.detections_per_img = 0.2, 0.3, 7
    try:
        with torch.no_grad():
            out = model([table.to_tensor(decode_image(blob, MAX_PIXELS))])[0]
    finally:
        model.score_thresh, model.nms_thresh, model.detections_per_img = saved
    assert check_parity(detection_arrays(strict), detection_arrays({k: v.numpy() for k, v in out.items()})).ok


@pytest.mark.parametrize("served", [row_param("y8")], indirect=True)
def test_yolo_per_request_controls(served: Served, samples: dict[str, bytes]) -> None:
    row, blob = served.row, samples["astronaut.jpg"]
    with DetectorClient(served.url, row.name) as client:
        strict = client.detect(blob, score_threshold=0.3, iou_threshold=0.3, max_det=5)
        many = client.detect(blob, score_threshold=0.001, max_det=1000)
    assert 0 < len(strict) <= 5 and (strict.scores >= 0.3).all() and len(many) > len(strict)


@pytest.mark.parametrize("served", [row_param("rtdetr")], indirect=True)
def test_rtdetr_per_request_controls(served: Served, samples: dict[str, bytes]) -> None:
    """Score threshold and max_det per request; max_det beyond the queries gives at most the queries;
    the IoU threshold is accepted (validated) and changes nothing: there is no NMS."""
    from detserve.errors import DetserveError

    row, blob = served.row, samples["astronaut.jpg"]
    conf, queries = row.controls["score_threshold"], row.controls["max_det"]
    with DetectorClient(served.url, row.name) as client:
        everything = client.detect(blob, score_threshold=0.0, max_det=1000)
        assert len(everything) == queries  # sigmoid top-k: one detection per query at most
        strict = client.detect(blob, score_threshold=0.2, max_det=3)
        assert 0 < len(strict) <= 3 and (strict.scores > 0.2).all()
        assert np.array_equal(strict.scores, everything.scores[: len(strict)])
        loose_iou = client.detect(blob, score_threshold=conf, iou_threshold=1.0)
        tight_iou = client.detect(blob, score_threshold=conf, iou_threshold=0.05)
        assert np.array_equal(loose_iou.boxes, tight_iou.boxes) and np.array_equal(loose_iou.scores, tight_iou.scores)
        default = client.detect(blob)
        assert (default.scores > 0.5).all()  # the processor's default threshold
        with pytest.raises(DetserveError, match="iou_threshold"):
            client.detect(blob, iou_threshold=0.0)


@pytest.mark.parametrize("served", [row_param("detr")], indirect=True)
def test_detr_an_image_the_processor_cannot_resize_fails_alone(served: Served, samples: dict[str, bytes]) -> None:
    """DETR's short side of a 1x2000 image rounds to 0 pixels: that request's error, with a hint; its batch neighbours serve."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((1, 2000, 3), 128, np.uint8)).save(buf, format="PNG")
    blobs = [samples["astronaut.jpg"], buf.getvalue(), samples["astronaut.jpg"]]
    row = served.row
    conf = row.controls["score_threshold"]
    with DetectorClient(served.url, row.name) as client:
        results = client.detect_many(blobs, score_threshold=conf, max_in_flight=3)
        again = client.detect(samples["astronaut.jpg"], score_threshold=conf)
    assert isinstance(results[0], Detections) and isinstance(results[2], Detections)
    assert not isinstance(results[1], Detections) and "aspect ratio" in str(results[1])
    assert np.array_equal(results[0].scores, again.scores)


@pytest.mark.parametrize("served", [row_param("frcnn")], indirect=True)
def test_rcnn_per_request_controls_reach_the_detections_step(served: Served, samples: dict[str, bytes]) -> None:
    from clients.grpc_client import ClientError

    row, blob = served.row, next(iter(samples.values()))
    with DetectorClient(served.url, row.name) as client:
        strict = client.detect(blob, score_threshold=0.2, iou_threshold=0.3, max_det=5)
        loose = client.detect(blob, score_threshold=0.0, iou_threshold=0.9, max_det=300)
        default = client.detect(blob)
        assert 0 < len(strict) <= 5 and (strict.scores > 0.2).all()
        assert len(loose) > 100 and len(default) <= 100  # torchvision's detections_per_img is the default
        with pytest.raises(ClientError, match="max_det"):
            client.detect(blob, max_det=0)
        assert len(client.detect(blob, max_det=3)) == 3  # the server is still up


@pytest.mark.parametrize("served", [row_param("frcnn")], indirect=True)
def test_rcnn_compare_served_and_in_process_against_eager(served: Served, samples: dict[str, bytes], tmp_path: Path) -> None:
    """detserve compare on a two-stage model: onnxruntime in process and the server against eager
    ``model([image])``, order-free per score band; every core step's raw error on the chain's inputs."""
    from loadtest.compare import run_compare, write_report

    row = served.row
    paths = []
    for file, blob in list(samples.items())[:1]:  # one photo: the fast-suite budget (more in the slow bench)
        (tmp_path / file).write_bytes(blob)
        paths.append(tmp_path / file)
    score = row.controls["score_threshold"]
    report = run_compare(served.repository, row.name, paths, served.url, score_threshold=score, echo=lambda _: None)
    assert not report.problems, report.problems
    assert [s.side for s in report.sides] == ["onnxruntime", "server"]
    for side in report.sides:
        high = side.band("≥0.5")
        assert high.reference > 0 and high.matched == high.reference, side
    assert [r["backend"].rsplit("(", 1)[1] for r in report.raw] == ["core)", "roi_core)"]
    assert all(r["ok"] for r in report.raw) and "tensorrt" in report.skipped
    assert all(p.ok for p in report.positions) and {p.side for p in report.positions} == {"onnxruntime", "server"}
    assert "agree" in write_report(report, tmp_path / "report")["markdown"].read_text()


@pytest.mark.parametrize("served", [row_param("mrcnn")], indirect=True)
def test_mask_core_equals_the_eager_mask_head(served: Served, samples: dict[str, bytes]) -> None:
    """The served mask core on eager's own FPN maps and final boxes vs eager's mask head: <= 1e-4."""
    row = served.row
    worst = {file: _mask_core_vs_eager(served, blob) for file, blob in image_set(row.images, samples).items()}
    _report(f"parity-{row.name}-mask-core.json", worst)
    assert max(worst.values()) <= table.MASK_CORE, worst


def _mask_core_vs_eager(served: Served, blob: bytes) -> float:
    import torch
    import tritonclient.grpc as grpcclient

    model = served.model
    with torch.no_grad():
        images, _ = model.transform([table.eager_input(served.row, decode_image(blob, MAX_PIXELS))])
        features = model.backbone(images.tensors)
        proposals, _ = model.rpn(images, features)
        dets, _ = model.roi_heads(features, proposals, images.image_sizes)
        boxes, labels = dets[0]["boxes"], dets[0]["labels"]
        heads = model.roi_heads
        logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, [boxes], images.image_sizes)))
        eager = logits.sigmoid()[torch.arange(labels.shape[0]), labels].numpy()
    assert len(labels) > 10
    named = {**{f"feat_{k}": v.numpy() for k, v in features.items() if k != "pool"}, "det_boxes": boxes.numpy()[None]}
    named["det_labels"] = labels.numpy().astype(np.int32)[None]
    inputs = []
    for key, array in named.items():
        tensor = grpcclient.InferInput(key, list(array.shape), "INT32" if array.dtype == np.int32 else "FP32")
        tensor.set_data_from_numpy(np.ascontiguousarray(array))
        inputs.append(tensor)
    client = grpcclient.InferenceServerClient(served.url)
    try:
        result = client.infer(f"{served.row.name}_mask_core", inputs).as_numpy("mask_probs")[0]
    finally:
        client.close()
    return float(np.abs(result - eager).max())
