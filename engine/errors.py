"""Typed engine errors. Each carries a short machine code and a message meant for a person.

The CLI prints ``message`` as one line; the bot service maps ``code`` to a kind reply.
"""

from __future__ import annotations

__all__ = [
    "BadImageError",
    "CheckpointError",
    "EngineError",
    "NoFaceError",
    "WeightsError",
    "WeightsMissingError",
]


class EngineError(Exception):
    """Base class for errors caused by input or environment, not by a bug."""

    code = "engine_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadImageError(EngineError):
    """The file is not an image we can read (format, size, corruption)."""

    code = "bad_image"


class NoFaceError(EngineError):
    """No face was found in the photo (or it is too small to align)."""

    code = "no_face"


class CheckpointError(EngineError):
    """A checkpoint file is malformed, unsupported, or tries to run code."""

    code = "bad_checkpoint"


class WeightsError(EngineError):
    """Downloading or verifying a weights file failed."""

    code = "weights_error"


class WeightsMissingError(WeightsError):
    """A needed weights file is not in the cache (and could not be downloaded)."""

    code = "weights_missing"
