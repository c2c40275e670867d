"""Durable file writes shared by the media store and the weights cache."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["fsync_dir", "write_atomic"]


def write_atomic(path: Path, write: Callable[[BinaryIO], object], *, tmp_dir: Path | None = None,
                 tmp_prefix: str = ".tmp-") -> None:
    """Write ``path`` through a temporary file (in ``tmp_dir``, default the same folder; it must be
    on the same filesystem), fsync it, rename it into place, fsync the folder: ``path`` never holds
    a half-written file, and a crash leaves at most a ``tmp_prefix*`` file behind."""
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix, dir=tmp_dir or path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every OS can open a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
