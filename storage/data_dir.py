"""Moving users' data (database, media) out of the cache dir, where older versions kept it.

Cache cleaners delete ``~/.cache``; faces and latents people chose to keep must not go with it.
:func:`move_old_data` runs at start-up, before anything opens the database, and moves the old
data dir to the new one:

- on one filesystem, with one ``rename``: it has happened or it has not;
- across filesystems, by copying into a hidden folder beside the new dir (each file synced), then
  renaming that into place and only then deleting the old dir. A marker in the new dir names the
  old one until it is gone, so a start after an interruption finishes the job: a half copy is
  made again from the intact old dir, a half deletion is completed.

Nothing is moved when both dirs hold data (the new one is used; the old one is left and said).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["MARKER", "move_old_data"]

log = logging.getLogger("stylebot")

MARKER = ".moved-from"  # in the new dir while the old one may still exist


def move_old_data(old: Path, new: Path) -> bool:
    """Move ``old`` (a data dir an older version used) to ``new`` when only ``old`` holds data, or
    finish a move that was interrupted. True when data was moved or a move finished now."""
    if not old.is_dir() and not (new / MARKER).exists():
        return False  # the usual start: nothing to move
    new.parent.mkdir(parents=True, exist_ok=True)
    with _locked(new.parent / f".{new.name}.lock"):  # two processes starting at once move it once
        if (new / MARKER).exists():
            return _finish(old, new)
        if not old.is_dir():
            return False
        if new.exists() and any(new.iterdir()):
            log.warning("data found both in %s and in %s: using %s; the other is left as it is",
                        new, old, new)
            return False
        try:
            os.rename(old, new)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _copy_then_switch(old, new)
            return _finish(old, new)
        log.info("moved your data (database and media) from %s to %s", old, new)
        return True


def _copy_then_switch(old: Path, new: Path) -> None:
    staging = new.parent / f".{new.name}.moving"
    if staging.exists():
        shutil.rmtree(staging)  # a copy cut short: the old dir is whole, copy it again
    shutil.copytree(old, staging, copy_function=_copy_file, symlinks=True)
    (staging / MARKER).write_text(str(old), encoding="utf-8")
    _sync(staging)
    if new.exists():
        new.rmdir()  # empty (checked): rename does not replace a folder on every system
    os.rename(staging, new)
    _sync(new.parent)


def _finish(old: Path, new: Path) -> bool:
    """The copy in ``new`` is whole: remove the old dir it came from, then the marker."""
    named = Path((new / MARKER).read_text(encoding="utf-8"))
    if named != old:
        log.warning("%s says it was moved from %s, not %s; leaving both as they are", new, named, old)
        return False
    if old.exists():
        shutil.rmtree(old)
    (new / MARKER).unlink()
    log.info("moved your data (database and media) from %s to %s", old, new)
    return True


def _copy_file(src: str, dst: str) -> None:
    shutil.copy2(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())


def _sync(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
