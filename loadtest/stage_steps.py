"""Each composing model's cost on a live server, from Triton's statistics (the in-process timing
of every family's steps is ``loadtest.stages.time_steps``)."""

from __future__ import annotations

from collections.abc import Sequence


def served_step_costs(url: str, model: str, blobs: Sequence[bytes], users: int, requests: int) -> dict[str, dict[str, float]]:
    """Each composing model's cost on the live server under ``users`` concurrent clients.

    ``requests`` single-image requests (the sample photographs in turn), at most ``users`` in flight;
    Triton's statistics difference per model gives compute ms per request, the batch size its
    batcher reached, and compute ms per image (a batch's time is counted once per request in it).
    """
    import tritonclient.grpc as grpcclient

    from clients.grpc_client import DetectorClient
    from detserve.ops.tritonstats import delta, snapshot

    stats = grpcclient.InferenceServerClient(url)
    try:
        with DetectorClient(url, model) as client:
            client.detect(blobs[0])  # warm every step
            before = snapshot(stats)
            images = [blobs[i % len(blobs)] for i in range(requests)]
            results = client.detect_many(images, max_in_flight=users)
            after = snapshot(stats)
    finally:
        stats.close()
    failed = [r for r in results if not hasattr(r, "scores")]
    if failed:
        raise RuntimeError(f"{len(failed)} of {requests} requests failed: {failed[0]}")
    out = {}
    for name, split in delta(before, after).items():
        if not name.startswith(f"{model}_") or not split.requests:
            continue
        out[name.removeprefix(f"{model}_")] = {
            "compute_ms_per_request": split.compute_ms,
            "avg_batch": split.avg_batch_size,
            "compute_ms_per_image": split.compute_ms / max(split.avg_batch_size, 1.0),
            "queue_ms": split.queue_ms,
        }
    return out
