"""Weights cache: downloads from a local HTTP server (127.0.0.1 only), resume, hash checks."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from engine.errors import WeightsError, WeightsMissingError
from engine.weights import (
    MANIFEST,
    Asset,
    asset_path,
    fetch,
    find,
    list_assets,
    locate,
    recorded_hashes_path,
    stylebot_home,
    verify,
    weights_dir,
)

PAYLOAD = os.urandom(8192 + 123)  # a few KB, not a multiple of the chunk sizes used
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class FakeServer:
    """What the local server serves and what it saw."""

    url: str = ""
    payload: bytes = PAYLOAD
    ignore_range: bool = False
    drop_once_after: int | None = None  # send this many body bytes, then hang up (once)
    ranges: list[str | None] = field(default_factory=list)  # Range header of each request
    sent: list[int] = field(default_factory=list)  # body bytes sent per request


def _handler(state: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/blob.bin":
                self.send_error(404)
                return
            rng = self.headers.get("Range")
            state.ranges.append(rng)
            body, start = state.payload, 0
            m = re.fullmatch(r"bytes=(\d+)-", rng or "")
            if m and not state.ignore_range:
                start = int(m.group(1))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    state.sent.append(0)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            rest = body[start:]
            self.send_header("Content-Length", str(len(rest)))
            self.end_headers()
            if state.drop_once_after is not None:
                rest, state.drop_once_after = rest[: state.drop_once_after], None
                self.close_connection = True
            self.wfile.write(rest)
            state.sent.append(len(rest))

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def server() -> Iterator[FakeServer]:
    state = FakeServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/blob.bin"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("STYLEBOT_HOME", str(tmp_path))
    return tmp_path


def _asset(url: str, *, sha256: str | None = None, prefix: str | None = None) -> Asset:
    return Asset(
        name="test-blob", kind="generator", url=url, filename="blob.bin",
        description="random bytes", licence="test data", sha256=sha256, sha256_prefix=prefix,
    )


def _part(home: Path) -> Path:
    return weights_dir(home) / "blob.bin.part"


def test_good_full_hash_is_accepted_and_file_is_in_place(server: FakeServer, home: Path) -> None:
    asset = _asset(server.url, sha256=PAYLOAD_SHA)
    path = fetch(asset)  # home from $STYLEBOT_HOME
    assert path == home / "weights" / "blob.bin"
    assert path.read_bytes() == PAYLOAD
    assert not _part(home).exists()
    result = verify(asset)
    assert (result.present, result.ok, result.sha256) == (True, True, PAYLOAD_SHA)
    assert result.hash_kind == "published sha256"


def test_bad_full_hash_is_refused_and_leaves_no_file(server: FakeServer, home: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(WeightsError) as exc:
        fetch(_asset(server.url, sha256=wrong), home=home)
    assert wrong in exc.value.message and PAYLOAD_SHA in exc.value.message
    assert not (weights_dir(home) / "blob.bin").exists()
    assert not _part(home).exists()


@pytest.mark.parametrize(("prefix", "accepted"), [(PAYLOAD_SHA[:8], True), ("397923af", False)])
def test_prefix_hash(server: FakeServer, home: Path, prefix: str, accepted: bool) -> None:
    asset = _asset(server.url, prefix=prefix)
    assert asset.hash_kind == "published sha256 prefix"
    if accepted:
        assert fetch(asset, home=home).read_bytes() == PAYLOAD
    else:
        with pytest.raises(WeightsError, match=prefix):
            fetch(asset, home=home)
        assert find(asset, home=home) is None and not _part(home).exists()


def test_resume_asks_only_for_the_rest(server: FakeServer, home: Path) -> None:
    half = len(PAYLOAD) // 2
    weights_dir(home).mkdir(parents=True)
    _part(home).write_bytes(PAYLOAD[:half])
    path = fetch(_asset(server.url, sha256=PAYLOAD_SHA), home=home)
    assert server.ranges == [f"bytes={half}-"]
    assert server.sent == [len(PAYLOAD) - half]
    assert path.read_bytes() == PAYLOAD and not _part(home).exists()


def test_server_ignoring_range_still_gives_a_correct_file(server: FakeServer, home: Path) -> None:
    server.ignore_range = True
    weights_dir(home).mkdir(parents=True)
    _part(home).write_bytes(PAYLOAD[:1000])
    path = fetch(_asset(server.url, sha256=PAYLOAD_SHA), home=home)
    assert server.ranges == ["bytes=1000-"] and server.sent == [len(PAYLOAD)]
    assert path.read_bytes() == PAYLOAD


def test_stale_part_that_is_not_a_prefix_is_caught_by_the_hash(
    server: FakeServer, home: Path
) -> None:
    weights_dir(home).mkdir(parents=True)
    _part(home).write_bytes(b"x" * 1000)  # junk from somewhere else: resume gives a bad file
    asset = _asset(server.url, sha256=PAYLOAD_SHA)
    with pytest.raises(WeightsError, match="hash"):
        fetch(asset, home=home)
    assert not _part(home).exists()
    assert fetch(asset, home=home).read_bytes() == PAYLOAD  # the retry starts from scratch


def test_interrupted_download_keeps_only_the_part_then_resumes(
    server: FakeServer, home: Path
) -> None:
    server.drop_once_after = 3000
    asset = _asset(server.url, sha256=PAYLOAD_SHA)
    with pytest.raises(WeightsMissingError) as exc:
        fetch(asset, home=home)
    final = weights_dir(home) / "blob.bin"
    assert str(final) in exc.value.message and "resume" in exc.value.message
    assert not final.exists()
    assert _part(home).read_bytes() == PAYLOAD[:3000]

    assert fetch(asset, home=home).read_bytes() == PAYLOAD
    assert server.ranges == [None, "bytes=3000-"]
    assert not _part(home).exists()


def test_complete_part_is_finished_without_downloading_again(
    server: FakeServer, home: Path
) -> None:
    weights_dir(home).mkdir(parents=True)
    _part(home).write_bytes(PAYLOAD)  # e.g. killed between download and rename
    path = fetch(_asset(server.url, sha256=PAYLOAD_SHA), home=home)
    assert path.read_bytes() == PAYLOAD
    assert server.sent == [0]  # one 416 answer, no body


def test_hash_recorded_at_first_download_then_tampering_is_noticed(
    server: FakeServer, home: Path
) -> None:
    asset = _asset(server.url)
    assert asset.hash_kind == "recorded at first download"
    path = fetch(asset, home=home)
    recorded = json.loads(recorded_hashes_path(home).read_text())
    assert recorded["test-blob"]["sha256"] == PAYLOAD_SHA
    assert verify(asset, home=home).ok

    path.write_bytes(b"tampered" + PAYLOAD[8:])
    result = verify(asset, home=home)
    assert result.present and not result.ok
    assert result.expected == PAYLOAD_SHA and PAYLOAD_SHA in result.message

    fetch(asset, home=home)  # a broken file is downloaded again and checked
    assert path.read_bytes() == PAYLOAD and verify(asset, home=home).ok


def test_recorded_hash_refuses_a_changed_upstream_file(server: FakeServer, home: Path) -> None:
    asset = _asset(server.url)
    fetch(asset, home=home)
    server.payload = os.urandom(len(PAYLOAD))
    with pytest.raises(WeightsError) as exc:
        fetch(asset, home=home, force=True)
    assert str(recorded_hashes_path(home)) in exc.value.message
    assert asset_path(asset, home=home).read_bytes() == PAYLOAD  # old good file untouched
    assert not _part(home).exists()


def test_present_valid_file_is_not_downloaded_again_unless_forced(
    server: FakeServer, home: Path
) -> None:
    asset = _asset(server.url, sha256=PAYLOAD_SHA)
    fetch(asset, home=home)
    fetch(asset, home=home)
    assert len(server.ranges) == 1
    fetch(asset, home=home, force=True)
    assert len(server.ranges) == 2


def test_file_placed_by_hand_is_trusted_and_recorded(server: FakeServer, home: Path) -> None:
    asset = _asset(server.url)
    weights_dir(home).mkdir(parents=True)
    asset_path(asset, home=home).write_bytes(PAYLOAD)
    assert verify(asset, home=home).expected is None  # nothing to compare with yet
    fetch(asset, home=home)
    assert server.ranges == []
    assert verify(asset, home=home).expected == PAYLOAD_SHA


def test_unreachable_server_says_where_to_put_the_file(home: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    asset = _asset(f"http://127.0.0.1:{port}/blob.bin", sha256=PAYLOAD_SHA)
    with pytest.raises(WeightsMissingError) as exc:
        fetch(asset, home=home)
    message = exc.value.message
    assert str(asset_path(asset, home=home)) in message and asset.url in message
    assert "\n" not in message
    assert not _part(home).exists() and find(asset, home=home) is None


def test_silent_server_times_out(home: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/blob.bin"
        with pytest.raises(WeightsMissingError, match="timed out"):
            fetch(_asset(url, sha256=PAYLOAD_SHA), home=home, timeout=0.3)


def test_http_error_is_one_clear_line(server: FakeServer, home: Path) -> None:
    asset = _asset(server.url.replace("blob.bin", "nope.bin"), sha256=PAYLOAD_SHA)
    with pytest.raises(WeightsMissingError, match="HTTP 404") as exc:
        fetch(asset, home=home)
    assert str(asset_path(asset, home=home)) in exc.value.message


def test_locate_missing_asset_names_file_path_and_command(home: Path) -> None:
    assert find("stylegan2-ffhq-1024") is None
    with pytest.raises(WeightsMissingError) as exc:
        locate("stylegan2-ffhq-1024")
    message = exc.value.message
    expected_path = home / "weights" / "ffhq.pkl"
    assert "ffhq.pkl" in message and str(expected_path) in message
    assert "stylebot weights fetch stylegan2-ffhq-1024" in message
    assert MANIFEST["stylegan2-ffhq-1024"].url in message and "\n" not in message

    expected_path.parent.mkdir(parents=True)
    expected_path.write_bytes(b"placed by hand")
    assert locate("stylegan2-ffhq-1024") == expected_path


def test_progress_counts_bytes_up_to_the_total(server: FakeServer, home: Path) -> None:
    calls: list[tuple[int, int, dict[str, Any]]] = []
    fetch(
        _asset(server.url, sha256=PAYLOAD_SHA), home=home, chunk_size=1000,
        progress=lambda step, total, info: calls.append((step, total, info)),
    )
    steps = [step for step, _, _ in calls]
    assert len(steps) > 5
    assert steps == sorted(set(steps))  # strictly increasing
    assert steps[-1] == len(PAYLOAD)
    assert {total for _, total, _ in calls} == {len(PAYLOAD)}
    assert all(info == {"asset": "test-blob"} for _, _, info in calls)


def test_list_assets_is_a_cheap_table_of_the_manifest(home: Path) -> None:
    rows = list_assets()
    assert [r.name for r in rows] == list(MANIFEST)
    assert not any(r.present for r in rows)
    vgg = asset_path("vgg16-imagenet")
    vgg.parent.mkdir(parents=True)
    vgg.write_bytes(b"123")
    (vgg.parent / (vgg.name + ".part")).write_bytes(b"12")
    row = {r.name: r for r in list_assets()}["vgg16-imagenet"]
    assert (row.present, row.size_on_disk, row.partial_bytes) == (True, 3, 2)
    assert row.path == vgg and row.hash_kind == "published sha256 prefix"
    assert not verify("vgg16-imagenet").ok  # b"123" does not have the published prefix


def test_home_defaults_and_unknown_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("STYLEBOT_HOME", raising=False)
    assert stylebot_home() == Path.home() / ".cache" / "stylebot"
    monkeypatch.setenv("STYLEBOT_HOME", str(tmp_path))
    assert weights_dir() == tmp_path / "weights"
    with pytest.raises(WeightsError, match="clip-vit-b32"):  # lists the known names
        locate("no-such-model")
    missing = verify("clip-vit-b32")
    assert (missing.present, missing.ok) == (False, False)


def test_manifest_sanity() -> None:
    assert set(MANIFEST) == {
        "stylegan2-ffhq-1024", "clip-vit-b32", "vgg16-imagenet", "facenet-vggface2", "e4e-ffhq",
    }
    assert len({a.filename for a in MANIFEST.values()}) == len(MANIFEST)
    for name, asset in MANIFEST.items():
        assert asset.name == name
        if asset.url is None:  # downloaded by hand (tests/unit/test_weights_by_hand.py)
            assert asset.page is not None and asset.page.startswith("https://")
            assert asset.hash_kind == "recorded at first download"
            continue
        assert asset.url.startswith("https://")
        assert asset.url.rsplit("/", 1)[1] == asset.filename
        assert asset.hash_kind in {
            "published sha256", "published sha256 prefix", "recorded at first download",
        }
        assert asset.licence and asset.description
    clip = MANIFEST["clip-vit-b32"]
    assert clip.hash_kind == "published sha256"
    assert clip.sha256 == clip.url.split("/")[-2] and len(clip.sha256) == 64
    vgg = MANIFEST["vgg16-imagenet"]
    assert vgg.sha256_prefix is not None and f"-{vgg.sha256_prefix}." in vgg.filename
    assert "lpips" in vgg.description
    assert MANIFEST["stylegan2-ffhq-1024"].hash_kind == "recorded at first download"
    assert MANIFEST["facenet-vggface2"].hash_kind == "recorded at first download"


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_second_concurrent_download_is_refused(server: FakeServer, home: Path) -> None:
    import fcntl

    weights_dir(home).mkdir(parents=True)
    with open(_part(home), "ab") as other:  # another process is writing this .part
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(WeightsError, match="another download"):
            fetch(_asset(server.url, sha256=PAYLOAD_SHA), home=home)
    assert server.ranges == []
