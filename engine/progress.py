"""The one progress callback shape every long engine job uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["PreviewFn", "ProgressFn", "no_preview", "no_progress"]

# progress(step, total, info): step in [0, total]; info holds job-specific figures (loss, psnr...).
ProgressFn = Callable[[int, int, dict[str, Any]], None]
# preview(job_id, jpeg): a first look at one job's result while it is still being refined.
PreviewFn = Callable[[str, bytes], None]


def no_progress(step: int, total: int, info: dict[str, Any]) -> None:
    """A progress callback that ignores everything."""


def no_preview(job_id: str, jpeg: bytes) -> None:
    """A preview callback that ignores everything."""
