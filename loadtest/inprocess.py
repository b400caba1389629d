"""The served pipeline in one process, no server: the practical throughput limit of this machine.

Loads the very files the server loads (``spec.json`` and the core's ``model.onnx``) and runs what
the three composing models run — decode, preprocess, one onnxruntime call per padded size,
vectorised post-processing — as plain function calls. Whatever the served ensemble does slower
than this is the price of serving (transport, queueing, copies between models), not of the model.

A multi-step family (``Family.steps``: two-stage R-CNN) runs its whole declared chain the same way:
preprocess, then each step in order — every core through onnxruntime on its own
``<name>_<role>/<version>/model.onnx`` with that step's served session settings, every torch step
through the family's ``run_step`` — the images of one padded size as one batch through every step,
outputs cast to the declared dtypes as the python step model casts them.

Every torch stage runs with the torch thread count its served model sets (config parameter
``torch_threads``): a resize or a reduction's last bit follows the thread count, so the same
image gives the server's answer bit for bit, not to within float noise.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detserve.errors import SpecError
from detserve.families import ModelSpec
from detserve.pipeline import CORE, model_name
from detserve.runtime.chain import torch_threads as _torch_threads
from detserve.specs import RequestControls

CORE_INPUT = "images"  # the core's input tensor, as the server feeds it
STAGES = ("preprocess", "core", "postprocess")  # decode + resize + normalise; onnxruntime; decode + NMS


def latest_version(model_dir: Path) -> int:
    """The highest numbered version directory that holds a core model, as Triton's default policy serves."""
    versions = (
        [int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / "model.onnx").is_file()]
        if model_dir.is_dir()
        else []
    )
    if not versions:
        raise SpecError(f"no version with a model.onnx in {model_dir}", hint="build the repository first (detserve build)")
    return max(versions)


@dataclass
class InProcessPipeline:
    """preprocess → core → postprocess of one repository model, run in the calling thread."""

    spec: ModelSpec
    session: Any  # onnxruntime.InferenceSession
    version_dir: Path
    # CPU seconds of this process spent in each stage since creation (time.process_time: onnxruntime's
    # own threads included), and the images run: what each stage costs with no server around it
    stage_cpu_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    images_run: int = 0
    # a multi-step family: its declared steps and an onnxruntime session per core step (by role);
    # None: the default three-step pipeline (``session`` is its core)
    steps: list[Any] | None = None
    sessions: dict[str, Any] = field(default_factory=dict)
    # torch's intra-op threads per torch stage (by role, "preprocess" included), as each served
    # model's config sets them; a stage not named runs with this process's own setting
    torch_threads: dict[str, int] = field(default_factory=dict)

    @property
    def multistep(self) -> bool:
        return self.steps is not None

    @classmethod
    def from_repository(
        cls, repository: Path, name: str, version: int | None = None, intra_op_threads: int | None = None
    ) -> InProcessPipeline:
        """Load ``<name>_core/<version>/{spec.json, model.onnx}`` with the served core's session settings
        (from its config.pbtxt) unless ``intra_op_threads`` overrides them."""
        from detserve.runtime.onnxrt import cpu_session
        from detserve.tritonconfig import read_config

        core_dir = Path(repository) / model_name(name, CORE)
        version_dir = core_dir / str(version if version is not None else latest_version(core_dir))
        spec_path, onnx_path = version_dir / "spec.json", version_dir / "model.onnx"
        for path in (spec_path, onnx_path):
            if not path.is_file():
                raise SpecError(f"{path} not found", hint=f"is {name!r} (version {version}) built in {repository}?")
        spec = ModelSpec.from_json(spec_path.read_text())

        def session_of(model_dir: Path, onnx: Path) -> Any:
            params = read_config(model_dir).parameters
            threads = intra_op_threads if intra_op_threads is not None else int(params["intra_op_threads"].string_value or 0)
            return cpu_session(onnx, threads, params["allow_spinning"].string_value == "1")

        def threads_of(role: str) -> dict[str, int]:
            model_dir = Path(repository) / model_name(name, role)
            if not (model_dir / "config.pbtxt").is_file():
                return {}
            raw = read_config(model_dir).parameters["torch_threads"].string_value
            return {role: int(raw)} if raw and int(raw) > 0 else {}

        steps = _declared_steps(spec)
        torch_roles = ["preprocess", *(s.role for s in steps if s.kind != "core")] if steps else ["preprocess", "postprocess"]
        threads = {k: v for role in torch_roles for k, v in threads_of(role).items()}
        if steps is None:
            return cls(spec, session_of(core_dir, onnx_path), version_dir, torch_threads=threads)
        sessions = {}
        for step in steps:
            if step.kind != "core":
                continue
            step_dir = Path(repository) / model_name(name, step.role)
            onnx = step_dir / version_dir.name / "model.onnx"
            if not onnx.is_file():
                raise SpecError(f"{onnx} not found", hint=f"the {step.role!r} step of {name!r}: rebuild the repository")
            sessions[step.role] = session_of(step_dir, onnx)
        stages = dict.fromkeys(["preprocess", *(s.role for s in steps)], 0.0)
        return cls(spec, sessions.get(CORE), version_dir, stages, steps=steps, sessions=sessions, torch_threads=threads)

    def default_controls(self) -> RequestControls:
        """The model's own thresholds, what a request without parameters gets from the server."""
        post = self.spec.postprocess
        return RequestControls(post.score_thresh, post.nms_thresh, post.detections_per_img)

    def run(
        self, blobs: Sequence[bytes], controls: RequestControls | Sequence[RequestControls] | None = None
    ) -> list[dict[str, np.ndarray]]:
        """Detections per encoded image: boxes [K, 4] float32 (original pixels), scores [K] float32, labels [K] int64.

        Images of equal padded size share one onnxruntime call, as the dynamic batcher groups
        same-shaped requests; each image keeps its own canvas, so results do not depend on the batch.
        """
        per_image = self._controls_per_image(controls, len(blobs))
        t0 = time.process_time()
        items = [self._preprocess(blob) for blob in blobs]
        self.stage_cpu_s["preprocess"] += time.process_time() - t0
        self.images_run += len(blobs)
        results: list[dict[str, np.ndarray]] = [{} for _ in blobs]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.padded_hw, []).append(i)
        chain = self._chain if self.steps is not None else self._core_and_postprocess
        for padded_hw, idxs in groups.items():
            dets = chain(padded_hw, [items[i] for i in idxs], [per_image[i] for i in idxs])
            for i, det in zip(idxs, dets, strict=True):
                results[i] = det
        return results

    def tensor_bytes(self, blobs: Sequence[bytes]) -> dict[str, float]:
        """Mean bytes per image of what crosses each hop of the served ensemble: the encoded request,
        the preprocessed tensor (+ image_info), the core's raw outputs, the padded detections."""
        from detserve.families import output_names

        if self.steps is not None:
            return self._step_bytes(blobs)
        post = self.spec.postprocess
        names = list(output_names(post))
        sizes: dict[str, float] = dict.fromkeys(("request", "preprocessed", "core_outputs", "detections"), 0.0)
        for blob in blobs:
            item = self._preprocess(blob)
            batch = item.tensor.unsqueeze(0).numpy()
            sizes["request"] += len(blob)
            sizes["preprocessed"] += batch.nbytes + 6 * 4
            sizes["core_outputs"] += sum(a.nbytes for a in self.session.run(names, {CORE_INPUT: batch}))
            sizes["detections"] += 4 + post.detections_per_img * (4 * 4 + 4 + 4)  # num, boxes, scores, labels
        return {k: v / max(len(blobs), 1) for k, v in sizes.items()}

    def _controls_per_image(self, controls: RequestControls | Sequence[RequestControls] | None, n: int) -> list[RequestControls]:
        if controls is None:
            return [self.default_controls()] * n
        if isinstance(controls, RequestControls):
            return [controls] * n
        if len(controls) != n:
            raise ValueError(f"{n} images but {len(controls)} request controls")
        return list(controls)

    def _preprocess(self, blob: bytes) -> Any:
        from detserve.runtime.imaging import decode_image
        from detserve.runtime.preprocess import preprocess

        pre = self.spec.preprocess
        with _torch_threads(self.torch_threads.get("preprocess")):
            return preprocess(decode_image(blob, pre.max_image_pixels), pre)

    def _core_and_postprocess(
        self, padded_hw: tuple[int, int], items: list[Any], controls: list[RequestControls]
    ) -> list[dict[str, np.ndarray]]:
        import torch

        from detserve.families import family_of_spec, output_names
        from detserve.runtime.outputs import stack_rows

        post = self.spec.postprocess
        names = output_names(post)
        t0 = time.process_time()
        batch = torch.stack([it.tensor for it in items]).numpy()
        raw = self.session.run(list(names), {CORE_INPUT: batch})
        t1 = time.process_time()
        outputs = {name: torch.from_numpy(arr) for name, arr in zip(names, raw, strict=True)}
        info = torch.from_numpy(np.stack([it.info() for it in items]))  # each image's canvas: padded_hw
        with _torch_threads(self.torch_threads.get("postprocess")):
            rows = family_of_spec(post).run_step(post, "postprocess", outputs, info, controls)
        # images with other max_det controls have other row counts: zero-padded as a served response
        out = _detections({n: stack_rows([r[n] for r in rows]) for n in rows[0]}, len(items))
        self.stage_cpu_s["core"] += t1 - t0
        self.stage_cpu_s["postprocess"] += time.process_time() - t1
        return out

    def _step_bytes(self, blobs: Sequence[bytes]) -> dict[str, float]:
        """Multi-step: the request, the preprocessed tensor (+ image_info), then each step's outputs (by role)."""
        sizes: dict[str, float] = dict.fromkeys(["request", "preprocessed", *(s.role for s in self.steps or [])], 0.0)
        for blob in blobs:
            item = self._preprocess(blob)
            sizes["request"] += len(blob)
            sizes["preprocessed"] += item.tensor.numel() * 4 + 6 * 4
            tensors = self._run_steps([item], [self.default_controls()], time_steps=False)
            for step in self.steps or []:
                sizes[step.role] += sum(tensors[t.name].nbytes for t in step.outputs)
        return {k: v / max(len(blobs), 1) for k, v in sizes.items()}

    def _run_steps(self, items: list[Any], controls: list[RequestControls], time_steps: bool = True) -> dict[str, np.ndarray]:
        """Every tensor of the declared chain for images of one padded size, batched as one request
        (runtime/chain.py: the fused layout's stub runs the same chain)."""
        import torch

        from detserve.runtime.chain import StepChain

        chain = StepChain(self.spec.postprocess, self.steps or [], self.sessions, self.torch_threads)
        images = torch.stack([it.tensor for it in items]).numpy()
        info = np.stack([it.info() for it in items])
        return chain.run(images, info, controls, self.stage_cpu_s if time_steps else None).tensors

    def _chain(
        self, padded_hw: tuple[int, int], items: list[Any], controls: list[RequestControls]
    ) -> list[dict[str, np.ndarray]]:
        """Multi-step: detections per image (and masks where the contract has them), as the client reads them."""
        return _detections(self._run_steps(items, controls), len(items))


def _detections(tensors: dict[str, np.ndarray], n: int) -> list[dict[str, np.ndarray]]:
    """The last step's padded rows -> detections per image (and masks where the contract has them), as the client reads them."""
    out = []
    for i in range(n):
        k = int(tensors["num_detections"][i].reshape(-1)[0])
        det = {
            "boxes": tensors["boxes"][i, :k],
            "scores": tensors["scores"][i, :k],
            "labels": tensors["labels"][i, :k].astype(np.int64),
        }
        if "masks" in tensors:
            det["masks"] = tensors["masks"][i, :k]
        out.append(det)
    return out


def _declared_steps(spec: ModelSpec) -> list[Any] | None:
    """The family's declared steps after preprocessing where they are more than one core and its
    post-processing (multi-step), else None (preprocess / core / postprocess: one session, ``session``)."""
    from detserve.families import family_of_spec
    from detserve.families.base import is_single_stage

    steps = list(family_of_spec(spec.postprocess).steps(spec.postprocess))
    return None if is_single_stage(steps) else steps


def _batches(blobs: Sequence[bytes], batch_size: int) -> list[list[bytes]]:
    """As many batches as images, each starting further along the pool, so every image is measured."""
    n = len(blobs)
    return [[blobs[(i * batch_size + j) % n] for j in range(batch_size)] for i in range(n)]


def _measure_one(pipeline: InProcessPipeline, blobs: Sequence[bytes], batch_size: int, seconds: float) -> dict[str, Any]:
    """Whole batches until ``seconds`` have passed (at least one), after one untimed warm-up batch."""
    batches = _batches(blobs, batch_size)
    pipeline.run(batches[0])  # first-call costs (allocations, anchor cache) stay out
    pipeline.stage_cpu_s = dict.fromkeys(pipeline.stage_cpu_s, 0.0)
    pipeline.images_run = 0
    times: list[float] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    while not times or time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        pipeline.run(batches[len(times) % len(batches)])
        times.append(time.perf_counter() - t0)
    cpu = time.process_time() - cpu_started
    total = sum(times)
    return {
        "batch_size": batch_size,
        "batches": len(times),
        "images": len(times) * batch_size,
        "seconds": total,
        "images_per_s": len(times) * batch_size / total,
        "ms_per_batch": 1000.0 * total / len(times),
        "ms_per_batch_p50": 1000.0 * float(np.median(times)),
        "ms_per_image": 1000.0 * total / (len(times) * batch_size),
        # CPU this process used (all its threads): images per CPU-second is the limit's efficiency
        "cpu_s": cpu,
        "images_per_cpu_s": len(times) * batch_size / max(cpu, 1e-9),
        "stage_cpu_ms_per_image": {k: 1000.0 * v / max(pipeline.images_run, 1) for k, v in pipeline.stage_cpu_s.items()},
    }


def measure(
    pipeline: InProcessPipeline,
    blobs: Sequence[bytes],
    batch_sizes: Sequence[int] = (1, 2, 4, 8),
    seconds_per_size: float = 5.0,
) -> dict[str, Any]:
    """Throughput of the in-process pipeline per batch size, and the best one: the practical limit.

    Single-threaded, closed loop: each batch starts when the previous one ends, so images/s is
    what this process can do with onnxruntime's and torch's own intra-op threads.
    """
    if not blobs:
        raise ValueError("measure needs at least one image")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {tuple(batch_sizes)}")
    rows = [_measure_one(pipeline, blobs, int(b), seconds_per_size) for b in batch_sizes]
    best = max(rows, key=lambda r: r["images_per_s"])
    return {
        "detector": pipeline.spec.detector,
        "version_dir": str(pipeline.version_dir),
        "images_in_pool": len(blobs),
        "seconds_per_size": seconds_per_size,
        "per_batch_size": rows,
        "best_batch_size": int(best["batch_size"]),
        "best_images_per_s": best["images_per_s"],
        "best_images_per_cpu_s": best["images_per_cpu_s"],
        "stage_cpu_ms_per_image": best["stage_cpu_ms_per_image"],
    }
