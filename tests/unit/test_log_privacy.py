"""The log privacy checker (tests/log_privacy.py) flags what it must, and only that."""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from log_privacy import assert_no_private_data, capturing_logs, find_private_data, read_log
from PIL import Image

TOKEN = "123456789:AAE-fake_SECRET_token-for-tests"

CLEAN = """\
2025-01-02 10:11:12,345 INFO stylebot.worker: engine worker tg-e2e ready (demo model, cpu)
2025-01-02 10:11:13,001 INFO stylebot.worker: batch 7d3f0c2a9b8e4f6a8c1d2e3f4a5b6c7d: 2 invert job(s)
2025-01-02 10:11:13,002 DEBUG httpx: HTTP Request: POST http://127.0.0.1:4242/bot<token>/getUpdates "200 OK"
2025-01-02 10:11:13,003 DEBUG aiosqlite: executing functools.partial(<method execute>, 'SELECT ...', \
('3f2a9c1b0d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a.png', <memory at 0x7f14f030fb80>))
2025-01-02 10:11:14,500 INFO stylebot.engine: inversion 20/20 loss 0.1234 lpips 0.456 took 1.5 s
2025-01-02 10:11:14,501 DEBUG PIL.PngImagePlugin: STREAM b'IHDR' 16 13
2025-01-02 10:11:14,502 DEBUG discord.gateway: {"op": 10, "d": {"heartbeat_interval": 41250.0}}
2025-01-02 10:11:14,503 DEBUG stylebot.engine: quad [[1.5, 2.5], [3.5, 4.5], [5.5, 6.5]] size 256
"""


@pytest.fixture
def photo(astronaut: Image.Image) -> bytes:
    buf = io.BytesIO()
    astronaut.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def latent() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((18, 512)).astype(np.float32)  # [num_ws, w_dim]


def _kinds(text: str, **kw: object) -> list[str]:
    return [f.kind for f in find_private_data(text, **kw)]  # type: ignore[arg-type]


def test_an_ordinary_log_passes(photo: bytes, latent: np.ndarray) -> None:
    scan = assert_no_private_data(CLEAN, secrets=[TOKEN], face_data=[photo, latent.tobytes()])
    assert scan.lines == CLEAN.count("\n") + 1 and scan.chars == len(CLEAN)


@pytest.mark.parametrize("leak", [
    f"POST http://127.0.0.1/bot{TOKEN}/getUpdates",
    f"token={TOKEN.split(':')[1][:20]}",  # only part of the secret half
    "url=http%3A%2F%2Fx%2Fbot123456789%3AAAE-fake_SECRET",  # percent-encoded
])
def test_a_token_is_flagged_and_not_repeated(leak: str) -> None:
    text = CLEAN + f"2025-01-02 10:11:15,000 DEBUG telegram.ext: {leak}\n"
    assert _kinds(text, secrets=[TOKEN]) == ["secret #1"]
    with pytest.raises(AssertionError, match=f"line {len(CLEAN.splitlines()) + 1}: secret #1") as err:
        assert_no_private_data(text, secrets=[TOKEN])
    assert "SECRET" not in str(err.value) and "AAE" not in str(err.value)  # masked, all of it


def test_a_secret_too_short_to_check_is_refused() -> None:
    with pytest.raises(ValueError, match="shorter than 8"):
        find_private_data(CLEAN, secrets=["abc"])


@pytest.mark.parametrize("form", ["whole base64", "base64 slice", "urlsafe slice", "hex head",
                                  "HEX third", "repr head", "raw bytes"])
def test_photo_bytes_are_flagged_in_every_form(photo: bytes, form: str) -> None:
    n = len(photo)
    leak = {
        "whole base64": base64.b64encode(photo).decode(),
        "base64 slice": base64.b64encode(photo[n // 3 - 40:n // 3 + 40]).decode(),
        "urlsafe slice": base64.urlsafe_b64encode(photo[2 * n // 3 - 41:]).decode()[:120],
        "hex head": photo[:30].hex(),
        "HEX third": photo[n // 3 - 40:n // 3 + 40].hex().upper(),
        "repr head": repr(photo[:60]),
        "raw bytes": photo[2 * n // 3 - 40:2 * n // 3 + 40].decode("latin-1"),
    }[form]
    text = CLEAN + f"2025-01-02 10:11:15,000 DEBUG stylebot: got {leak} from the user\n"
    kinds = _kinds(text, face_data=[b"unrelated" * 20, photo])
    assert any(k.startswith("face data #2") for k in kinds), kinds
    assert not any(k.startswith("face data #1") for k in kinds)


def test_a_short_head_is_not_the_photo() -> None:
    """The JPEG magic alone (file type sniffing) is not face data."""
    jpeg = b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(range(256)) * 4
    text = CLEAN + f"not a photo: {jpeg[:8]!r}\n"
    assert_no_private_data(text, face_data=[jpeg])


def test_zero_padding_is_not_sampled() -> None:
    assert_no_private_data(CLEAN + "00" * 20 + "\n", face_data=[bytes(1 << 16)])


def test_latent_printouts_are_flagged(latent: np.ndarray) -> None:
    for printout in (str(latent), repr(torch.from_numpy(latent)), str(latent[0, :16].tolist()),
                     " ".join(f"{x:.3f}" for x in latent[3, :20]), str(latent[:, :2])):
        kinds = _kinds(CLEAN + f"w+ {printout}\n")
        assert any("floats" in k for k in kinds), (printout[:200], kinds)
    assert "floats" not in " ".join(_kinds(CLEAN + str(latent[0, :15].tolist()) + "\n"))


def test_latent_bytes_are_flagged(latent: np.ndarray) -> None:
    data = latent.tobytes()
    kinds = _kinds(CLEAN + f"saving {data[:100]!r}\n", face_data=[data])
    assert "face data #1 (bytes repr)" in kinds
    # Without the latent to compare with, the shape of the printout still gives it away.
    [kind] = _kinds(CLEAN + f"saving {data[1000:1100]!r}\n")
    assert kind.startswith("binary data in a bytes repr")


def test_blob_shaped_text_is_flagged_without_knowing_the_blob() -> None:
    rng = np.random.default_rng(2)
    blob = rng.bytes(300)
    assert _kinds(f"x {base64.b64encode(blob).decode()}\n") == ["a base64-like run of 400 characters"]
    assert _kinds(f"x {blob[:33].hex()}\n") == ["a hex run of 66 characters"]
    assert _kinds(f"x {blob[:40].hex(' ')}\n") == ["a hex dump"]
    assert _kinds(f"x {blob[:32].hex()}.png\n") == []  # a SHA-256 digest: a media key


def test_the_capture_takes_every_logger_at_debug_then_lets_go(tmp_path: Path) -> None:
    root = logging.getLogger()
    level = root.level
    with capturing_logs() as capture:
        logging.getLogger("some.library").debug("hello %s", "there")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("stylebot.engine").exception("job %s failed", "j1")
    logging.getLogger("some.library").warning("after")
    assert capture.lines[0] == "some.library DEBUG: hello there"
    assert capture.lines[1].startswith("stylebot.engine ERROR: job j1 failed\nTraceback")
    assert "ValueError: boom" in capture.text() and "after" not in capture.text()
    assert root.level == level and capture not in root.handlers


def test_process_logs_are_read_byte_for_character(tmp_path: Path) -> None:
    path = tmp_path / "engine.log"
    path.write_bytes(b"ok\n" + bytes(range(256)))
    assert read_log(path) == "ok\n" + bytes(range(256)).decode("latin-1")
