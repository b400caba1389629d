"""Raw CenterNet / CornerNet heatmaps -> detections, as mmdet's ``predict`` gives them (runtime: torch only).

The same torch operations in the same order as mmdet 3.3's ``CenterNetHead._decode_heatmap`` and
``CornerHead._decode_heatmap`` (``get_local_maximum``, ``get_topk_from_heatmap``,
``transpose_and_gather_feat``), one image at a time as mmdet runs them; CornerNet's
``batched_nms`` + ``soft_nms`` (mmcv's C++ CPU loop) repeated in torch by :func:`soft_nms`. The
image's placement on its canvas (mmdet's ``border``) follows from ``image_info``: the test
pipeline pastes the whole image centred, at ``canvas // 2 - size // 2``. Never imports mmdet.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from detserve.families.mmdet.spec import CORNER_PAIRS_KEPT, SOFT_NMS_METHODS

if TYPE_CHECKING:
    import torch

    from detserve.families.mmdet.spec import MmdetDecodeSpec
    from detserve.specs import RequestControls


def border(padded_hw: Sequence[int], original_hw: Sequence[int]) -> tuple[int, int]:
    """(top, left) of the image on its canvas: mmdet's ``RandomCenterCropPad`` test mode pastes it whole, centred."""
    return padded_hw[0] // 2 - int(original_hw[0]) // 2, padded_hw[1] // 2 - int(original_hw[1]) // 2


def _local_maximum(heat: torch.Tensor, kernel: int) -> torch.Tensor:
    import torch.nn.functional as F

    hmax = F.max_pool2d(heat, kernel, stride=1, padding=(kernel - 1) // 2)
    return heat * (hmax == heat).float()


def _topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    import torch

    batch, _, height, width = scores.size()
    topk_scores, topk_inds = torch.topk(scores.view(batch, -1), k)
    topk_clses = topk_inds // (height * width)
    topk_inds = topk_inds % (height * width)
    topk_ys = topk_inds // width
    topk_xs = (topk_inds % width).int().float()
    return topk_scores, topk_inds, topk_clses, topk_ys, topk_xs


def _gather(feat: torch.Tensor, ind: torch.Tensor) -> torch.Tensor:
    """mmdet's ``transpose_and_gather_feat``."""
    feat = feat.permute(0, 2, 3, 1).contiguous()
    feat = feat.view(feat.size(0), -1, feat.size(3))
    dim = feat.size(2)
    return feat.gather(1, ind.unsqueeze(2).expand(ind.size(0), ind.size(1), dim))


def centernet_image(
    spec: MmdetDecodeSpec, heat: torch.Tensor, wh: torch.Tensor, off: torch.Tensor, canvas: Sequence[int], top_left: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image ([1, C, h, w] ...): boxes (minus the border), scores, labels of the top-k peaks, by score."""
    import torch

    height, width = heat.shape[2:]
    inp_h, inp_w = canvas
    heat = _local_maximum(heat, spec.kernel)
    scores, index, labels, ys, xs = _topk(heat, spec.topk)
    wh, off = _gather(wh, index), _gather(off, index)
    xs = xs + off[..., 0]
    ys = ys + off[..., 1]
    tl_x = (xs - wh[..., 0] / 2) * (inp_w / width)
    tl_y = (ys - wh[..., 1] / 2) * (inp_h / height)
    br_x = (xs + wh[..., 0] / 2) * (inp_w / width)
    br_y = (ys + wh[..., 1] / 2) * (inp_h / height)
    boxes = torch.stack([tl_x, tl_y, br_x, br_y], dim=2).view(-1, 4)
    boxes = boxes - boxes.new_tensor([top_left[1], top_left[0], top_left[1], top_left[0]])
    return boxes, scores.view(-1), labels.view(-1)


def cornernet_pairs(
    spec: MmdetDecodeSpec, raw: dict[str, torch.Tensor], canvas: Sequence[int], top_left: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image: mmdet's ``CornerHead._decode_heatmap`` (embedding grouping) and its ``keepinds`` filter."""
    import torch

    k = spec.topk
    tl_heat, br_heat = raw["tl_heat"].sigmoid(), raw["br_heat"].sigmoid()
    batch, _, height, width = tl_heat.size()
    inp_h, inp_w = canvas
    tl_scores, tl_inds, tl_clses, tl_ys, tl_xs = _topk(_local_maximum(tl_heat, spec.kernel), k)
    br_scores, br_inds, br_clses, br_ys, br_xs = _topk(_local_maximum(br_heat, spec.kernel), k)
    tl_ys = tl_ys.view(batch, k, 1).repeat(1, 1, k)
    tl_xs = tl_xs.view(batch, k, 1).repeat(1, 1, k)
    br_ys = br_ys.view(batch, 1, k).repeat(1, k, 1)
    br_xs = br_xs.view(batch, 1, k).repeat(1, k, 1)
    tl_off = _gather(raw["tl_off"], tl_inds).view(batch, k, 1, 2)
    br_off = _gather(raw["br_off"], br_inds).view(batch, 1, k, 2)
    tl_xs = tl_xs + tl_off[..., 0]
    tl_ys = tl_ys + tl_off[..., 1]
    br_xs = br_xs + br_off[..., 0]
    br_ys = br_ys + br_off[..., 1]
    tl_xs *= inp_w / width
    tl_ys *= inp_h / height
    br_xs *= inp_w / width
    br_ys *= inp_h / height
    y_off, x_off = float(top_left[0]), float(top_left[1])
    tl_xs -= x_off
    tl_ys -= y_off
    br_xs -= x_off
    br_ys -= y_off
    zeros = tl_xs.new_zeros(*tl_xs.size())
    tl_xs = torch.where(tl_xs > 0.0, tl_xs, zeros)
    tl_ys = torch.where(tl_ys > 0.0, tl_ys, zeros)
    br_xs = torch.where(br_xs > 0.0, br_xs, zeros)
    br_ys = torch.where(br_ys > 0.0, br_ys, zeros)
    bboxes = torch.stack((tl_xs, tl_ys, br_xs, br_ys), dim=3)
    tl_emb = _gather(raw["tl_emb"], tl_inds).view(batch, k, 1)
    br_emb = _gather(raw["br_emb"], br_inds).view(batch, 1, k)
    dists = torch.abs(tl_emb - br_emb)
    scores = (tl_scores.view(batch, k, 1).repeat(1, 1, k) + br_scores.view(batch, 1, k).repeat(1, k, 1)) / 2
    tl_clses = tl_clses.view(batch, k, 1).repeat(1, 1, k)
    br_clses = br_clses.view(batch, 1, k).repeat(1, k, 1)
    negative = -1 * torch.ones_like(scores)
    scores = torch.where(tl_clses != br_clses, negative, scores)
    scores = torch.where(br_xs <= tl_xs, negative, scores)
    scores = torch.where(br_ys <= tl_ys, negative, scores)
    scores = torch.where(dists > spec.distance_threshold, negative, scores)
    scores, inds = torch.topk(scores.view(batch, -1), CORNER_PAIRS_KEPT)
    boxes = bboxes.view(batch, -1, 4).gather(1, inds.unsqueeze(2).expand(batch, inds.size(1), 4)).view(-1, 4)
    labels = tl_clses.contiguous().view(batch, -1).gather(1, inds).view(-1)
    scores = scores.view(-1)
    keep = scores > -0.1
    return boxes[keep], scores[keep], labels[keep]


# glibc's expf (sysdeps/ieee754/flt-32/e_expf.c: 2^(k/32) from a table times a cubic, in double, then
# rounded once): mmcv's soft-NMS calls std::exp on floats, i.e. this function. torch.exp (SLEEF) gave
# 4306 different floats in 400 003 arguments in [-2, 0], exp in double rounded to float 238; this 0.
_EXP_N = 32
_EXP_SHIFT = float.fromhex("0x1.8p+52")
_EXP_INVLN2N = float.fromhex("0x1.71547652b82fep+0") * _EXP_N
_EXP_POLY = (
    float.fromhex("0x1.c6af84b912394p-5") / _EXP_N**3,
    float.fromhex("0x1.ebfce50fac4f3p-3") / _EXP_N**2,
    float.fromhex("0x1.62e42ff0c52d6p-1") / _EXP_N,
)


def _exp_table() -> list[int]:
    """``__exp2f_data.tab``: the bits of 2^(i/32) minus i << 47, as signed int64."""
    out = []
    for i in range(_EXP_N):
        bits = struct.unpack("<Q", struct.pack("<d", 2.0 ** (i / _EXP_N)))[0] - (i << 47)
        out.append(bits - (1 << 64) if bits >= 1 << 63 else bits)
    return out


_EXP_TABLE = _exp_table()


def expf(x: torch.Tensor) -> torch.Tensor:
    """float32 exp bit-equal to glibc's ``expf`` for arguments in its normal range (|x| < 88)."""
    import torch

    z = _EXP_INVLN2N * x.double()
    kd = z + _EXP_SHIFT
    ki = kd.view(torch.int64)
    r = z - (kd - _EXP_SHIFT)
    s = (torch.tensor(_EXP_TABLE, dtype=torch.int64)[ki % _EXP_N] + (ki << 47)).view(torch.float64)
    y = (_EXP_POLY[2] * r + 1) + (_EXP_POLY[0] * r + _EXP_POLY[1]) * (r * r)
    return (y * s).float()


def soft_nms(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, sigma: float, min_score: float, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """mmcv 2.1's ``softnms_cpu`` (offset 0) in torch: (kept boxes' new scores, their indices), in selection order.

    The C++ loop, step for step: pick the first highest remaining score, swap it to the front,
    re-weight every later box by its IoU with it (float32, the same expressions; gaussian through
    :func:`expf`), and drop a box whose score falls under ``min_score`` by moving the last box into
    its slot -- the drops of one step are replayed as that two-pointer compaction, because later
    ties are broken by position.
    """
    import torch

    x1, y1, x2, y2 = (boxes[:, i].contiguous().clone() for i in range(4))
    sc = scores.clone()
    areas = (x2 - x1) * (y2 - y1)
    inds = torch.arange(boxes.shape[0])
    cols = [x1, y1, x2, y2, sc, areas, inds]
    n, i = int(boxes.shape[0]), 0
    method_id = SOFT_NMS_METHODS.index(method)
    # the C++ takes float arguments: compare and divide by the float32 values, as it does
    thresh, sig, floor = (torch.tensor(v, dtype=torch.float32) for v in (iou_threshold, sigma, min_score))
    while i < n:
        m = i + int(torch.argmax(sc[i:n]))  # first maximum, as the C++ strict "<" scan
        if m != i:
            for col in cols:
                col[[i, m]] = col[[m, i]]
        rest = slice(i + 1, n)
        xx1, yy1 = torch.maximum(x1[rest], x1[i]), torch.maximum(y1[rest], y1[i])
        xx2, yy2 = torch.minimum(x2[rest], x2[i]), torch.minimum(y2[rest], y2[i])
        inter = (xx2 - xx1).clamp(min=0.0) * (yy2 - yy1).clamp(min=0.0)
        ovr = inter / (areas[i] + areas[rest] - inter)
        if method_id == 0:
            weight = torch.where(ovr >= thresh, 0.0, 1.0)
        elif method_id == 1:
            weight = torch.where(ovr >= thresh, 1 - ovr, 1.0)
        else:
            weight = expf(-(ovr * ovr) / sig)
        sc[rest] *= weight
        low = sc[rest] < floor
        if bool(low.any()):
            kept = int((~low).sum())
            perm = torch.arange(kept)
            holes = low[:kept].nonzero().view(-1)
            donors = (~low[kept:]).nonzero().view(-1).flip(0) + kept
            perm[holes] = donors
            for col in cols:
                col[i + 1 : i + 1 + kept] = col[i + 1 + perm]
            n = i + 1 + kept
        i += 1
    return sc[:n], inds[:n]


def cornernet_image(
    spec: MmdetDecodeSpec, raw: dict[str, torch.Tensor], canvas: Sequence[int], top_left: Sequence[int], iou: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image as mmdet's CornerNet ``predict``: pairs, ``batched_nms`` (class offsets) + soft-NMS, ``max_per_img``."""
    import torch

    boxes, scores, labels = cornernet_pairs(spec, raw, canvas, top_left)
    if labels.numel() == 0:
        return boxes, scores, labels
    # mmcv's batched_nms below its split threshold (10 000 > the 1000 pairs kept): one call, classes apart
    offsets = labels.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    new_scores, keep = soft_nms(
        boxes + offsets[:, None], scores.contiguous(), iou, spec.soft_nms_sigma, spec.soft_nms_min_score, spec.soft_nms_method
    )
    return boxes[keep][: spec.max_per_img], new_scores[: spec.max_per_img], labels[keep][: spec.max_per_img]


def decode(
    spec: MmdetDecodeSpec,
    outputs: dict[str, torch.Tensor],
    padded_hw: Sequence[int],
    resized_hw: torch.Tensor,
    original_hw: torch.Tensor,
    controls: Sequence[RequestControls],
) -> list[dict[str, torch.Tensor]]:
    """Detections per image (boxes in original pixels, by score), as mmdet's ``predict``, then the request's
    score threshold (strictly above) and max_det. One image at a time, as mmdet's ``predict_by_feat``."""
    import torch

    original_hw = torch.as_tensor(original_hw).reshape(-1, 2)
    n = int(original_hw.shape[0])
    if len(controls) != n:
        raise ValueError(f"{len(controls)} controls for {n} images")
    canvas = (int(padded_hw[0]), int(padded_hw[1]))
    out = []
    for i, c in enumerate(controls):
        raw = {name: t[i : i + 1].float().cpu() for name, t in outputs.items()}
        top_left = border(canvas, original_hw[i].tolist())
        if spec.head == "centernet":
            boxes, scores, labels = centernet_image(spec, raw["center_heatmap"], raw["wh"], raw["offset"], canvas, top_left)
        else:
            boxes, scores, labels = cornernet_image(spec, raw, canvas, top_left, c.iou_threshold)
        keep = (scores > c.score_threshold).nonzero().view(-1)[: c.max_det]
        out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return out
