"""One spread-init for every family's seeded test fixture: untrained heads that score over 0..1.

A randomly initialised detector scores near-uniformly (or ~0 everywhere), which cannot test NMS,
thresholds, verification or parity. The fixture re-draws the last layers of the heads from a fixed
seed, measures their outputs on a fixed input, scales each to a target spread and shifts the class
logits so that about ``fraction_above`` of them score above 0.05. Deterministic: every user of a
seed (repository builds, the Flask baseline, tests) gets the same weights. Not a trained model.

Each family's ``models.py`` calls :func:`spread_init` with its head layers and parameters (what
differs: the probe input, where the class logits are measured, whether the shift is one for all
layers or one per layer, SSD's background column). R-CNN's fixture, which standardises every
output channel on a photograph, uses the same pieces (:func:`redraw`, :func:`captured_outputs`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

LOGIT_005 = math.log(0.05 / 0.95)  # the logit of a 0.05 score


def redraw(layers: Sequence[Any], gen: torch.Generator, fan_in: bool = False) -> None:
    """Weights from N(0, 1) (divided by sqrt(in_features) for linear heads with ``fan_in``) drawn
    from ``gen`` in order, biases zero."""
    import torch

    with torch.no_grad():
        for layer in layers:
            weight = torch.randn(layer.weight.shape, generator=gen)
            layer.weight.copy_(weight / math.sqrt(layer.in_features) if fan_in else weight)
            if layer.bias is not None:
                layer.bias.zero_()


def _flat(output: torch.Tensor) -> torch.Tensor:
    return output.flatten()


@contextlib.contextmanager
def captured_outputs(
    layers: Sequence[Any], rows: Callable[[torch.Tensor], torch.Tensor] = _flat
) -> Iterator[dict[int, list[torch.Tensor]]]:
    """``id(layer)`` -> the outputs (as ``rows``) of every forward pass run inside the block."""
    captured: dict[int, list[torch.Tensor]] = {id(layer): [] for layer in layers}
    hooks = [layer.register_forward_hook(lambda m, i, o: captured[id(m)].append(rows(o))) for layer in layers]
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()


def first_million(scores: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The quantile's sample: the first 10^6 values (torch.quantile refuses inputs above 16 M)."""
    return scores[:1_000_000]


def fill_bias(layer: Any, shift: float) -> None:
    layer.bias.fill_(shift)


def spread_init(
    seed: int,
    probe: Callable[[torch.Generator], Any],
    cls: Sequence[Any],
    box: Sequence[Any] = (),
    *,
    logit_std: float = 3.0,
    box_std: float = 0.3,
    fraction_above: float | None = 0.002,
    per_layer_shift: bool = False,
    sample: Callable[[torch.Tensor, torch.Generator], torch.Tensor] = first_million,
    set_bias: Callable[[Any, float], None] = fill_bias,
    logits: Callable[[Any], torch.Tensor] | None = None,
    fan_in: bool = False,
    also_redrawn: Sequence[Any] = (),
    before_probe: Callable[[torch.Generator], None] | None = None,
) -> None:
    """Spread the scores of ``cls`` (the last class-logit layers) and the outputs of ``box`` (box layers).

    ``also_redrawn`` (re-drawn first, never scaled), ``cls`` and ``box`` get seeded weights
    (:func:`redraw`); ``before_probe`` may draw more from the generator; ``probe(gen)`` runs the model
    once on a fixed input it draws from the generator. Each box layer is scaled so its outputs have
    std ``box_std``; each class layer so its logits have std ``logit_std`` -- or, with ``logits``
    (the class logits read off the probe's result, for tied or nested heads), one factor for all.
    Then the bias is shifted so that about ``fraction_above`` of the (sampled) scaled logits pass
    0.05 (``None``: no shift), over all class layers at once or per layer (``per_layer_shift``).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    redraw([*also_redrawn, *cls, *box], gen, fan_in)
    with torch.no_grad():
        if before_probe is not None:
            before_probe(gen)
        with captured_outputs([] if logits is not None else [*cls, *box]) as captured:
            result = probe(gen)
        for layer in box:
            layer.weight.mul_(box_std / (float(torch.cat(captured[id(layer)]).std()) or 1.0))
        if logits is None:
            scaled = [_scale(layer, torch.cat(captured[id(layer)]), logit_std) for layer in cls]
        else:
            out = logits(result)
            factor = logit_std / (float(out.std()) or 1.0)
            scaled = [out * factor]
            for layer in cls:
                layer.weight.mul_(factor)
        groups = [[s] for s in scaled] if per_layer_shift else [scaled]
        shifts = [_shift(torch.cat(g), fraction_above, sample, gen) for g in groups]
        for i, layer in enumerate(cls):
            set_bias(layer, shifts[i] if per_layer_shift else shifts[0])


def _scale(layer: Any, out: torch.Tensor, std: float) -> torch.Tensor:
    """Scale ``layer`` so that its outputs ``out`` get std ``std``; the scaled outputs."""
    factor = std / (float(out.std()) or 1.0)
    layer.weight.mul_(factor)
    return out * factor


def _shift(
    scaled: torch.Tensor,
    fraction_above: float | None,
    sample: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    gen: torch.Generator,
) -> float:
    """The bias that puts ``fraction_above`` of the logits above a 0.05 score (0: none asked)."""
    import torch

    if fraction_above is None:
        return 0.0
    return LOGIT_005 - float(torch.quantile(sample(scaled, gen), 1 - fraction_above))
