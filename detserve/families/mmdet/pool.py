"""CornerNet's corner pooling, rewritten so that it exports to ONNX and stays exact (torch only).

mmcv's ``CornerPool`` is ``torch.cummax`` along one axis (flipped for the top/left directions).
``cummax`` exports to no ONNX opset (neither exporter); mmcv's older fallback, an in-place loop
``x[:, :, i] = max(x[:, :, i], x[:, :, i - 1])``, traces into Identity nodes and is silently wrong in
ONNX Runtime (measured off by 8.0). The rewrite here is out of place: the running maximum by
doubling, ``y = max(y, y shifted by s)`` for s = 1, 2, 4, ... with the first s positions kept, which
is exactly ``cummax`` (a maximum is exact; each position sees every earlier one after
ceil(log2 L) steps). The number of steps is fixed when the graph is built (``max_side``): a longer
axis would be pooled only over its last 2^steps positions, so the preprocessing refuses canvases
over that side.
"""

from __future__ import annotations

import math

import torch

# mmcv's CornerPool modes -> (dim, flip), as its forward: top/left pool from the far end
MODES = {"bottom": (2, False), "left": (3, True), "right": (3, False), "top": (2, True)}


def steps_for(max_side: int) -> int:
    """Doubling steps that cover an axis of ``max_side`` positions."""
    return max(1, math.ceil(math.log2(max(2, max_side))))


def running_max(x: torch.Tensor, dim: int, steps: int) -> torch.Tensor:
    """``torch.cummax(x, dim).values`` for axes of at most 2**steps positions, without cummax."""
    y = x
    for i in range(steps):
        s = 1 << i
        head = _slice(y, dim, 0, s)  # slices past the end are empty or whole, in torch and in ONNX
        tail = torch.maximum(_slice(y, dim, s, None), _slice(y, dim, 0, -s))
        y = torch.cat([head, tail], dim)
    return y


def _slice(y: torch.Tensor, dim: int, start: int, stop: int | None) -> torch.Tensor:
    index = [slice(None)] * y.dim()
    index[dim] = slice(start, stop)
    return y[tuple(index)]


class ExportableCornerPool(torch.nn.Module):
    """Drop-in for mmcv's ``CornerPool(mode)``: the same values, an exportable graph."""

    def __init__(self, mode: str, steps: int) -> None:
        super().__init__()
        self.dim, self.flip = MODES[mode]
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip:
            x = x.flip(self.dim)
        y = running_max(x, self.dim, self.steps)
        return y.flip(self.dim) if self.flip else y
