"""Frozen, validated specs: how an image becomes the core's input, and a request's controls.

How raw outputs become boxes is each family's decode spec (``detserve/families/<name>/spec.py``).

A spec is declared once per model, stored in the repository (as JSON in a config parameter and
as a file in each version directory) and used by the server *and* by every reference path, so
serving cannot drift from what the model was trained/evaluated with.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, get_args

from detserve.errors import SpecError

ResizeMode = Literal["torchvision", "fixed", "ultralytics", "transformers", "mmdet_center"]
ColorOrder = Literal["RGB", "BGR"]

T = TypeVar("T")


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise SpecError(msg)


def _tuple(value: Any) -> Any:
    """JSON gives lists; specs hold tuples so they stay hashable and frozen."""
    if isinstance(value, list | tuple):
        return tuple(_tuple(v) for v in value)
    return value


def _from_mapping(cls: type[T], data: Mapping[str, Any]) -> T:
    if not isinstance(data, Mapping):
        raise SpecError(f"{cls.__name__} must be a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise SpecError(
            f"unknown key(s) for {cls.__name__}: {', '.join(unknown)}",
            hint=f"valid keys: {', '.join(names)}",
        )
    try:
        return cls(**{k: _tuple(v) for k, v in data.items()})
    except TypeError as e:  # a required key missing
        raise SpecError(f"cannot build {cls.__name__}: {e}") from e


class Spec:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        return _from_mapping(cls, data)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"{cls.__name__} is not valid JSON: {e}") from e
        return _from_mapping(cls, data)


@dataclass(frozen=True)
class PreprocessSpec(Spec):
    """How encoded image bytes become the core model's input tensor.

    ``resize_mode``:
      - ``torchvision``: torchvision's ``GeneralizedRCNNTransform`` (scale so the short side is
        ``min_size`` unless the long side would pass ``max_size``), bilinear, no corner alignment;
      - ``fixed``: stretch to ``fixed_size`` (what SSD models do);
      - ``ultralytics``: ultralytics' own ``LetterBox`` as its predictor runs it on a fixed canvas
        (``auto=False``): OpenCV ``INTER_LINEAR`` resize of the uint8 pixels, its rounding of the
        new size and of the centred padding, pad ``pad_value * pixel_max`` (114), then 0..1;
      - ``transformers``: a Hugging Face image processor's torchvision backend (RT-DETR, D-FINE,
        DETR): the uint8 pixels resized by ``torchvision.transforms.v2.functional.resize``
        (bilinear, antialias) to ``fixed_size`` without keeping aspect, or, without ``fixed_size``,
        so the short side is ``min_size`` and the long side at most ``max_size`` (the processor's
        ``shortest_edge``/``longest_edge`` arithmetic); then ``x * (1 / pixel_max)``, or, when
        ``image_mean``/``image_std`` are not 0/1, the processor's fused normalisation
        ``(x - mean * pixel_max) / (std * pixel_max)``. No padding (``size_divisible`` 1).
      - ``mmdet_center``: mmdet's ``RandomCenterCropPad`` in test mode (CenterNet, CornerNet): no
        resize; the image pasted centred (at ``canvas // 2 - size // 2``; an odd side equal to its
        canvas loses its last pixel row/column, as in mmdet) on a canvas of
        ``(side | (size_divisible - 1)) + center_pad_add`` filled with ``center_pad_fill`` (raw pixel
        values, the core's channel order), then normalised as a whole (``pixel_max`` 1: mmdet's float
        pixels); ``max_size`` is the largest canvas side accepted, ``min_size`` only sizes the trace.
    The order matches torchvision: scale to 0..1, normalise, resize, pad (bottom/right) to a
    multiple of ``size_divisible``. ``pad_value`` is in normalised units, like torchvision's 0
    (for ``ultralytics``: 114 / 255, the uint8 fill ``round(pad_value * pixel_max)``).
    """

    resize_mode: ResizeMode = "torchvision"
    min_size: int = 800
    max_size: int = 1333
    fixed_size: tuple[int, int] | None = None  # (height, width)
    size_divisible: int = 32
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    pixel_max: float = 255.0  # uint8 pixels are divided by this (torchvision: x.float() / 255)
    color_order: ColorOrder = "RGB"
    grey: Literal["replicate"] = "replicate"  # a grey image becomes 3 equal channels
    pad_value: float = 0.0
    interpolation: Literal["bilinear"] = "bilinear"
    max_image_pixels: int = 40_000_000  # refused before decoding (decompression bombs)
    # the sum over a request's images, read from their headers before any is decoded: decoding and
    # pre-processing cost 0.11-0.14 s per M pixels on one busy CPU core whatever the bytes (a 116 KB
    # black PNG declares 40 M: 4.6 s). 64 M: one image at the default limit plus more, 7 x 4K UHD,
    # an 8K (33 M) and 3 x 4K, 5 x 12-M phone photos; a request at the budget took 9 s here, where
    # 8 x 40 M took ~40 s. Overridden when serving by DETSERVE_MAX_REQUEST_PIXELS (serve --max-request-pixels).
    max_request_pixels: int = 64_000_000
    center_pad_fill: tuple[float, float, float] = (0.0, 0.0, 0.0)  # mmdet_center only
    center_pad_add: int = 0  # mmdet_center only: RandomCenterCropPad's test_pad_add_pix

    def __post_init__(self) -> None:
        check(
            self.resize_mode in get_args(ResizeMode),
            f"resize_mode must be one of {get_args(ResizeMode)}, got {self.resize_mode!r}",
        )
        check(self.color_order in get_args(ColorOrder), f"color_order must be RGB or BGR, got {self.color_order!r}")
        check(self.grey == "replicate", f"grey must be 'replicate', got {self.grey!r}")
        check(self.interpolation == "bilinear", f"interpolation must be 'bilinear', got {self.interpolation!r}")
        if self.resize_mode in ("torchvision", "mmdet_center") or (
            self.resize_mode == "transformers" and self.fixed_size is None
        ):
            check(0 < self.min_size <= self.max_size, f"need 0 < min_size <= max_size, got {self.min_size}, {self.max_size}")
        else:
            check(
                self.fixed_size is not None and len(self.fixed_size) == 2 and min(self.fixed_size) > 0,
                f"resize_mode {self.resize_mode!r} needs fixed_size=(height, width) > 0, got {self.fixed_size}",
            )
        check(self.size_divisible >= 1, f"size_divisible must be >= 1, got {self.size_divisible}")
        if self.resize_mode == "ultralytics":
            self._check_ultralytics()
        if self.resize_mode == "mmdet_center":
            check(
                self.size_divisible & (self.size_divisible - 1) == 0 and self.center_pad_add >= 0,
                f"resize_mode 'mmdet_center' ors the sides with size_divisible - 1: a power of two, got {self.size_divisible}",
            )
        if self.resize_mode == "transformers":
            check(
                self.size_divisible == 1,
                f"resize_mode 'transformers' pads nothing: size_divisible must be 1, got {self.size_divisible}",
            )
        check(len(self.image_mean) == 3 and len(self.image_std) == 3, "image_mean and image_std need 3 values")
        check(all(s > 0 for s in self.image_std), f"image_std must be > 0, got {self.image_std}")
        check(self.pixel_max > 0, f"pixel_max must be > 0, got {self.pixel_max}")
        check(self.max_image_pixels > 0, f"max_image_pixels must be > 0, got {self.max_image_pixels}")
        check(self.max_request_pixels > 0, f"max_request_pixels must be > 0, got {self.max_request_pixels}")

    def _check_ultralytics(self) -> None:
        """The uint8 canvas is the core's input: no stride padding on top, an integral pad byte."""
        assert self.fixed_size is not None  # checked before
        check(
            all(s % self.size_divisible == 0 for s in self.fixed_size),
            f"resize_mode 'ultralytics' needs fixed_size a multiple of size_divisible ({self.size_divisible}), got {self.fixed_size}",
        )
        fill = self.pad_value * self.pixel_max
        check(
            0 <= fill <= 255 and abs(fill - round(fill)) < 1e-6,
            f"resize_mode 'ultralytics' pads uint8 pixels: pad_value * pixel_max must be an integer in 0..255, got {fill}",
        )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.resize_mode != "mmdet_center":  # every other model's stored spec (configs, hashes) stays as it was
            del out["center_pad_fill"], out["center_pad_add"]
        return out

    @property
    def fixed_input_hw(self) -> tuple[int, int] | None:
        """The core's spatial input size when every image gets the same one, else None."""
        if self.fixed_size is None or self.resize_mode == "torchvision":
            return None
        d = self.size_divisible
        return (math.ceil(self.fixed_size[0] / d) * d, math.ceil(self.fixed_size[1] / d) * d)

    @property
    def trace_hw(self) -> tuple[int, int]:
        """The input size an export traces with: the fixed size, else a typical 4:3 landscape image."""
        if self.fixed_input_hw is None:  # torchvision, or transformers' shortest/longest edge
            short = min(self.min_size, self.max_size * 3 // 4)
            return self.padded_hw((short, min(self.max_size, short * 4 // 3)))
        assert self.fixed_input_hw is not None  # checked on construction
        return self.fixed_input_hw

    def padded_hw(self, resized_hw: tuple[int, int]) -> tuple[int, int]:
        d = self.size_divisible
        if self.resize_mode == "mmdet_center":  # RandomCenterCropPad's ('logical_or', d - 1) test padding
            return ((resized_hw[0] | (d - 1)) + self.center_pad_add, (resized_hw[1] | (d - 1)) + self.center_pad_add)
        return (math.ceil(resized_hw[0] / d) * d, math.ceil(resized_hw[1] / d) * d)


MAX_DET_LIMIT = 10_000


class ControlDefaults(Protocol):
    """What every family's decode spec holds: the model's own per-request defaults."""

    @property
    def score_thresh(self) -> float: ...

    @property
    def nms_thresh(self) -> float: ...

    @property
    def detections_per_img(self) -> int: ...


@dataclass(frozen=True)
class RequestControls:
    """Per-request knobs; each request may choose its own (thresholds are per scenario)."""

    score_threshold: float
    iou_threshold: float
    max_det: int

    def __post_init__(self) -> None:
        from detserve.errors import RequestError

        if not (0.0 <= self.score_threshold <= 1.0) or math.isnan(self.score_threshold):
            raise RequestError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        if not (0.0 < self.iou_threshold <= 1.0):
            raise RequestError(f"iou_threshold must be in (0, 1], got {self.iou_threshold}")
        if not (1 <= self.max_det <= MAX_DET_LIMIT):
            raise RequestError(f"max_det must be in [1, {MAX_DET_LIMIT}], got {self.max_det}")

    @classmethod
    def from_parameters(cls, params: Mapping[str, Any], spec: ControlDefaults) -> RequestControls:
        """Read controls from request parameters, falling back to the model's own defaults.

        An unknown parameter name or a value of the wrong type is the request's error (checked first).
        """
        values = request_controls(params)
        return cls(
            score_threshold=float(values.get("score_threshold", spec.score_thresh)),
            iou_threshold=float(values.get("iou_threshold", spec.nms_thresh)),
            max_det=int(values.get("max_det", spec.detections_per_img)),
        )


# The request parameters a detection request may carry: its controls, and what a client or detserve's
# gate adds for deadlines (read by detserve/runtime/backend/common.py). Anything else is refused by
# name, so a misspelling (``score_thresh``, ``conf``) is an error rather than silently ignored.
CONTROL_PARAMETERS = ("score_threshold", "iou_threshold", "max_det")
DEADLINE_PARAMETERS = ("detserve_deadline", "detserve-arrival", "detserve-timeout")
# KServe's binary-data extension: tritonclient's HTTP client sets it on the request when it names no outputs
PROTOCOL_PARAMETERS = ("binary_data_output",)
REQUEST_PARAMETERS = CONTROL_PARAMETERS + DEADLINE_PARAMETERS + PROTOCOL_PARAMETERS


def request_controls(params: Mapping[str, Any]) -> dict[str, float | int]:
    """The controls a request sets, type-checked; an unknown parameter name is refused listing the accepted ones.

    HTTP carries parameters as int, bool or string only (a float must be sent as a string), gRPC as
    int64, double, bool or string: every form of a number is read, nothing else.
    """
    from detserve.errors import RequestError

    unknown = sorted(set(params) - set(REQUEST_PARAMETERS))
    if unknown:
        raise RequestError(
            f"unknown request parameter(s) {', '.join(repr(k) for k in unknown)}: accepted are "
            f"{', '.join(CONTROL_PARAMETERS)} (and {', '.join(DEADLINE_PARAMETERS)} for deadlines)"
        )
    out: dict[str, float | int] = {}
    for key in CONTROL_PARAMETERS:
        if key in params:
            out[key] = _integer(key, params[key]) if key == "max_det" else _number(key, params[key])
    return out


def _number(key: str, value: Any) -> float:
    from detserve.errors import RequestError

    if not isinstance(value, bool) and isinstance(value, int | float | str):
        try:
            return float(value)
        except ValueError:
            pass
    raise RequestError(f"{key} must be a number, got {value!r}")


def _integer(key: str, value: Any) -> int:
    """An int, or a float or string that holds a whole number ("100", 100.0); anything else is refused."""
    from detserve.errors import RequestError

    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float | str) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if math.isfinite(number) and number.is_integer():
            return int(number)
    raise RequestError(f"{key} must be an integer, got {value!r}")
