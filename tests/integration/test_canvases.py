"""Every image of a request on its own canvas, in the layouts not covered by the parity modules.

The parity modules send a mixed-size multi-image request to each family's ensemble
(``test_each_image_of_a_multi_image_request_answers_as_alone``); here the fused CPU layout of a
padding family (FCOS: pre-processing, core and decode in one stub, grouping images by canvas).
"""

from __future__ import annotations

from pathlib import Path

from detserve.ops.server import running_server
from tests.detector_fixtures import assert_each_image_answered_alone, mixed_size_images


def test_fused_fcos_answers_each_image_as_alone(repository: Path, samples: dict[str, bytes], tmp_path: Path) -> None:
    from converters.fused import FusedOptions, fused_repository

    fused = fused_repository(repository, tmp_path / "fused", "fcos", FusedOptions(instances=1))
    with running_server(fused) as server:
        assert_each_image_answered_alone(server.options.grpc_url, "fcos", mixed_size_images(samples), "fcos-fused")
