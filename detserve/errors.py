"""One error root for everything a user can get wrong.

The CLI prints ``message`` and ``hint`` and exits 1 for a :class:`DetserveError`; any other
exception is a bug in detserve and keeps its traceback.
"""

from __future__ import annotations


class DetserveError(Exception):
    """A problem the user can fix: bad input, missing file, server that will not start."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class SpecError(DetserveError):
    """A preprocessing/post-processing/model spec is invalid or cannot be read."""


class CheckpointError(DetserveError):
    """A checkpoint is missing, corrupt or does not fit the detector."""


class VerificationError(DetserveError):
    """A converted model disagrees with its reference beyond the tolerance."""


class ImageError(DetserveError):
    """An encoded image cannot be decoded or breaks a limit."""


class RequestError(DetserveError):
    """A request carries invalid controls (thresholds, max detections)."""


class ServerError(DetserveError):
    """The Triton server cannot be started, or a model failed to load."""


class ClientError(DetserveError):
    """The server refused or failed a request."""
