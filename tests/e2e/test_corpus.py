"""The bad-input corpus: every kind of file and every kind of mistake a busy group chat sends the bot,
through the real Telegram adapter, the service and a real engine process (demo model).

Every input is made here (no binaries checked in). They arrive as one burst, each from its own user
(the commands that need a saved face from OWNER, who has one), the way a busy chat sends them; then
each kind is checked on its own:

- a clear, specific reply: the phrase the case expects, never a traceback or "something went wrong";
  plain text sent verbatim (no parse_mode: user text never turns into markup);
- nothing half-stored: a refused input leaves no job, no face and no file of its bytes; a photo the
  engine turns down (no face, a face too small, a file only decoding finds broken) fails its job with
  the reason, leaving no face and no result files;
- the bot keeps serving: afterwards the engine process is alive and logged no traceback, the bot logged
  no error, every file in the media dir belongs to a row, and a newcomer's selfie still succeeds.

What the corpus pins down: images over 40 megapixels (20000x20000, decompression bombs) are refused
from their header before a pixel is decoded, and so are cut-off JPEGs and PNGs and HEIC files (with
how to send a JPEG instead); an animated GIF gives its first frame; CMYK, 16-bit, grayscale and
transparent images become RGB (transparency on white); EXIF orientation is applied; of several faces
the largest is used and the reply says so.

Most inputs go to private chats: in the group Telegram allows a bot 20 messages a minute, and the
replies there would wait for the rate limiter.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import io
import itertools
import logging
import math
import resource
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pytest
import pytest_asyncio
import skimage.data
from PIL import Image
from sqlalchemy import select

import storage.repo as repo
from bot.replies import same_face, unknown_person
from storage.models import Face, Job

from .fake_telegram import Call, FakeChat, FakeTelegram, FakeUser
from .telegram_world import World, astronaut, dm, jpeg, replying_to, running_world

pytestmark = pytest.mark.asyncio(loop_scope="module")

OWNER = FakeUser(id=2001, first_name="<b>Owen</b> *the* _owner_", username="owen")  # has a face
NO_FACE = FakeUser(id=2002, first_name="Nora", username="noface")  # known to the bot, no face
NEWCOMER = FakeUser(id=2003, first_name="Zed", username="zed")
GROUP = FakeChat(id=-100600, type="supergroup", title="Busy <i>group</i> *chat*")

Outcome = Literal["refused", "failed", "saved", "edited"]


@dataclass(frozen=True)
class Input:
    """What a user sends: a text, or a Telegram photo or a file, with ``text`` as its caption."""

    text: str = ""
    photo: bytes | None = None
    file: bytes | None = None
    file_name: str = "photo.jpg"
    mime_type: str = "image/jpeg"

    @property
    def data(self) -> bytes | None:
        return self.photo if self.photo is not None else self.file


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], Input]
    outcome: Outcome  # refused: a reply, no job; failed: the job fails; saved: a face; edited: an edit
    says: str  # the final reply contains this, verbatim
    code: str | None = None  # failed: the job's error code
    in_group: bool = False  # else in the sender's private chat
    by_owner: bool = False


# --- the inputs ----------------------------------------------------------------------------------


@functools.cache
def _face() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut())  # 512 x 512, one face


def _encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def _png(width: int, height: int, *, bit_depth: int, color_type: int, rows: Iterable[bytes]) -> bytes:
    """A PNG written by hand (compressed row by row): its header may claim any size."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    z = zlib.compressobj(9)
    idat = b"".join([*(z.compress(row) for row in rows), z.flush()])
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _file(data: bytes, name: str, mime: str = "image/jpeg") -> Input:
    return Input(file=data, file_name=name, mime_type=mime)


def _truncated() -> Input:
    whole = jpeg(_face().rotate(1))
    return Input(photo=whole[: len(whole) // 2], text="/selfie")


def _bomb() -> Input:  # 100000 x 100000 RGB claimed (30 GB decoded), one row of data
    data = _png(100_000, 100_000, bit_depth=8, color_type=2, rows=[bytes(1 + 3 * 100_000)])
    return _file(data, "bomb.png", "image/png")


def _huge() -> Input:  # a real 20000 x 20000 image (1-bit gray), 50 kB on the wire
    data = _png(20_000, 20_000, bit_depth=1, color_type=0, rows=itertools.repeat(bytes(1 + 2_500), 20_000))
    return _file(data, "huge.png", "image/png")


def _animated_gif() -> Input:  # the face, then a frame without one
    frames = [_face().convert("P"), Image.linear_gradient("L").resize((512, 512)).convert("P")]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=200, loop=0)
    return _file(data, "face.gif", "image/gif")


def _truncated_gif() -> Input:  # a whole header: only decoding (in the engine) finds the cut
    whole = _encode(_face().convert("P"), "GIF")
    return _file(whole[: len(whole) // 2], "cut.gif", "image/gif")


def _sixteen_bit() -> Input:
    gray16 = np.asarray(_face().convert("L"), dtype=np.uint16) * 257
    return _file(_encode(Image.fromarray(gray16), "PNG"), "face16.png", "image/png")  # mode I;16


def _transparent() -> Input:
    img = _face().copy()
    alpha = np.zeros((512, 512), np.uint8)
    alpha[40:-40, 40:-40] = 255  # a transparent frame around the face
    img.putalpha(Image.fromarray(alpha))
    return _file(_encode(img, "PNG"), "cutout.png", "image/png")


def _exif_rotated() -> Input:
    """As a phone saves a photo taken sideways: pixels stored turned, the EXIF tag says how to show them."""
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    stored = _face().transpose(Image.Transpose.ROTATE_90)
    return _file(_encode(stored, "JPEG", quality=90, exif=exif), "IMG_0412.JPG")


def _heic() -> Input:
    return _file(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(200), "IMG_0413.HEIC", "image/heic")


def _many_faces() -> Input:
    tile = Image.new("RGB", (512, 512))
    for x, y in itertools.product((0, 256), (0, 256)):
        tile.paste(_face().resize((256, 256)), (x, y))
    return Input(photo=jpeg(tile))


def _tiny_face() -> Input:
    canvas = Image.new("RGB", (640, 480), (128, 128, 128))
    canvas.paste(_face().resize((96, 96)), (300, 200))
    return Input(photo=jpeg(canvas))


LONG_TEXT = "make it look " + "very " * 398  # 2,003 characters
EMOJI_TEXT = "😀 smiling 🎉 face \U0001f469\U0001f3fd\u200d\U0001f680"  # the last: one ZWJ sequence
MARKUP_TEXT = "<b>x</b> *y* [z](http://e)"
MARKUP_USER = "@<b>eve</b>_*x*_[y](http://e)"

CORPUS: list[Case] = [
    Case("zero-byte file", lambda: _file(b"", "empty.jpg"), "refused", "That file is empty"),
    Case("truncated JPEG", _truncated, "refused", "incomplete (the file was cut off)", in_group=True),
    Case("PNG decompression bomb", _bomb, "refused", "too large (over 40 megapixels)"),
    Case("20000x20000 image", _huge, "refused", "too large (over 40 megapixels)"),
    Case("1x1 image", lambda: _file(_encode(Image.new("RGB", (1, 1)), "PNG"), "dot.png", "image/png"),
         "refused", "too small (1x1 pixels)"),
    Case("truncated GIF", _truncated_gif, "failed", "Sorry: This file could not be decoded; it may be "
         "truncated or corrupt", code="bad_image"),
    Case("animated GIF", _animated_gif, "saved", "Saved as your face"),
    Case("CMYK JPEG", lambda: _file(_encode(_face().convert("CMYK"), "JPEG"), "print.jpg"),
         "saved", "Saved as your face"),
    Case("16-bit PNG", _sixteen_bit, "saved", "Saved as your face"),
    Case("grayscale photo", lambda: Input(photo=jpeg(_face().convert("L"))), "saved", "Saved as your face"),
    Case("RGBA PNG", _transparent, "saved", "Saved as your face"),
    Case("EXIF-rotated photo", _exif_rotated, "saved", "Saved as your face"),
    Case("text file named .jpg", lambda: _file(b"my holiday notes, not a picture\n", "face.jpg"),
         "refused", "doesn't look like a photo"),
    Case("HEIC file", _heic, "refused", "HEIC photo"),
    Case("photo with no face", lambda: Input(photo=jpeg(Image.linear_gradient("L").convert("RGB"))),
         "failed", "Sorry: No face found in this photo", code="no_face"),
    Case("photo with many faces", _many_faces, "saved", "4 faces found; used the largest"),
    Case("face too small", _tiny_face, "failed", "Sorry: The face in this photo is too small to use",
         code="no_face"),
    Case("2000-character caption", lambda: Input(photo=jpeg(_face().rotate(2)), text="/selfie " + "x" * 2000),
         "refused", "A face label is one short word", in_group=True),
    Case("unknown command", lambda: Input(text="/frobnicate now"), "refused",
         "I don't know /frobnicate. Send /help", in_group=True),
    Case("morph of oneself", lambda: Input(text="/morph @me @me"), "refused", same_face("morph"),
         in_group=True, by_owner=True),
    Case("morph of an unknown user", lambda: Input(text="/morph @me @nobody_here"), "refused",
         unknown_person("@nobody_here", "telegram"), in_group=True, by_owner=True),
    Case("morph of a user with no face", lambda: Input(text="/morph @me @noface"), "refused",
         "@noface hasn't shared a selfie with me yet.", in_group=True, by_owner=True),
    Case("edit with empty text", lambda: Input(text="/edit"), "refused",
         "Say what the edit should do", in_group=True),
    Case("edit with 2000 characters", lambda: Input(text="/edit " + LONG_TEXT), "refused",
         "That edit text is too long", in_group=True),
    Case("edit with emoji", lambda: Input(text="/edit! " + EMOJI_TEXT), "edited",
         f"Before / after: {EMOJI_TEXT}", by_owner=True),
    Case("edit with markup", lambda: Input(text="/edit! " + MARKUP_TEXT), "edited",
         f"Before / after: {MARKUP_TEXT}", by_owner=True),
    Case("username with markup", lambda: Input(text=f"/morph @me {MARKUP_USER}"), "refused",
         unknown_person(MARKUP_USER, "telegram"), in_group=True, by_owner=True),
]


# --- sending the burst ---------------------------------------------------------------------------


@dataclass
class Delivery:
    case: Case
    sent: Input
    message: dict[str, Any]
    final: Call  # the reply that ends it (for a job: the result, or the status message's last edit)
    seconds: float  # from sending to the final reply


@dataclass
class Burst:
    deliveries: dict[str, Delivery]
    seconds: float  # until the last of them was answered
    media_before: set[str]
    peak_rss_growth_mb: float  # of this process, which runs the bot (the engine has its own)
    errors: list[logging.LogRecord]  # what the bot and PTB logged at ERROR or worse, from the burst on


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    async with running_world(tmp_path_factory.mktemp("corpus")) as w:
        yield w


@pytest.fixture(scope="module")
def errors() -> Iterator[_Errors]:
    handler = _Errors()
    loggers = [logging.getLogger(name) for name in ("stylebot", "telegram")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


async def _send(tg: FakeTelegram, user: FakeUser, chat: FakeChat, sent: Input) -> dict[str, Any]:
    if sent.photo is not None:
        return await tg.send_photo(user, chat, sent.photo, caption=sent.text or None)
    if sent.file is not None:
        return await tg.send_document(user, chat, sent.file, file_name=sent.file_name,
                                      mime_type=sent.mime_type, caption=sent.text or None)
    return await tg.send_text(user, chat, sent.text)


async def _final(tg: FakeTelegram, outcome: Outcome, message: dict[str, Any]) -> Call:
    """The first reply; for an accepted job, what ends it (its result, or the failure edit)."""
    first = await tg.wait_for("sendMessage", replying_to(message), timeout=30)
    if outcome == "refused" or "queue" not in first.params["text"]:
        return first
    if outcome == "failed":
        status = first.result["message_id"]
        return await tg.wait_for("editMessageText", lambda c: c.params["message_id"] == status
                                 and c.params["text"].startswith("Sorry"), timeout=150)
    return await tg.wait_for("sendPhoto" if outcome == "saved" else "sendMediaGroup",
                             replying_to(message), timeout=150)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def burst(world: World, errors: _Errors) -> Burst:
    tg = world.tg
    selfie = await tg.send_photo(OWNER, dm(OWNER), astronaut())
    await tg.wait_for("sendPhoto", replying_to(selfie), timeout=120)
    hello = await tg.send_text(NO_FACE, GROUP, "/me")
    await tg.wait_for("sendMessage", replying_to(hello), timeout=20)
    media_before, rss_before = _media(world), _peak_rss_mb()
    errors.records.clear()
    start = time.monotonic()
    sent = []
    for i, case in enumerate(CORPUS):
        user = OWNER if case.by_owner else FakeUser(id=3000 + i, first_name=f"User {i}", username=f"user{i}")
        chat = GROUP if case.in_group else dm(user)
        made = case.build()
        sent.append((case, made, await _send(tg, user, chat, made)))

    async def finish(case: Case, made: Input, message: dict[str, Any]) -> Delivery:
        final = await _final(tg, case.outcome, message)
        return Delivery(case, made, message, final, time.monotonic() - start)

    done = await asyncio.gather(*(finish(*s) for s in sent))
    return Burst({d.case.name: d for d in done}, time.monotonic() - start, media_before,
                 _peak_rss_mb() - rss_before, errors.records)


# --- what each kind must get ---------------------------------------------------------------------


def _about(tg: FakeTelegram, d: Delivery) -> list[Call]:
    """Every call the bot made about this message: replies to it and edits of its status message."""
    status = [c.result["message_id"] for c in tg.calls if c.method == "sendMessage"
              and replying_to(d.message)(c) and isinstance(c.result, dict)]
    return [c for c in tg.calls if replying_to(d.message)(c)
            or (c.method == "editMessageText" and c.params.get("message_id") in status)]


def _texts(call: Call) -> list[str]:
    items = [call.params, *call.params.get("media", [])]
    return [str(p[k]) for p in items for k in ("text", "caption") if p.get(k)]


def _parse_modes(call: Call) -> list[Any]:
    return [p["parse_mode"] for p in [call.params, *call.params.get("media", [])] if "parse_mode" in p]


async def _jobs_for(world: World, message: dict[str, Any]) -> tuple[list[Job], list[Face]]:
    async with world.service.sessions() as s:
        jobs = [j for j in (await s.execute(select(Job))).scalars()
                if j.reply_to.get("message_id") == message["message_id"]
                and j.reply_to.get("chat_id") == message["chat"]["id"]]
        faces = list((await s.execute(select(Face).where(Face.job_id.in_([j.id for j in jobs])))).scalars())
    return jobs, faces


def _stored(world: World, data: bytes) -> bool:
    """Whether the media dir holds these bytes (keys are their SHA-256)."""
    digest = hashlib.sha256(data).hexdigest()
    return any(key.startswith(digest) for key in _media(world))


def _media(world: World) -> set[str]:
    return set(world.service.media.keys())


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
async def test_corpus(world: World, burst: Burst, case: Case) -> None:
    d = burst.deliveries[case.name]
    final_texts = _texts(d.final)
    assert any(case.says in t for t in final_texts), (case.says, final_texts)
    for call in _about(world.tg, d):
        assert not _parse_modes(call)  # plain text: markup in user text stays as typed
        for text in _texts(call):
            for leak in ("Traceback", "Error", "Exception", "went wrong", "internal"):
                assert leak not in text, text
    jobs, faces = await _jobs_for(world, d.message)
    if case.outcome == "refused":
        assert not jobs and not faces
        if d.sent.data is not None:
            assert not _stored(world, d.sent.data)
        assert d.seconds < 10  # answered from the header: no decode, no waiting for the engine
    elif case.outcome == "failed":
        assert [(j.status, j.error_code, j.result) for j in jobs] == [("failed", case.code, None)]
        assert not faces
    else:
        assert [j.status for j in jobs] == ["done"]
        if case.outcome == "saved":
            assert len(faces) == 1
            with Image.open(world.service.media.path(faces[0].aligned_key)) as aligned:
                assert aligned.size == (64, 64)  # the demo generator's resolution


async def test_huge_images_are_refused_without_decoding(burst: Burst) -> None:
    for name in ("PNG decompression bomb", "20000x20000 image"):
        assert burst.deliveries[name].final.params["text"].startswith("That image is too large")
    assert burst.peak_rss_growth_mb < 150  # 20000 x 20000 would be 400 MB even at 1 byte a pixel


async def test_exif_orientation_is_applied(world: World, burst: Burst) -> None:
    """The sideways-stored photo gives the same upright face as the plain one OWNER sent."""
    _, faces = await _jobs_for(world, burst.deliveries["EXIF-rotated photo"].message)
    async with world.service.sessions() as s:
        owner = await repo.find_user(s, platform="telegram", platform_user_id=str(OWNER.id))
        assert owner is not None
        plain = await repo.latest_face(s, user_id=owner.id)
        assert plain is not None
    upright, rotated = plain.alignment["landmarks"], faces[0].alignment["landmarks"]
    for point in ("eye_left", "eye_right", "nose", "mouth_left", "mouth_right"):
        assert math.dist(upright[point], rotated[point]) < 4, point


async def test_the_bot_keeps_serving_after_the_corpus(world: World, burst: Burst) -> None:
    tg = world.tg
    msg = await tg.send_photo(NEWCOMER, dm(NEWCOMER), astronaut(4))
    done = await tg.wait_for("sendPhoto", replying_to(msg), timeout=120)
    assert "Saved as your face" in done.params["caption"]
    assert world.engine.poll() is None  # the engine process is still running
    assert "Traceback" not in world.engine_log.read_text(errors="replace")
    assert not [(r.name, r.getMessage()) for r in burst.errors]
    async with world.service.sessions() as s:
        referenced = await repo.referenced_media_keys(s)
    stray = _media(world) - referenced
    assert not stray  # every file belongs to a face or a job
    new = _media(world) - burst.media_before
    outcomes = collections.Counter(c.outcome for c in CORPUS)
    print(f"\ncorpus: {len(CORPUS)} kinds covered ({', '.join(f'{n} {o}' for o, n in outcomes.items())}), "
          f"all answered in {burst.seconds:.1f} s; {len(new)} files stored, none stray")
