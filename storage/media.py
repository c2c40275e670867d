"""A content-addressed store for photos, renders and animations.

A key is the SHA-256 of the bytes in lowercase hex plus a suffix from a fixed list
(``"3f2a...e9.png"``); the file lives at ``root/3f/3f2a...e9.png``. Keys are validated strictly
before any path is built, so nothing that came from a user (or a JSON column) can name a file
outside the root. Writes are atomic (temporary file in the root, fsync, ``os.replace``): a key
that exists names a complete file. Storing the same bytes twice reuses the file (and refreshes
its mtime, so ``sweep`` does not take a file that was just stored again).

No database access here: callers find out which keys are still referenced (storage.repo) and
pass them to ``sweep``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from storage.files import write_atomic

__all__ = ["ALLOWED_SUFFIXES", "MediaStore", "is_media_key"]

ALLOWED_SUFFIXES = frozenset(
    {"", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".mp4", ".webm", ".npy",
     ".json", ".bin"}
)
_KEY = re.compile(r"[0-9a-f]{64}(\.[a-z0-9]{1,5})?")
_TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20


def is_media_key(key: object) -> bool:
    """Whether ``key`` is a well-formed media key (says nothing about whether the file exists)."""
    if not isinstance(key, str) or _KEY.fullmatch(key) is None:
        return False
    return key[64:] in ALLOWED_SUFFIXES


def _check_suffix(suffix: str) -> str:
    suffix = suffix.lower()
    if suffix not in ALLOWED_SUFFIXES:
        raise ValueError(f"media suffix {suffix!r} is not one of {sorted(ALLOWED_SUFFIXES)}")
    return suffix


class MediaStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"MediaStore({str(self.root)!r})"

    def path(self, key: str) -> Path:
        """Where the file of ``key`` lives. ValueError for anything that is not a media key."""
        if not is_media_key(key):
            raise ValueError(f"not a media key: {key!r}")
        return self.root / key[:2] / key

    def put(self, data: bytes, *, suffix: str) -> str:
        """Store ``data``; returns its key. The same bytes (and suffix) give the same key."""
        suffix = _check_suffix(suffix)
        key = hashlib.sha256(data).hexdigest() + suffix
        if self._reuse(key):
            return key
        self._write(key, lambda f: f.write(data))
        return key

    def put_file(self, path: Path | str, *, suffix: str) -> str:
        """Store a copy of the file at ``path`` (read in chunks); returns its key."""
        suffix = _check_suffix(suffix)
        digest = hashlib.sha256()
        with open(path, "rb") as src:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                digest.update(chunk)
        key = digest.hexdigest() + suffix
        if self._reuse(key):
            return key

        def copy(dst: BinaryIO) -> None:
            check = hashlib.sha256()
            with open(path, "rb") as src:
                for chunk in iter(lambda: src.read(_CHUNK), b""):
                    check.update(chunk)
                    dst.write(chunk)
            if check.hexdigest() + suffix != key:
                raise OSError(f"{path} changed while it was being stored")

        self._write(key, copy)
        return key

    def read(self, key: str) -> bytes:
        """The bytes of ``key``; FileNotFoundError if it is not stored."""
        return self.path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        """Remove the file of ``key``; a missing file is fine."""
        self.path(key).unlink(missing_ok=True)

    def keys(self) -> Iterator[str]:
        """Every stored key (temporary and foreign files are skipped)."""
        if not self.root.is_dir():
            return
        for shard in sorted(self.root.iterdir()):
            if not shard.is_dir() or re.fullmatch(r"[0-9a-f]{2}", shard.name) is None:
                continue
            for file in sorted(shard.iterdir()):
                if is_media_key(file.name) and file.name[:2] == shard.name and file.is_file():
                    yield file.name

    def sweep(self, referenced: set[str], *, older_than_s: float = 3600) -> list[str]:
        """Delete files not in ``referenced`` whose mtime is older than ``older_than_s``.

        Returns the deleted keys. Leftover temporary files of interrupted writes older than the
        same age are removed too. The age keeps files that were stored but whose database row
        is not committed yet.
        """
        cutoff = time.time() - older_than_s
        deleted = []
        for key in list(self.keys()):
            if key in referenced:
                continue
            path = self.path(key)
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    deleted.append(key)
        self._sweep_temporaries(cutoff)
        return deleted

    # --- internals ---------------------------------------------------------------------------

    def _reuse(self, key: str) -> bool:
        path = self.path(key)
        try:
            os.utime(path)  # stored again: not an old orphan any more
        except FileNotFoundError:
            return False
        return True

    def _write(self, key: str, write: Callable[[BinaryIO], object]) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, write, tmp_dir=self.root, tmp_prefix=_TMP_PREFIX)

    def _sweep_temporaries(self, cutoff: float) -> None:
        if not self.root.is_dir():
            return
        for file in self.root.glob(_TMP_PREFIX + "*"):
            with contextlib.suppress(FileNotFoundError):
                if file.is_file() and file.stat().st_mtime < cutoff:
                    file.unlink()
