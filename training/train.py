"""Train the demo detector (SSDlite320-MobileNetV3, from scratch) on the generated shapes dataset, on a CPU.

    python -m training.train --out detserve/weights/demo_ssdlite320_shapes.pt

Reproducible: images are a pure function of (split seed, index) and torch is seeded, so the same
command on the same torch build gives the same weights. Writes the weights (fp16 state dict, loaded
into fp32 by detserve) and ``<out>.json`` with the provenance: command, dataset splits, training
settings, loss curve, wall time, environment, and the held-out test metrics of *these* weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detserve.families.torchvision.models import build_detector
from detserve.hashing import file_sha256
from training.synthetic import CLASSES, NUM_CLASSES, SPLITS, SplitConfig, coco_dict, render

DETECTOR = "ssdlite320_mobilenet_v3_large"


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)


def batch(cfg: SplitConfig, start: int, size: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    images, targets = [], []
    for i in range(start, start + size):
        s = render(cfg, i % cfg.num_images)
        images.append(to_tensor(s.image))
        targets.append({"boxes": torch.from_numpy(s.boxes), "labels": torch.from_numpy(s.labels)})
    return images, targets


@torch.no_grad()
def evaluate(model: torch.nn.Module, cfg: SplitConfig, n: int | None = None, max_det: int = 100) -> dict[str, float]:
    """COCO metrics of ``model`` on the first ``n`` images of split ``cfg`` (no score threshold)."""
    from detserve.families.torchvision.models import reference
    from detserve.verification.evaluation import ImageDetections, coco_metrics

    model.eval()
    n = cfg.num_images if n is None else n
    samples = [(f"{cfg.name}_{i:06d}.png", render(cfg, i)) for i in range(n)]
    dets = {}
    for image_id, (_, s) in enumerate(samples, start=1):
        # no score threshold and the cap inside the model too, exactly as `detserve eval` scores PyTorch
        out = reference(model, s.image, score_threshold=0.0, iou_threshold=None, max_det=max_det)
        dets[image_id] = ImageDetections(out["boxes"], out["scores"], out["labels"])
    return coco_metrics(coco_dict(cfg, samples), dets, max_det=max_det)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("detserve/weights/demo_ssdlite320_shapes.pt"))
    ap.add_argument("--iterations", type=int, default=1800)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--val-every", type=int, default=300, help="val mAP every N iterations (0: only at the end)")
    ap.add_argument("--val-images", type=int, default=100)
    ap.add_argument(
        "--eval-images",
        type=int,
        default=None,
        help="final metrics on the first N images of val and test (default: the whole splits; fewer for a smoke run)",
    )
    return ap.parse_args(argv)


@dataclass(frozen=True)
class TrainingRun:
    loss_curve: list[dict[str, float]]  # smoothed loss every 50 steps and at the last
    val_curve: list[dict[str, float]]  # val metrics every --val-every steps
    seconds: float


def optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """AdamW with weight decay on the weights only (no decay on biases and norm parameters: ndim <= 1)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return params, torch.optim.AdamW(groups, lr=lr)


def train(model: torch.nn.Module, args: argparse.Namespace) -> TrainingRun:
    """``args.iterations`` steps of warm-up + cosine AdamW on the train split, drawn in order (it repeats past its end)."""
    params, opt = optimizer(model, args.lr, args.weight_decay)
    curve, val_curve = [], []
    t0 = time.monotonic()
    running = None
    for step in range(args.iterations):
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.iterations, args.lr, args.warmup)
        images, targets = batch(SPLITS["train"], step * args.batch_size, args.batch_size)
        loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)  # from scratch, the first steps' gradients are large
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 50 == 0 or step == args.iterations - 1:
            el = time.monotonic() - t0
            curve.append({"step": step, "loss": round(running, 4), "seconds": round(el, 1)})
            print(f"step {step:5d}  loss {running:.3f}  lr {opt.param_groups[0]['lr']:.2e}  {el / 60:.1f} min", flush=True)
        if args.val_every and step and step % args.val_every == 0:
            m = evaluate(model, SPLITS["val"], args.val_images)
            val_curve.append({"step": step, **{k: round(v, 4) for k, v in m.items()}})
            print(f"  val@{step}: mAP {m['mAP']:.3f}  AP50 {m['AP50']:.3f}", flush=True)
    return TrainingRun(curve, val_curve, time.monotonic() - t0)


def save_fp16(model: torch.nn.Module, out: Path) -> torch.nn.Module:
    """Store the weights as fp16 (half the size); returns the detector loaded from the file, as detserve loads it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}, out)
    return build_detector(DETECTOR, num_classes=NUM_CLASSES, checkpoint=out)


def final_metrics(stored: torch.nn.Module, n: int | None) -> dict[str, dict[str, float]]:
    """Val and held-out test metrics of the weights as stored (test at both caps `detserve eval` reports)."""
    return {
        "val": evaluate(stored, SPLITS["val"], n),
        "test_max_det_100": evaluate(stored, SPLITS["test"], n, max_det=100),
        "test_max_det_500": evaluate(stored, SPLITS["test"], n, max_det=500),
    }


def provenance(
    args: argparse.Namespace, argv: list[str] | None, run: TrainingRun, metrics: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """The ``<out>.json`` record: what was trained, how, on what, where, and how well."""
    return {
        "detector": DETECTOR,
        "num_classes": NUM_CLASSES,
        "classes": ["__background__", *CLASSES],
        "weights": {"file": args.out.name, "sha256": file_sha256(args.out), "dtype": "float16"},
        "command": "python -m training.train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "dataset": {name: cfg.to_json() for name, cfg in SPLITS.items()},
        "train_images_seen": args.iterations * args.batch_size,
        "train_seconds": round(run.seconds, 1),
        "loss_curve": run.loss_curve,
        "val_curve": run.val_curve,
        "metrics": {k: {n: round(v, 4) for n, v in m.items()} for k, m in metrics.items()},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": __import__("torchvision").__version__,
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "threads": args.threads,
        },
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)  # before the model is built: its initial weights come from this seed
    torch.set_num_threads(args.threads)
    if args.iterations * args.batch_size > SPLITS["train"].num_images:
        print(f"note: {args.iterations * args.batch_size} samples > {SPLITS['train'].num_images} train images: the split repeats")
    model = build_detector(DETECTOR, num_classes=NUM_CLASSES)
    run = train(model, args)
    # every metric below is measured on the weights as stored (fp16)
    metrics = final_metrics(save_fp16(model, args.out), args.eval_images)
    for k, m in metrics.items():
        print(f"{k}: " + "  ".join(f"{n} {v:.4f}" for n, v in m.items()))
    record = provenance(args, argv, run, metrics)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')} (trained {run.seconds / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
