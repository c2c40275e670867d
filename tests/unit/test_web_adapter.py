"""The web chat adapter over real HTTP and WebSockets, with a stand-in service (no engine, no DB).

What a person in the browser notices: who they are in the room, refusals for bad uploads, progress
turning into the result in one message, a bounded history for new tabs, media served only when the
bot sent them, and the access rules (token, same origin, loopback host).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import BodyPartReader, MultipartReader
from aiohttp.base_protocol import BaseProtocol
from aiohttp.streams import StreamReader
from PIL import Image
from yarl import URL

from bot.adapters.web import HISTORY, OOPS, ROOM_ID, WebAdapter, _read_capped
from bot.adapters.web_http import COOKIE
from bot.commands import Command, Edit, Media, Origin, Reply, Selfie
from bot.replies import NAME_LOOKS_TAKEN, NOT_A_COMMAND, NOT_A_PHOTO
from engine.cli import demo_banner
from settings import Config, EngineConfig, WebConfig

TOKEN = "web-SECRET-token-0123456789"


def _web(**keys: object) -> WebConfig:
    """``[web]`` with these keys, unchecked: port 0 (any free port) is for tests, not config files."""
    return WebConfig().model_copy(update=keys)


class FakeService:
    """Records commands and answers each with one line, through the adapter (as the service does)."""

    def __init__(self, adapter: WebAdapter) -> None:
        self.adapter = adapter
        self.commands: list[Command] = []
        self.fail = False
        self.names: list[str] = []  # people who spoke in the room before (the database has them)

    async def say(self, origin: Origin, text: str, *, private: bool = False) -> dict[str, Any] | None:
        return await self.adapter.deliver(Reply(reply_to=origin.reply_to, text=text, private=private))

    async def usernames(self, platform: str) -> list[str]:
        return list(self.names)

    async def handle(self, cmd: Command) -> None:
        if self.fail:
            raise RuntimeError("database is on fire")
        self.commands.append(cmd)
        await self.say(cmd.origin, f"handled {type(cmd).__name__}")


@dataclass
class Chat:
    adapter: WebAdapter
    service: FakeService
    http: aiohttp.ClientSession
    base: str
    sockets: list[aiohttp.ClientWebSocketResponse] = field(default_factory=list)

    async def post(self, name: str, text: str = "", photo: tuple[bytes, str, str] | None = None,
                   **kwargs: Any) -> aiohttp.ClientResponse:
        form = aiohttp.FormData()
        form.add_field("name", name)
        form.add_field("text", text)
        if photo is not None:
            data, filename, content_type = photo
            form.add_field("photo", io.BytesIO(data), filename=filename, content_type=content_type)
        async with self.http.post(self.base + "api/send", data=form, **kwargs) as resp:
            await resp.read()
            return resp

    async def room(self) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
        ws = await self.http.ws_connect(self.base + "ws")
        self.sockets.append(ws)
        hello = await ws.receive_json(timeout=5)
        assert hello["type"] == "hello"
        return ws, hello


async def _event(ws: aiohttp.ClientWebSocketResponse, check: Callable[[dict[str, Any]], bool]
                 ) -> dict[str, Any]:
    while True:
        event = await ws.receive_json(timeout=5)
        if check(event):
            return event


def _bot_says(event: dict[str, Any]) -> bool:
    return event["type"] == "message" and event["message"]["role"] == "bot"


def _jpeg(size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 120, 90)).save(buf, format="JPEG")
    return buf.getvalue()


@contextlib.asynccontextmanager
async def _start(config: Config) -> AsyncIterator[Chat]:
    adapter = WebAdapter(config, banner=demo_banner(config))  # as `stylebot run` makes it
    service = FakeService(adapter)
    stop = asyncio.Event()
    task = asyncio.create_task(adapter.run(service, stop))  # type: ignore[arg-type]
    for _ in range(200):
        if adapter.port is not None or task.done():
            break
        await asyncio.sleep(0.01)
    assert adapter.port is not None
    jar = aiohttp.CookieJar(unsafe=True)  # keep cookies for 127.0.0.1, as a browser does
    chat = Chat(adapter=adapter, service=service, http=aiohttp.ClientSession(cookie_jar=jar),
                base=f"http://127.0.0.1:{adapter.port}/")
    try:
        yield chat
    finally:
        for ws in chat.sockets:
            await ws.close()
        await chat.http.close()
        stop.set()
        await asyncio.wait_for(task, 10)


@pytest.fixture
async def chat(tmp_path: Path) -> AsyncIterator[Chat]:
    async with _start(Config(data_dir=tmp_path, web=_web(port=0, max_upload_mb=1),
                             engine=EngineConfig(model="demo"))) as c:
        yield c


@pytest.fixture
async def locked(tmp_path: Path) -> AsyncIterator[Chat]:
    async with _start(Config(data_dir=tmp_path, web=_web(port=0), web_token=TOKEN)) as c:
        yield c


# --- who says what ------------------------------------------------------------------------------


async def test_a_photo_alone_is_a_selfie_of_the_named_person_in_the_shared_room(chat: Chat) -> None:
    ws, _ = await chat.room()
    resp = await chat.post("Alice", photo=(_jpeg(), "me.jpg", "image/jpeg"))
    assert resp.status == 200
    said = await _event(ws, lambda e: e["type"] == "message")
    assert said["message"] | {"id": None, "thumb": None} == {
        "id": None, "role": "user", "name": "Alice", "text": "", "media": [], "photo": "me.jpg",
        "thumb": None, "in_reply_to": None, "reply_name": None, "final": True, "buttons": []}
    assert said["message"]["thumb"].startswith("thumb/")
    answer = await _event(ws, _bot_says)
    assert answer["message"]["in_reply_to"] == said["message"]["id"]
    assert answer["message"]["reply_name"] == "Alice"
    [cmd] = chat.service.commands
    assert isinstance(cmd, Selfie) and cmd.label == "default" and cmd.photo == _jpeg()
    o = cmd.origin
    assert (o.platform, o.user_id, o.username, o.chat_id, o.chat_kind) == ("web", "alice", "Alice",
                                                                           ROOM_ID, "group")
    assert o.reply_to == {"platform": "web", "message_id": said["message"]["id"], "name": "Alice"}


async def test_selfie_label_and_other_commands_with_a_photo(chat: Chat) -> None:
    await chat.post("bob", "/selfie work", photo=(_jpeg(), "b.jpg", "image/jpeg"))
    await chat.post("bob", "/edit smiling face 3", photo=(_jpeg(), "b.jpg", "image/jpeg"))
    selfie, edit = chat.service.commands
    assert isinstance(selfie, Selfie) and selfie.label == "work"
    assert isinstance(edit, Edit) and edit.text == "smiling face" and edit.strength == 3


@pytest.mark.parametrize("name", ["", "two words", "me", "x" * 33, "<b>"])
async def test_a_name_is_required_and_is_one_word(chat: Chat, name: str) -> None:
    resp = await chat.post(name, "/help")
    assert resp.status == 400
    assert not chat.service.commands


async def test_chatter_gets_a_hint_and_mistakes_get_the_parsers_reply(chat: Chat) -> None:
    ws, _ = await chat.room()
    await chat.post("carol", "hello there")
    assert (await _event(ws, _bot_says))["message"]["text"] == NOT_A_COMMAND
    await chat.post("carol", "/privacy sometimes")
    said = (await _event(ws, _bot_says))["message"]["text"]
    assert said == "Privacy is one of: everyone, chat, ask, nobody."
    assert not chat.service.commands


async def test_a_failure_inside_is_a_friendly_line_not_a_traceback(chat: Chat,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    ws, _ = await chat.room()
    chat.service.fail = True
    with caplog.at_level(logging.ERROR, logger="stylebot.web"):
        resp = await chat.post("dave", "/help")
    assert resp.status == 200
    assert (await _event(ws, _bot_says))["message"]["text"] == OOPS
    assert "database is on fire" in caplog.text  # the details are in the log


# --- uploads ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1024 * 1024 + 1, 3 * 1024 * 1024, 12 * 1024 * 1024 + 7])
async def test_a_photo_over_the_limit_is_refused_with_413_and_the_size_message(chat: Chat, size: int) -> None:
    ws, _ = await chat.room()
    big = (_jpeg()[:3] + bytes(size))[:size]  # the limit is 1 MB
    form = aiohttp.FormData()
    form.add_field("name", "erin")
    form.add_field("photo", io.BytesIO(big), filename="big.jpg", content_type="image/jpeg")
    async with chat.http.post(chat.base + "api/send", data=form) as resp:
        assert resp.status == 413
        assert await resp.json() == {"error": "That photo is too large (over 1 MB)."}
    await chat.post("erin", "/help")  # the room shows only what came after
    said = await _event(ws, lambda e: e["type"] == "message")
    assert said["message"]["text"] == "/help"
    assert [type(c).__name__ for c in chat.service.commands] == ["Help"]


async def test_an_upload_is_read_up_to_the_cap_however_it_arrives() -> None:
    """aiohttp's own multipart reader over a stream that holds the whole upload (reads come back
    full, so the cap falls inside one): the read stops at the cap, never asks for a sliver."""
    boundary = "stylebot-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="photo"; filename="a.jpg"\r\n\r\n'.encode()
            + bytes(3 * 65536 + 5) + f"\r\n--{boundary}--\r\n".encode())
    loop = asyncio.get_running_loop()
    stream = StreamReader(BaseProtocol(loop), 2**22, loop=loop)  # holds it all: no pause
    stream.feed_data(body)
    stream.feed_eof()
    part = await MultipartReader({"Content-Type": f"multipart/form-data; boundary={boundary}"}, stream).next()
    assert isinstance(part, BodyPartReader)
    assert len(await _read_capped(part, 2 * 65536 + 1)) == 2 * 65536 + 1


async def test_a_name_that_looks_like_someone_elses_is_refused(chat: Chat) -> None:
    chat.service.names = ["bob"]  # spoke here before the bot restarted
    assert (await chat.post("alice", "/help")).status == 200
    for lookalike in ("\u0430lice", "al\u0456ce", "b\u043eb"):  # Cyrillic a, i, o
        resp = await chat.post(lookalike, "/help")
        assert resp.status == 400 and await resp.json() == {"error": NAME_LOOKS_TAKEN}, lookalike
    assert (await chat.post("\uff41\uff4c\uff49\uff43\uff45", "/help")).status == 200  # full-width: alice
    assert (await chat.post("ALICE", "/help")).status == 200
    assert [c.origin.user_id for c in chat.service.commands] == ["alice", "alice", "alice"]


@pytest.mark.parametrize(("data", "content_type"), [
    (_jpeg(), "text/plain"),  # an image the browser doesn't call one
    (b"%PDF-1.7 not a photo", "image/jpeg"),  # "image/jpeg" that isn't one
    (b"just text", "application/octet-stream"),
])
async def test_a_file_that_is_not_a_photo_is_refused(chat: Chat, data: bytes, content_type: str) -> None:
    ws, _ = await chat.room()
    await chat.post("erin", photo=(data, "file.bin", content_type))
    assert (await _event(ws, _bot_says))["message"]["text"] == NOT_A_PHOTO
    assert not chat.service.commands


# --- replies, progress, history, media -------------------------------------------------------------


def _media(chat: Chat, name: str, data: bytes) -> Path:
    path = chat.adapter.config.media_dir / "ab" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


async def test_progress_is_edited_in_place_into_the_result(chat: Chat) -> None:
    ws, _ = await chat.room()
    to = {"platform": "web", "message_id": "u-1", "name": "alice"}
    ref = await chat.adapter.deliver(Reply(reply_to=to, text="Got it. Your selfie is next in the queue."))
    first = await _event(ws, _bot_says)
    assert ref == {"message_id": first["message"]["id"]}
    assert await chat.adapter.deliver(Reply(reply_to=to, text="Working... 40%", edit_of=ref,
                                            final=False)) == ref
    working = await _event(ws, lambda e: e["type"] == "edit")
    assert working["message"]["id"] == first["message"]["id"] and not working["message"]["final"]
    panel = _media(chat, "panel.png", _jpeg())
    await chat.adapter.deliver(Reply(reply_to=to, text="Saved as your face.", edit_of=ref,
                                     media=(Media(panel, "photo", "Saved as your face."),)))
    done = await _event(ws, lambda e: e["type"] == "edit")
    assert done["message"]["id"] == first["message"]["id"] and done["message"]["final"]
    [item] = done["message"]["media"]
    assert item["kind"] == "photo" and item["caption"] == "Saved as your face."
    # A tab opened now sees one message: the result.
    _, hello = await chat.room()
    assert [m["text"] for m in hello["messages"]] == ["Saved as your face."]
    assert hello["banner"].startswith("Demo model: random weights, not a face model.")


async def test_an_edit_of_a_message_that_is_gone_is_sent_as_a_new_one(chat: Chat) -> None:
    ws, _ = await chat.room()
    to = {"platform": "web", "message_id": "old-1", "name": "alice"}
    ref = await chat.adapter.deliver(Reply(reply_to=to, text="Done.", edit_of={"message_id": "gone-7"}))
    event = await _event(ws, _bot_says)
    assert event["message"]["text"] == "Done." and ref == {"message_id": event["message"]["id"]}


async def test_media_is_served_with_its_type_and_only_when_the_bot_sent_it(chat: Chat,
                                                                           tmp_path: Path) -> None:
    ws, _ = await chat.room()
    png, mp4 = _media(chat, "a.png", b"\x89PNG\r\n\x1a\n" + b"x" * 100), _media(chat, "m.mp4", b"v" * 5000)
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"\x89PNG\r\n\x1a\nsecret")
    await chat.adapter.deliver(Reply(reply_to={"platform": "web"}, text="here", media=(
        Media(png, "photo"), Media(mp4, "video"), Media(outside, "photo"))))
    media = (await _event(ws, _bot_says))["message"]["media"]
    assert [m["kind"] for m in media] == ["photo", "video"]  # the file outside the media dir is left out
    async with chat.http.get(chat.base + media[0]["url"]) as resp:
        assert resp.status == 200 and resp.content_type == "image/png"
        assert await resp.read() == png.read_bytes()
    async with chat.http.get(chat.base + media[1]["url"], headers={"Range": "bytes=0-99"}) as resp:
        assert resp.status == 206 and resp.content_type == "video/mp4"  # seekable, for <video>
        assert len(await resp.read()) == 100
    for path in ("media/not-an-id", "media/..%2Fab%2Fa.png", "media/..%2F..%2Fsecret.png",
                 "media/%2e%2e/ab/a.png", "media/" + str(png).replace("/", "%2F")):
        async with chat.http.get(URL(chat.base + path, encoded=True)) as resp:
            assert resp.status == 404, path
            assert b"PNG" not in await resp.read()


async def test_history_keeps_the_last_messages_and_forgets_their_media(chat: Chat) -> None:
    png = _media(chat, "first.png", b"\x89PNG\r\n\x1a\nfirst")
    await chat.adapter.deliver(Reply(reply_to={"platform": "web"}, text="first",
                                     media=(Media(png, "photo"),)))
    _, hello = await chat.room()
    url = hello["messages"][0]["media"][0]["url"]
    for i in range(HISTORY):
        await chat.adapter.deliver(Reply(reply_to={"platform": "web"}, text=f"message {i}"))
    _, hello = await chat.room()
    texts = [m["text"] for m in hello["messages"]]
    assert len(texts) == HISTORY and texts[0] == "message 0" and texts[-1] == f"message {HISTORY - 1}"
    async with chat.http.get(chat.base + url) as resp:
        assert resp.status == 404


async def test_the_page_is_served_without_a_build_step(chat: Chat) -> None:
    for path, content_type, marker in (("", "text/html", b'<script src="app.js">'),
                                       ("app.js", "text/javascript", b"textContent"),
                                       ("style.css", "text/css", b".timeline")):
        async with chat.http.get(chat.base + path) as resp:
            assert resp.status == 200 and resp.content_type == content_type
            assert marker in await resp.read()
            assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    js = (Path(__file__).parents[2] / "bot" / "adapters" / "web_static" / "app.js").read_text()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js


# --- access ---------------------------------------------------------------------------------------


async def test_other_sites_and_other_host_names_are_refused(chat: Chat) -> None:
    resp = await chat.post("mallory", "/forget yes", headers={"Origin": "http://evil.example"})
    assert resp.status == 403 and not chat.service.commands
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await chat.http.ws_connect(chat.base + "ws", origin="http://evil.example")
    assert info.value.status == 403
    async with chat.http.get(chat.base, headers={"Host": f"rebound.example:{chat.adapter.port}"}) as resp:
        assert resp.status == 403  # a DNS-rebinding page can't reach the loopback chat
    resp = await chat.post("alice", "/help", headers={"Origin": chat.base.rstrip("/")})
    assert resp.status == 200


async def test_with_a_token_every_request_needs_it(capsys: pytest.CaptureFixture[str],
                                                   caplog: pytest.LogCaptureFixture, locked: Chat) -> None:
    caplog.set_level(logging.DEBUG)
    base = locked.base
    for path in ("", "app.js", "media/anything", "ws"):
        async with locked.http.get(base + path) as resp:
            assert resp.status == 401, path
    assert (await locked.post("alice", "/help")).status == 401
    async with locked.http.get(base, params={"token": "wrong"}) as resp:
        assert resp.status == 401
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with locked.http.get(base + "app.js", headers=bearer) as resp:
        assert resp.status == 200
    # The first visit with ?token= sets an HttpOnly, SameSite=Strict cookie and drops the token from the URL.
    async with locked.http.get(base, params={"token": TOKEN}, allow_redirects=False) as resp:
        assert resp.status == 303 and resp.headers["Location"] == "/"
        cookie = resp.cookies[COOKIE]
        assert cookie["httponly"] and cookie["samesite"] == "Strict" and TOKEN not in cookie.value
    async with locked.http.get(base) as resp:  # the session now carries the cookie
        assert resp.status == 200
    ws, _ = await locked.room()
    assert (await locked.post("alice", "/help")).status == 200
    assert (await _event(ws, _bot_says))["message"]["text"] == "handled Help"
    shown = caplog.text + capsys.readouterr().out
    assert "web chat: http://127.0.0.1:" in shown and TOKEN not in shown


async def test_a_public_host_without_a_token_does_not_listen(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    adapter = WebAdapter(Config(data_dir=tmp_path, web=_web(host="0.0.0.0", port=0)))
    stop = asyncio.Event()
    with caplog.at_level(logging.ERROR, logger="stylebot.web"):
        await asyncio.wait_for(adapter.run(FakeService(adapter), stop), 5)  # type: ignore[arg-type]
    assert stop.is_set() and adapter.port is None
    assert "access token is required" in caplog.text


async def test_a_busy_port_is_one_clear_error(chat: Chat) -> None:
    busy = Config(data_dir=chat.adapter.config.data_dir, web=WebConfig(port=chat.adapter.port or 1))
    adapter = WebAdapter(busy)
    with pytest.raises(OSError, match=rf"cannot listen on 127.0.0.1 port {chat.adapter.port} .*free one"):
        await asyncio.wait_for(adapter.run(FakeService(adapter), asyncio.Event()), 5)  # type: ignore[arg-type]


async def test_stopping_tells_open_tabs_it_is_going_away(tmp_path: Path) -> None:
    adapter = WebAdapter(Config(data_dir=tmp_path, web=_web(port=0)))
    stop = asyncio.Event()
    task = asyncio.create_task(adapter.run(FakeService(adapter), stop))  # type: ignore[arg-type]
    while adapter.port is None:
        await asyncio.sleep(0.01)
    async with aiohttp.ClientSession() as http, http.ws_connect(f"http://127.0.0.1:{adapter.port}/ws") as ws:
        await ws.receive_json(timeout=5)
        stop.set()
        message = await ws.receive(timeout=5)
        assert message.type == aiohttp.WSMsgType.CLOSE and message.data == aiohttp.WSCloseCode.GOING_AWAY
        await asyncio.wait_for(task, 10)


# --- the demo banner ------------------------------------------------------------------------------


def test_demo_banner_when_the_demo_model_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STYLEBOT_HOME", str(tmp_path / "home"))

    def banner(model: str) -> str | None:
        return demo_banner(Config(data_dir=tmp_path, engine=EngineConfig(model=model)))

    assert "`stylebot weights fetch stylegan2-ffhq-1024" in (banner("demo") or "")
    assert banner("auto") == banner("demo")  # nothing downloaded yet
    assert banner(str(tmp_path / "my-ffhq.pkl")) is None
    weights = tmp_path / "home" / "weights"
    weights.mkdir(parents=True)
    (weights / "ffhq.pkl").write_bytes(b"stand-in")
    assert banner("auto") is None  # the real generator is cached: auto uses it
    assert banner("demo") is not None


async def test_a_sent_photo_shows_as_a_thumbnail_until_its_sender_forgets(chat: Chat) -> None:
    ws, _ = await chat.room()
    await chat.post("alice", photo=(_jpeg(900), "me.jpg", "image/jpeg"))
    said = (await _event(ws, lambda e: e["type"] == "message"))["message"]
    async with chat.http.get(chat.base + said["thumb"]) as resp:
        assert resp.status == 200 and resp.content_type == "image/jpeg"
        thumb = Image.open(io.BytesIO(await resp.read()))
    assert thumb.size == (160, 160)
    await chat.post("bob", "/forget yes")  # someone else erasing their data: alice's photo stays
    async with chat.http.get(chat.base + said["thumb"]) as resp:
        assert resp.status == 200
    await chat.post("alice", "/forget yes")
    edit = await _event(ws, lambda e: e["type"] == "edit" and e["message"]["id"] == said["id"])
    assert edit["message"]["thumb"] is None and edit["message"]["photo"] == "me.jpg"
    async with chat.http.get(chat.base + said["thumb"]) as resp:
        assert resp.status == 404
    await chat.post("carol", photo=(b"not a photo", "x.jpg", "image/jpeg"))
    bad = await _event(ws, lambda e: e["type"] == "message" and e["message"]["name"] == "carol")
    assert bad["message"]["thumb"] is None


async def test_erased_pictures_leave_every_open_tab(chat: Chat) -> None:
    """A result whose files were erased (a gallery delete, someone's /forget): once the command that
    erased them is handled, every tab gets the message without them."""
    one, _ = await chat.room()
    two, _ = await chat.room()
    kept = _media(chat, "kept.png", b"\x89PNG\r\n\x1a\nk")
    erased = _media(chat, "gone.png", b"\x89PNG\r\n\x1a\ng")
    for path in (kept, erased):
        await chat.adapter.deliver(Reply(reply_to={"platform": "web"}, text=path.stem,
                                         media=(Media(path, "photo", path.stem),)))
    for ws in (one, two):
        await _event(ws, _bot_says)
        gone = (await _event(ws, _bot_says))["message"]
    url = gone["media"][0]["url"]
    erased.unlink()  # as the service deletes an erased item's files
    await chat.post("alice", "/me")
    for ws in (one, two):
        edit = await _event(ws, lambda e: e["type"] == "edit")
        assert edit["message"]["id"] == gone["id"] and edit["message"]["media"] == []
        assert edit["message"]["text"] == "gone (erased)"
    async with chat.http.get(chat.base + url) as resp:
        assert resp.status == 404
    _, hello = await chat.room()
    assert [len(m["media"]) for m in hello["messages"] if m["role"] == "bot" and m["text"] in (
        "kept", "gone (erased)")] == [1, 0]
