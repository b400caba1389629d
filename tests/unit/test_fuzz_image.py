"""Fuzz decode_image + preprocessing: thousands of mutated files, only ever a valid tensor or an ImageError.

Mutations are byte flips, overwrites, insertions, deletions, truncations, duplicated runs and
"interesting" 32-bit values (0, 0xFFFF, 0x7FFFFFFF, ...) that hit size fields; PNG chunk CRCs are
optionally repaired so mutations get past the CRC check into the decoder. Examples per test:
``DETSERVE_FUZZ_EXAMPLES`` (default 2000; see docs/inputs.md for the counts that were run).
Run with ``--hypothesis-show-statistics`` to see how the outcomes split.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from detserve.errors import ImageError
from detserve.runtime.imaging import decode_image
from detserve.runtime.preprocess import preprocess
from detserve.specs import PreprocessSpec
from tests.bad_images import OPERATIONS, fuzz_seeds, mutate

EXAMPLES = int(os.environ.get("DETSERVE_FUZZ_EXAMPLES", "2000"))
# small, so a mutated header cannot make one example allocate much; the limit itself is fuzzed too
MAX_PIXELS = 1_000_000

SEEDS = fuzz_seeds()
SPECS = {
    # the parity detectors' two kinds: SSD's fixed stretch and torchvision's min/max resize
    "fixed 320": PreprocessSpec(resize_mode="fixed", fixed_size=(320, 320), min_size=320, max_size=320, size_divisible=1),
    "torchvision 256/320": PreprocessSpec(resize_mode="torchvision", min_size=256, max_size=320),
}
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # no wall-clock assertions: the machine is shared
    database=None,  # nothing written into the working tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

mutation = st.tuples(st.sampled_from(OPERATIONS), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))


def check(blob: bytes, spec_name: str) -> None:
    """The property: ImageError (from decoding or preprocessing), or a uint8 RGB array that
    preprocesses into a finite tensor."""
    try:
        rgb = decode_image(blob, MAX_PIXELS)
    except ImageError as e:
        assert e.message, "an ImageError must say what is wrong"
        event("refused: " + re.sub(r"\d+", "N", e.message.split(" (")[0].split(":")[0]))
        return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.flags.writeable
    assert 0 < rgb.shape[0] * rgb.shape[1] <= MAX_PIXELS
    try:
        out = preprocess(rgb, SPECS[spec_name])
    except ImageError as e:  # e.g. an aspect ratio whose short side would resize to 0 pixels
        assert e.message
        event("refused by preprocessing")
        return
    assert out.tensor.dtype.is_floating_point and bool(out.tensor.isfinite().all())
    event("decoded and preprocessed")


@FUZZ
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    mutations=st.lists(mutation, min_size=1, max_size=6),
    fix_crc=st.booleans(),
    spec_name=st.sampled_from(sorted(SPECS)),
)
def test_mutated_files_decode_or_raise_image_error(seed: str, mutations: list, fix_crc: bool, spec_name: str) -> None:
    check(mutate(SEEDS[seed], mutations, fix_crc=fix_crc), spec_name)


SIGNATURES = [
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF89a",
    b"II*\x00",
    b"MM\x00*",
    b"BM",
    b"RIFF\x00\x00\x00\x00WEBP",
    b"P5 ",
]


@FUZZ
@given(head=st.sampled_from([*SIGNATURES, b""]), tail=st.binary(max_size=512), spec_name=st.sampled_from(sorted(SPECS)))
def test_signature_plus_random_bytes(head: bytes, tail: bytes, spec_name: str) -> None:
    check(head + tail, spec_name)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_seed_is_valid(name: str) -> None:
    """Fuzzing starts from files that decode, or the mutations would only ever test the error path."""
    assert decode_image(SEEDS[name], MAX_PIXELS).shape[2] == 3
