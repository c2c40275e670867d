"""The checks the bot runs before it stores anything: whole photos of every common format pass, cut-off
and oversized ones get a specific reply (without decoding a pixel); edit texts keep what people typed."""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from bot.replies import Refusal, check_photo, clean_text, final_reply, quality_words, queued
from storage.media import MediaStore
from storage.models import Job


def _save(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


PHOTO = Image.radial_gradient("L").convert("RGB")  # 256 x 256


def _with_thumbnail() -> bytes:
    """A JPEG whose EXIF block holds a whole JPEG thumbnail (its own FF D9 before the main scan)."""
    exif = Image.Exif()
    exif[0x0112] = 1
    thumb = _save(PHOTO.resize((64, 64)), "JPEG")
    app1 = b"Exif\0\0" + exif.tobytes() + thumb
    jpeg = _save(PHOTO, "JPEG")
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


@pytest.mark.parametrize("data", [
    _save(PHOTO, "JPEG"),
    _save(PHOTO, "JPEG", progressive=True),
    _save(PHOTO, "JPEG") + b"\0\0\0\x18ftypmp42" + bytes(64),  # a motion photo: video after the image
    _with_thumbnail(),
    _save(PHOTO, "PNG"),
    _save(PHOTO.convert("P"), "GIF"),
    _save(PHOTO, "BMP"),
    _save(PHOTO, "TIFF"),
    _save(PHOTO, "WEBP"),
], ids=["jpeg", "progressive", "trailer", "thumbnail", "png", "gif", "bmp", "tiff", "webp"])
def test_whole_photos_pass(data: bytes) -> None:
    check_photo(data)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(width: int, height: int, idat: bytes, *, before: bytes = b"", after: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + before + _chunk(b"IDAT", idat) + after
            + _chunk(b"IEND", b""))


_BOMB = zlib.compress(bytes(64 * 1024 * 1024), 9)  # 64 KB that unpack to 64 MB
_ROWS = zlib.compress(b"".join(b"\0" + bytes(64 * 3) for _ in range(64)))  # a whole 64 x 64 image


@pytest.mark.parametrize(("data", "says"), [
    (_save(PHOTO, "JPEG")[:-2000], "incomplete"),
    (_with_thumbnail()[:-2000], "incomplete"),  # the thumbnail's end marker does not count
    (_save(PHOTO, "JPEG", progressive=True)[:-500], "incomplete"),
    (_save(PHOTO, "PNG")[:-100], "incomplete"),
    (_save(PHOTO, "JPEG")[:40], "damaged"),
    (_png(100_000, 100_000, zlib.compress(bytes(1000))), "over 40 megapixels"),  # Pillow's bomb limit
    (_png(8000, 6000, zlib.compress(bytes(1000))), "over 40 megapixels"),  # under Pillow's, over ours
    (_save(PHOTO.resize((31, 400)), "PNG"), "too small (31x400 pixels)"),
    (b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(100), "HEIC"),
    (_png(64, 64, _ROWS, before=_chunk(b"iCCP", b"icc\0\0" + _BOMB)), "unpacks to far more"),
    (_png(64, 64, _ROWS, after=_chunk(b"zTXt", b"Comment\0\0" + _BOMB)), "unpacks to far more"),
    (_png(64, 64, _ROWS, after=_chunk(b"iTXt", b"Comment\0\x01\0\0\0" + _BOMB)), "unpacks to far more"),
], ids=["jpeg", "thumbnail", "progressive", "png", "header", "bomb", "48mp", "narrow", "heic",
        "profile-bomb", "text-bomb", "itext-bomb"])
def test_bad_photos_get_a_specific_refusal(data: bytes, says: str) -> None:
    with pytest.raises(Refusal, match=re.escape(says)):
        check_photo(data)


@pytest.mark.parametrize("text", [
    "smiling \U0001f469\U0001f3fd\u200d\U0001f680",  # a ZWJ emoji sequence
    "\U0001f3f4\U000e0067\U000e0062\U000e0077\U000e006c\U000e0073\U000e007f flag",  # tag characters
    "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # a ZWNJ inside a Persian word
    "<b>x</b> *y* [z](http://e)",
])
def test_edit_text_is_kept_as_typed(text: str) -> None:
    assert clean_text(text, max_chars=300) == text


def test_edit_text_loses_controls_and_extra_space() -> None:
    assert clean_text(" smile\u202e\x00  face\n", max_chars=300) == "smile face"  # a bidi override, a NUL


@pytest.mark.parametrize(("position", "ready_in", "says"), [
    (0, None, "Got it. Your selfie is next in the queue."),
    (0, 7.9, "Got it. Your selfie is next in the queue. It should be ready in about 10 s."),
    (1, 2.0, "Got it. 1 job is ahead of yours in the queue. It should be ready in about 5 s."),
    (5, 80.0, "Got it. 5 jobs are ahead of yours in the queue. It should be ready in about a minute."),
    (40, 400.0, "Got it. 40 jobs are ahead of yours in the queue. It should be ready in about 7 minutes."),
])
def test_the_queued_note_says_how_many_are_ahead_and_how_long(
    position: int, ready_in: float | None, says: str,
) -> None:
    assert queued("your selfie", position, ready_in) == says


def test_captions_name_people_and_say_quality_in_words(tmp_path: Path) -> None:
    media = MediaStore(tmp_path)
    key = media.put(b"\x89PNG\r\n\x1a\n", suffix=".png")

    def job(kind: str, payload: dict[str, object], result: dict[str, object]) -> Job:
        return Job(id="j", kind=kind, status="done", payload=payload, result=result, reply_to={})

    mix = final_reply(job("mix", {"a_id": 1, "b_id": 2, "layers": "coarse", "names": ["Ann", "@bob"]},
                          {"media_key": key, "layers": "coarse"}), media)
    assert mix.text == "Ann | @bob | Ann with @bob's pose and face shape"
    morph = final_reply(job("morph", {"a_id": 1, "b_id": 2, "names": ["Ann", "@bob"]},
                            {"media_key": key, "frames": 8, "format": "gif"}), media)
    assert morph.text.startswith("Morph: Ann to @bob, 8 frames")
    old = final_reply(job("mix", {"a_id": 1, "b_id": 2}, {"media_key": key, "layers": "fine"}), media)
    assert old.text == "A | B | A with B's colours and texture"  # jobs from before names were kept
    selfie = final_reply(job("invert", {"photo_key": key}, {"panel_key": key, "psnr": 23.46}), media)
    assert "likeness fair (23.5 dB)" in selfie.text
    assert [quality_words(p).split()[0] for p in (35.0, 28.0, 27.9, 22.0, 12.0)] == [
        "good", "good", "fair", "fair", "poor"]
