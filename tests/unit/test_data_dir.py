"""Moving an existing install's data out of the cache dir: all of it arrives, and a move cut short
at any point (a crash, a power cut) loses nothing and is finished by the next start."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import pytest

from storage import data_dir
from storage.data_dir import MARKER, move_old_data


class Crash(BaseException):
    """The process dies here (nothing after it runs, no handler catches it)."""


def _old_install(root: Path) -> dict[str, bytes]:
    """A data dir as earlier versions left it under the cache dir: database, WAL, media."""
    files = {"stylebot.db": b"SQLite format 3\0" + bytes(4000), "stylebot.db-wal": b"wal" * 100,
             "media/ab/ab12.jpg": b"\xff\xd8\xff" + os.urandom(2000),
             "media/cd/cd34.png": b"\x89PNG" + os.urandom(3000), "media/cd/cd35.npy": os.urandom(512)}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def _contents(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    old = tmp_path / "cache" / "stylebot" / "data"
    new = tmp_path / "share" / "stylebot"
    return old, new, _old_install(old)


def _other_filesystem(monkeypatch: pytest.MonkeyPatch, old: Path) -> None:
    """``rename`` of the old dir fails as it does across filesystems."""
    rename = os.rename

    def cross_device(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(src) == old:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", cross_device)


def test_data_moves_whole_and_says_so(dirs: tuple[Path, Path, dict[str, bytes]],
                                      caplog: pytest.LogCaptureFixture) -> None:
    old, new, files = dirs
    with caplog.at_level(logging.INFO, logger="stylebot"):
        assert move_old_data(old, new)
    assert _contents(new) == files and not old.exists()
    assert f"moved your data (database and media) from {old} to {new}" in caplog.text
    assert not move_old_data(old, new)  # the next start: nothing to do
    assert _contents(new) == files


def test_across_filesystems_data_is_copied_then_the_old_dir_removed(
    dirs: tuple[Path, Path, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new, files = dirs
    _other_filesystem(monkeypatch, old)
    assert move_old_data(old, new)
    assert _contents(new) == files and not old.exists()


def _dies_in(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, dying: object,
             old: Path, new: Path) -> None:
    """A start whose move dies in ``owner.name`` (``dying`` stands in for it and raises Crash)."""
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, dying)
    with pytest.raises(Crash):
        move_old_data(old, new)
    monkeypatch.setattr(owner, name, real)


@pytest.mark.parametrize("copied", range(5))
def test_a_copy_cut_short_is_made_again_on_the_next_start(
    dirs: tuple[Path, Path, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch, copied: int
) -> None:
    old, new, files = dirs
    _other_filesystem(monkeypatch, old)
    copy, done = data_dir._copy_file, []

    def dies_after_some(src: str, dst: str) -> None:
        if len(done) == copied:
            Path(dst).write_bytes(Path(src).read_bytes()[:10])  # half a file, then the power goes
            raise Crash
        copy(src, dst)
        done.append(src)

    _dies_in(monkeypatch, data_dir, "_copy_file", dies_after_some, old, new)
    assert _contents(old) == files and not new.exists()  # the data is where it was, whole
    assert move_old_data(old, new)
    assert _contents(new) == files and not old.exists() and not list(new.parent.glob(".*.moving"))


@pytest.mark.parametrize("removed", [0, 2, 4])
def test_a_removal_cut_short_is_finished_on_the_next_start(
    dirs: tuple[Path, Path, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch, removed: int
) -> None:
    old, new, files = dirs
    _other_filesystem(monkeypatch, old)
    rmtree = shutil.rmtree

    def dies_while_removing(path: str | os.PathLike[str], *args: object, **kwargs: object) -> None:
        if Path(path) != old:
            return rmtree(path, *args, **kwargs)  # type: ignore[arg-type]
        for victim in sorted(p for p in old.rglob("*") if p.is_file())[:removed]:
            victim.unlink()
        raise Crash

    _dies_in(monkeypatch, shutil, "rmtree", dies_while_removing, old, new)
    assert _contents(new) == {**files, MARKER: str(old).encode()}  # the copy is whole and in place
    assert move_old_data(old, new)
    assert _contents(new) == files and not old.exists()


def test_data_in_both_places_is_left_as_it_is(dirs: tuple[Path, Path, dict[str, bytes]],
                                              caplog: pytest.LogCaptureFixture) -> None:
    old, new, files = dirs
    new.mkdir(parents=True)
    (new / "stylebot.db").write_bytes(b"newer")
    with caplog.at_level(logging.WARNING, logger="stylebot"):
        assert not move_old_data(old, new)
    assert _contents(old) == files and _contents(new) == {"stylebot.db": b"newer"}
    assert "data found both in" in caplog.text
