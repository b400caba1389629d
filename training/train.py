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
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
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
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train, val, test = SPLITS["train"], SPLITS["val"], SPLITS["test"]
    if args.iterations * args.batch_size > train.num_images:
        print(f"note: {args.iterations * args.batch_size} samples > {train.num_images} train images: the split repeats")
    model = build_detector(DETECTOR, num_classes=NUM_CLASSES)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    curve, val_curve = [], []
    t0 = time.monotonic()
    running = None
    for step in range(args.iterations):
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.iterations, args.lr, args.warmup)
        images, targets = batch(train, step * args.batch_size, args.batch_size)
        losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 50 == 0 or step == args.iterations - 1:
            el = time.monotonic() - t0
            curve.append({"step": step, "loss": round(running, 4), "seconds": round(el, 1)})
            print(f"step {step:5d}  loss {running:.3f}  lr {opt.param_groups[0]['lr']:.2e}  {el / 60:.1f} min", flush=True)
        if args.val_every and step and step % args.val_every == 0:
            m = evaluate(model, val, args.val_images)
            val_curve.append({"step": step, **{k: round(v, 4) for k, v in m.items()}})
            print(f"  val@{step}: mAP {m['mAP']:.3f}  AP50 {m['AP50']:.3f}", flush=True)
    train_seconds = time.monotonic() - t0

    # Store fp16 (half the size); every metric below is measured on the weights as stored.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}, args.out)
    stored = build_detector(DETECTOR, num_classes=NUM_CLASSES, checkpoint=args.out)
    metrics = {
        "val": evaluate(stored, val),
        "test_max_det_100": evaluate(stored, test, max_det=100),
        "test_max_det_500": evaluate(stored, test, max_det=500),
    }
    for k, m in metrics.items():
        print(f"{k}: " + "  ".join(f"{n} {v:.4f}" for n, v in m.items()))
    record = {
        "detector": DETECTOR,
        "num_classes": NUM_CLASSES,
        "classes": ["__background__", *CLASSES],
        "weights": {"file": args.out.name, "sha256": file_sha256(args.out), "dtype": "float16"},
        "command": "python -m training.train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "dataset": {name: cfg.to_json() for name, cfg in SPLITS.items()},
        "train_images_seen": args.iterations * args.batch_size,
        "train_seconds": round(train_seconds, 1),
        "loss_curve": curve,
        "val_curve": val_curve,
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
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')} (trained {train_seconds / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
