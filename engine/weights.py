"""Weights manifest and download cache (stdlib only: no torch, no requests).

Files live in ``$STYLEBOT_HOME/weights`` (default ``~/.cache/stylebot/weights``). A download
streams into ``<file>.part`` (resumed with an HTTP Range request), is hashed as it streams,
checked, fsynced and only then renamed into place: the final path never holds a half file.

Hash kinds (:attr:`Asset.hash_kind`): a full sha256 upstream publishes; a published prefix
(torchvision puts one in its file names); or, where nothing is published, the hash "recorded
at first download" in ``weights/recorded_hashes.json`` that later downloads and ``verify``
must match (trust on first use; a file placed by hand is recorded when ``fetch`` first sees it).

An asset with no stable download URL (``url=None``: files shared on a file host, e.g. the e4e
encoder on Google Drive) has a ``page`` to download it from by hand: ``fetch`` says where to get it
and where to put it, and once it is there records its hash like any other.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO, Literal

from engine.errors import WeightsError, WeightsMissingError
from engine.progress import ProgressFn, no_progress
from settings import default_home
from storage.files import fsync_dir, write_atomic

if sys.platform != "win32":
    import fcntl

__all__ = [
    "DEFAULT_GENERATOR", "MANIFEST", "Asset", "AssetKind", "AssetRow", "HashKind", "VerifyResult",
    "asset_path", "fetch", "find", "list_assets", "locate", "recorded_hashes_path", "sha256_file",
    "stylebot_home", "verify", "weights_dir",
]

AssetKind = Literal["generator", "clip", "perceptual", "identity", "encoder"]
HashKind = Literal["published sha256", "published sha256 prefix", "recorded at first download"]

DEFAULT_GENERATOR = "stylegan2-ffhq-1024"  # what model "auto" loads when it is cached

_CHUNK = 1 << 20
_USER_AGENT = "stylebot/0.1 (weights downloader; Python urllib)"
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)")


def stylebot_home() -> Path:
    """The cache dir: ``$STYLEBOT_HOME`` if set, else ``~/.cache/stylebot`` (settings.default_home)."""
    return default_home()


def weights_dir(home: Path | None = None) -> Path:
    """The directory that holds downloaded weights."""
    return (home if home is not None else stylebot_home()) / "weights"


def recorded_hashes_path(home: Path | None = None) -> Path:
    """The JSON file with hashes recorded at first download."""
    return weights_dir(home) / "recorded_hashes.json"


@dataclass(frozen=True)
class Asset:
    """One downloadable weights file.

    ``size_bytes`` is approximate where given and ``None`` where we have not measured it; it
    is for display only and never checked. ``sha256`` / ``sha256_prefix`` are what upstream
    publishes (lower-case hex); with neither, the hash is recorded at first download.
    ``url`` is ``None`` where no stable direct download exists; ``page`` then says where a person
    downloads the file. ``for_generator``: an encoder's generator (the one it was trained with).
    """

    name: str
    kind: AssetKind
    url: str | None
    filename: str
    description: str
    licence: str
    size_bytes: int | None = None
    sha256: str | None = None
    sha256_prefix: str | None = None
    page: str | None = None
    for_generator: str | None = None

    @property
    def hash_kind(self) -> HashKind:
        if self.sha256:
            return "published sha256"
        if self.sha256_prefix:
            return "published sha256 prefix"
        return "recorded at first download"


_CLIP_SHA = "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"

_MANIFEST_ASSETS = (
    Asset(
        name="stylegan2-ffhq-1024", kind="generator", filename="ffhq.pkl",
        url="https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/ffhq.pkl",
        description="StyleGAN2-ADA FFHQ 1024x1024 generator (NVIDIA .pkl, read without "
        "running pickle code).",
        licence="NVIDIA Source Code License-NC: non-commercial use only.",
    ),
    Asset(
        name="clip-vit-b32", kind="clip", filename="ViT-B-32.pt",
        url=f"https://openaipublic.azureedge.net/clip/models/{_CLIP_SHA}/ViT-B-32.pt",
        description="OpenAI CLIP ViT-B/32 for StyleCLIP text edits (its sha256 is the one in "
        "the URL, which is how the clip package checks it).",
        licence="MIT (OpenAI CLIP).",
        sha256=_CLIP_SHA,
    ),
    Asset(
        name="vgg16-imagenet", kind="perceptual", filename="vgg16-397923af.pth",
        url="https://download.pytorch.org/models/vgg16-397923af.pth",
        description="torchvision VGG16 backbone for the LPIPS inversion loss; the LPIPS linear "
        "layers ship inside the lpips package (lpips/weights/v0.1/vgg.pth), no download.",
        licence="BSD-3-Clause (torchvision); trained on ImageNet, whose terms of access are "
        "non-commercial research: check before commercial use.",
        sha256_prefix="397923af",
    ),
    Asset(
        name="facenet-vggface2", kind="identity", filename="20180402-114759-vggface2.pt",
        url="https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/"
        "20180402-114759-vggface2.pt",
        description="FaceNet InceptionResnetV1 (VGGFace2), for the optional identity loss.",
        licence="MIT (facenet-pytorch); trained on VGGFace2, a research data set: check "
        "before commercial use.",
    ),
    Asset(
        name="e4e-ffhq", kind="encoder", filename="e4e_ffhq_encode.pt", url=None,
        for_generator="stylegan2-ffhq-1024",  # NVIDIA's ffhq.pkl is the original StyleGAN2 FFHQ
        page="https://drive.google.com/file/d/1cUv_reLE6k3604or78EranS7XzuVMWeO/view",
        description="e4e FFHQ encoder (Tov et al. 2021, github.com/omertov/encoder4editing: "
        "'FFHQ Inversion' in its README), the authors' checkpoint as saved (about 1.2 GB, with "
        "their StyleGAN2 FFHQ decoder, which we ignore); read weights-only. Shared on Google "
        "Drive only: download it by hand; its hash is recorded when first seen.",
        licence="MIT (encoder4editing); the file also holds NVIDIA's StyleGAN2 FFHQ generator "
        "(NVIDIA Source Code License-NC) and was trained on FFHQ (CC BY-NC-SA 4.0): "
        "non-commercial use only.",
    ),
)
MANIFEST: Mapping[str, Asset] = MappingProxyType({a.name: a for a in _MANIFEST_ASSETS})


@dataclass(frozen=True)
class VerifyResult:
    name: str
    path: Path
    present: bool
    ok: bool
    sha256: str | None  # the file's hash, None when absent
    expected: str | None  # full hash or prefix it must match; None when nothing to compare
    hash_kind: HashKind
    message: str


@dataclass(frozen=True)
class AssetRow:
    """One row of ``stylebot weights list`` (no hashing: cheap to build)."""

    name: str
    kind: AssetKind
    present: bool
    size_on_disk: int | None
    partial_bytes: int | None  # size of a ``.part`` left by an interrupted download
    hash_kind: HashKind
    licence: str
    path: Path


def _resolve(name_or_asset: str | Asset) -> Asset:
    if isinstance(name_or_asset, Asset):
        return name_or_asset
    asset = MANIFEST.get(name_or_asset)
    if asset is None:
        known = ", ".join(sorted(MANIFEST))
        raise WeightsError(f"unknown weights {name_or_asset!r}; known: {known}")
    return asset


def asset_path(name_or_asset: str | Asset, *, home: Path | None = None) -> Path:
    """Where the asset's file lives in the cache (whether or not it is there)."""
    return weights_dir(home) / _resolve(name_or_asset).filename


def _part_path(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def find(name_or_asset: str | Asset, *, home: Path | None = None) -> Path | None:
    """The cached file if present (not hashed), else ``None``."""
    path = asset_path(name_or_asset, home=home)
    return path if path.is_file() else None


def locate(name_or_asset: str | Asset, *, home: Path | None = None) -> Path:
    """The cached file; raises :class:`WeightsMissingError` saying how to get it."""
    asset = _resolve(name_or_asset)
    path = find(asset, home=home)
    if path is None:
        if asset.url is None:
            raise _by_hand(asset, asset_path(asset, home=home))
        raise WeightsMissingError(
            f"{asset.filename} ({asset.name}) is not downloaded: run "
            f"`stylebot weights fetch {asset.name}` or download {asset.url} "
            f"and place it at {asset_path(asset, home=home)}"
        )
    return path


def _by_hand(asset: Asset, dest: Path) -> WeightsMissingError:
    """The error for an asset without a direct download that is not in place yet."""
    return WeightsMissingError(
        f"{asset.name} has no direct download: get {asset.filename} from {asset.page} and place "
        f"it at {dest}, then run `stylebot weights fetch {asset.name}` to record its hash"
    )


def sha256_file(path: Path, *, chunk_size: int = _CHUNK) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _load_recorded(home: Path | None) -> dict[str, dict[str, object]]:
    path = recorded_hashes_path(home)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read {path} ({e}); fix or delete that file") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path} is not a JSON object; fix or delete that file")
    return {str(k): v for k, v in data.items() if isinstance(v, dict)}


def _recorded_sha(asset: Asset, home: Path | None) -> str | None:
    """The recorded hash for this asset, if one was recorded for the same URL."""
    entry = _load_recorded(home).get(asset.name) or {}
    sha = entry.get("sha256") if entry.get("url") == asset.url else None
    return sha.lower() if isinstance(sha, str) else None


def _record(asset: Asset, sha: str, size: int, home: Path | None) -> None:
    data = _load_recorded(home)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    data[asset.name] = {"url": asset.url, "filename": asset.filename, "sha256": sha,
                        "size_bytes": size, "recorded_at": now}
    path = recorded_hashes_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=True).encode()
    write_atomic(path, lambda f: f.write(text), tmp_prefix=path.name + ".")


def _expected(asset: Asset, home: Path | None) -> str | None:
    if asset.sha256:
        return asset.sha256.lower()
    if asset.sha256_prefix:
        return asset.sha256_prefix.lower()
    return _recorded_sha(asset, home)


def _matches(asset: Asset, sha: str, expected: str) -> bool:
    if asset.hash_kind == "published sha256 prefix":
        return sha.startswith(expected)
    return sha == expected


def verify(name_or_asset: str | Asset, *, home: Path | None = None) -> VerifyResult:
    """Hash the cached file and compare it with the published or recorded hash.

    A present file with no published hash and none recorded is reported ``ok`` with
    ``expected=None`` and a message saying it could not be checked.
    """
    asset = _resolve(name_or_asset)
    path = asset_path(asset, home=home)
    expected = _expected(asset, home)
    kind = asset.hash_kind
    if not path.is_file():
        msg = f"{asset.name}: not downloaded; run `stylebot weights fetch {asset.name}`"
        return VerifyResult(asset.name, path, False, False, None, expected, kind, msg)
    sha = sha256_file(path)
    if expected is None:
        msg = f"{asset.name}: present but unchecked (no published hash and none recorded yet)"
        return VerifyResult(asset.name, path, True, True, sha, None, kind, msg)
    if _matches(asset, sha, expected):
        msg = f"{asset.name}: ok ({kind} matches)"
        return VerifyResult(asset.name, path, True, True, sha, expected, kind, msg)
    msg = (
        f"{asset.name}: hash mismatch at {path}: expected {expected} ({kind}), got {sha}; "
        f"run `stylebot weights fetch {asset.name}` to download it again"
    )
    return VerifyResult(asset.name, path, True, False, sha, expected, kind, msg)


def list_assets(
    *, home: Path | None = None, assets: Iterable[Asset] | None = None
) -> list[AssetRow]:
    """Rows for the CLI table, in manifest order. Only stats files; never hashes."""
    rows = []
    for a in MANIFEST.values() if assets is None else assets:
        path = asset_path(a, home=home)
        size, part = _file_size(path), _file_size(_part_path(path))
        present = size is not None
        rows.append(AssetRow(a.name, a.kind, present, size, part, a.hash_kind, a.licence, path))
    return rows


def _file_size(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None


def fetch(
    asset: str | Asset, *, home: Path | None = None, progress: ProgressFn | None = None,
    force: bool = False, timeout: float = 60.0, chunk_size: int = _CHUNK,
) -> Path:
    """Download ``asset`` into the cache (resuming a ``.part``), check its hash, return its path.

    A file already present and valid is returned without any request unless ``force``.
    ``progress(bytes_done, total_bytes or 0, {"asset": name})`` is called as bytes arrive;
    ``timeout`` is per socket operation, in seconds. Raises :class:`WeightsMissingError`
    when the server cannot be reached or the transfer breaks (the ``.part`` is kept for a
    resume) and :class:`WeightsError` when the hash does not match (the ``.part`` is deleted).
    An asset without a URL is only checked where a person placed it (:class:`WeightsMissingError`
    saying where to get it when absent); ``force`` then records the present file's hash anew.
    """
    a = _resolve(asset)
    dest = asset_path(a, home=home)
    if a.url is None:
        return _placed_by_hand(a, dest, home=home, force=force)
    if not force and dest.is_file():
        existing = verify(a, home=home)
        if existing.ok and existing.expected is not None:
            return dest
        if existing.ok and a.name not in _load_recorded(home) and existing.sha256:
            _record(a, existing.sha256, dest.stat().st_size, home)  # placed by hand: trust it
            return dest
        # otherwise: corrupt, or left from an older URL of this asset -> download again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(dest)
    with _locked_part(a, part) as f:
        if force:
            f.truncate(0)
        try:
            report = progress or no_progress
            sha = _download(a, f, part, dest, report=report, timeout=timeout, chunk=chunk_size)
        except BaseException:
            f.flush()
            if f.seek(0, os.SEEK_END) == 0:  # nothing to resume from: leave no litter
                part.unlink(missing_ok=True)
            raise
        f.flush()
        os.fsync(f.fileno())
        size = f.seek(0, os.SEEK_END)
        expected = _expected(a, home)
        if expected is not None and not _matches(a, sha, expected):
            part.unlink(missing_ok=True)
            hint = "" if a.sha256 or a.sha256_prefix else (
                f"; if it changed upstream on purpose, delete the {a.name!r} entry in "
                f"{recorded_hashes_path(home)} and fetch again")
            raise WeightsError(
                f"{a.name} from {a.url} failed its hash check: expected {expected} "
                f"({a.hash_kind}), got {sha}; the download was deleted{hint}"
            )
        if expected is None:
            _record(a, sha, size, home)
        os.replace(part, dest)
    fsync_dir(dest.parent)
    return dest


def _placed_by_hand(a: Asset, dest: Path, *, home: Path | None, force: bool) -> Path:
    """``fetch`` for an asset without a URL: check the file a person placed, recording its hash
    the first time (or anew with ``force``); it cannot be downloaded."""
    if not dest.is_file():
        raise _by_hand(a, dest)
    sha = sha256_file(dest)
    expected = _expected(a, home)
    if expected is None or (force and not (a.sha256 or a.sha256_prefix)):
        _record(a, sha, dest.stat().st_size, home)
        return dest
    if not _matches(a, sha, expected):
        raise WeightsError(
            f"{a.name} at {dest} does not match its {a.hash_kind} hash {expected} (got {sha}); "
            f"replace it with the file from {a.page}, or run `stylebot weights fetch --force "
            f"{a.name}` to record this file's hash instead"
        )
    return dest


@contextlib.contextmanager
def _locked_part(asset: Asset, part: Path) -> Iterator[BinaryIO]:
    """Open (creating) the ``.part`` for read/write, locked against a second downloader."""
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    f = os.fdopen(fd, "r+b")
    with f:
        if sys.platform != "win32":
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WeightsError(f"another download of {asset.name} is already writing "
                                   f"{part}; wait for it to finish") from None
        yield f


def _download(
    a: Asset, f: BinaryIO, part: Path, dest: Path, *, report: ProgressFn, timeout: float,
    chunk: int,
) -> str:
    """Stream the asset onto the end of ``f``; return the sha256 of all of ``f``."""
    assert a.url is not None  # fetch() handles assets without a URL before downloading
    offset, info = f.seek(0, os.SEEK_END), {"asset": a.name}
    hasher = _keep_head(f, offset, chunk)
    opener = urllib.request.build_opener()  # reads *_proxy from the environment now
    while True:
        headers = {"User-Agent": _USER_AGENT}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            resp = opener.open(urllib.request.Request(a.url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as e:
            with e:
                _, total = _content_range(e.headers.get("Content-Range"))
            if e.code == 416 and offset:
                if total == offset:  # the .part is already the whole file
                    report(offset, offset, info)
                    return hasher.hexdigest()
                offset, hasher = 0, _keep_head(f, 0, chunk)
                continue
            raise _cannot_download(a, dest, f"HTTP {e.code} {e.reason}") from None
        except (OSError, http.client.HTTPException) as e:
            raise _cannot_download(a, dest, _reason(e)) from None
        with resp:
            length = resp.headers.get("Content-Length", "")
            total = int(length) if length.isdigit() else 0
            if resp.status == 206:
                start, end_total = _content_range(resp.headers.get("Content-Range"))
                if start != offset:
                    if not offset:
                        raise _cannot_download(a, dest, "server sent a partial file")
                    offset, hasher = 0, _keep_head(f, 0, chunk)
                    continue
                # Content-Length counts only the rest of the file
                total = end_total if end_total is not None else total + offset if total else 0
            elif resp.status == 200:
                if offset:  # server ignored Range: start over with this full body
                    offset, hasher = 0, _keep_head(f, 0, chunk)
            else:
                raise _cannot_download(a, dest, f"unexpected HTTP {resp.status}")
            done = offset
            report(done, total, info)
            while True:
                try:
                    data = resp.read(chunk)
                except (OSError, http.client.HTTPException) as e:
                    raise _interrupted(a, dest, done, total, _reason(e)) from None
                if not data:
                    break
                try:
                    f.write(data)
                except OSError as e:
                    raise WeightsError(f"could not write {part}: {e.strerror or e}") from None
                hasher.update(data)
                done += len(data)
                report(done, total, info)
            if total and done < total:
                raise _interrupted(a, dest, done, total, "connection closed early")
            if not total:
                report(done, done, info)
            return hasher.hexdigest()


def _keep_head(f: BinaryIO, size: int, chunk: int) -> hashlib._Hash:
    """Cut ``f`` to its first ``size`` bytes, hash them, leave the position at the end."""
    hasher = hashlib.sha256()
    f.seek(0)
    while f.tell() < size and (data := f.read(min(chunk, size - f.tell()))):
        hasher.update(data)
    f.truncate(f.tell())
    return hasher


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, full size) from ``bytes A-B/N`` (206) or ``bytes */N`` (416)."""
    m = _CONTENT_RANGE.fullmatch(value.strip()) if value else None
    if m is None:
        return None, None
    first = int(m.group(1)) if m.group(1) else None
    return first, None if m.group(2) == "*" else int(m.group(2))


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError):
        e = e.reason if isinstance(e.reason, BaseException) else Exception(str(e.reason))
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _cannot_download(a: Asset, dest: Path, reason: str) -> WeightsMissingError:
    return WeightsMissingError(
        f"could not download {a.name} from {a.url} ({reason}); "
        f"download it yourself and place the file at {dest}"
    )


def _interrupted(a: Asset, dest: Path, done: int, total: int, reason: str) -> WeightsMissingError:
    of = f" of {total}" if total else ""
    return WeightsMissingError(
        f"download of {a.name} from {a.url} stopped at {done}{of} bytes ({reason}); "
        f"run `stylebot weights fetch {a.name}` again to resume, or place the file at {dest}"
    )


