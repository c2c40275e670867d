"""The local web chat: try the bot in a browser, no Discord or Telegram token needed.

An aiohttp server on ``[web] host:port`` serves one page (``bot/adapters/web_static``: plain HTML, JS and
CSS) showing one shared room, a group chat (``chat_id`` ``"web-room"``), so the usual consent rules
apply: with privacy "chat", a face may be used by the people who shared a face in this room.
Whoever types a name is that person (``user_id`` is the name in lower case): each browser tab can
be someone else, so ``/morph @alice @bob`` can be shown on one machine.

- ``POST /api/send`` (multipart: ``name``, ``text``, optional ``photo``) posts a message. A photo
  is a selfie unless its text is another command (``/selfie label`` names the face). Text goes
  through :func:`bot.parse.parse` and the service, exactly as on the other platforms.
- ``GET /ws`` (WebSocket) pushes the room to every tab: ``hello`` (the last messages, the demo
  banner), then each new ``message`` and each ``edit`` (progress turning into the result).
- ``POST /api/press`` (form: ``name``, ``data``, ``message``) presses a button under a bot message:
  the same :class:`bot.commands.Press` the other platforms send.
- ``GET /media/{id}`` serves the files the service handed over in its replies (see
  :class:`bot.adapters.web_http.MediaShelf`); once erased (a gallery delete, ``/forget``), they
  leave every open tab. ``GET /thumb/{id}``: a sent photo's thumbnail, kept in memory while its
  message is in the room (and until its sender says ``/forget yes``).

Access rules (token, same origin, loopback host) are in :mod:`bot.adapters.web_http`. User text is only
ever rendered with ``textContent`` by the page. Nothing about faces or the token is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import logging
import re
import secrets
import unicodedata
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import BodyPartReader, WSCloseCode, web
from PIL import Image, ImageOps

from bot import replies
from bot.adapters.web_http import Access, MediaShelf, page_routes, security_headers
from bot.commands import Origin, Press, Reply
from bot.names import skeleton
from bot.parse import parse
from bot.replies import NAME_LOOKS_TAKEN, OOPS, Refusal, check_photo, photo_too_large
from bot.service import Service
from settings import Config, ConfigError, is_loopback

__all__ = ["HISTORY", "ROOM_ID", "WebAdapter"]

log = logging.getLogger("stylebot.web")

ROOM_ID = "web-room"
HISTORY = 200  # messages a newly opened tab is shown
_MB = 1024 * 1024
_TEXT_MAX_BYTES = 8192
_NAME = re.compile(r"\w[\w.-]{0,31}")
_SEND_TIMEOUT_S = 5.0
_THUMB = 160  # px: the side of a sent photo's thumbnail
_ERASED = "(erased)"



@dataclass
class _Message:
    """One entry of the room's timeline, as the page receives it."""

    id: str
    role: Literal["user", "bot"]
    name: str
    text: str
    media: list[dict[str, Any]] = field(default_factory=list)
    photo: str | None = None  # the file name a user attached
    thumb: str | None = None  # the id of its thumbnail (GET /thumb/{id}), kept in memory
    in_reply_to: str | None = None
    reply_name: str | None = None
    final: bool = True
    buttons: list[list[dict[str, str]]] = field(default_factory=list)  # rows of {label, data}

    def media_ids(self) -> list[str]:
        return [str(m["id"]) for m in self.media]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "role": self.role, "name": self.name, "text": self.text,
                "media": [{"url": f"media/{m['id']}", "kind": m["kind"], "caption": m["caption"]}
                          for m in self.media],
                "photo": self.photo, "thumb": f"thumb/{self.thumb}" if self.thumb else None,
                "in_reply_to": self.in_reply_to, "reply_name": self.reply_name,
                "final": self.final, "buttons": self.buttons}


@dataclass(frozen=True)
class _Post:
    name: str
    text: str
    photo: bytes | None
    photo_name: str | None
    photo_type: str


class WebAdapter:
    """The web chat (the :class:`bot.app.Adapter` protocol)."""

    platform = "web"

    def __init__(self, config: Config, *, banner: str | None = None) -> None:
        """``banner``: a line every open tab shows above the room (``bot.cli.demo_banner``)."""
        self.config = config
        self.port: int | None = None  # the real port once listening ([web] port may be 0 in tests)
        self._max_upload = config.web.max_upload_mb * _MB
        self._boot = secrets.token_hex(4)  # message ids differ across restarts
        self._ids = itertools.count(1)
        self._history: deque[_Message] = deque()
        self._by_id: dict[str, _Message] = {}
        self._media = MediaShelf(config.media_dir)
        self._thumbs: dict[str, bytes] = {}  # thumbnail id -> JPEG, while its message is in the room
        self._sockets: set[web.WebSocketResponse] = set()
        self._banner = banner
        self._service: Service | None = None
        self._names: dict[str, str] | None = None  # skeleton -> the name (case folded) that has it

    @property
    def url(self) -> str:
        host = self.config.web.host
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"http://{host}:{self.port}/"

    # --- serving -------------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        """The aiohttp application (routes, access middleware, headers)."""
        access = Access(token=self.config.web_token.get_secret_value(),
                        loopback=is_loopback(self.config.web.host))
        app = web.Application(middlewares=[access.middleware], client_max_size=self._max_upload + _MB)
        app.add_routes([*page_routes(), web.get("/ws", self._ws), web.post("/api/send", self._send),
                        web.post("/api/press", self._press),
                        web.get("/media/{media_id}", self._media.serve),
                        web.get("/thumb/{thumb_id}", self._thumb)])
        app.on_response_prepare.append(security_headers)
        app.on_shutdown.append(self._close_sockets)
        return app

    async def run(self, service: Service, stop: asyncio.Event) -> None:
        """Serve the page until ``stop`` is set. A bind that fails stops the bot with one log line."""
        web_cfg = self.config.web
        try:
            self.config.check_web_bind()
        except ConfigError as exc:
            log.error("web chat: %s", exc.message)
            stop.set()
            return
        self._service = service
        runner = web.AppRunner(self._make_app(), access_log=None)  # access logs would show ?token=
        await runner.setup()
        try:
            try:
                await web.TCPSite(runner, web_cfg.host, web_cfg.port).start()
            except OSError as exc:
                raise OSError(exc.errno, f"web chat: cannot listen on {web_cfg.host} port {web_cfg.port} "
                              f"({exc.strerror or exc}); set [web] port to a free one") from None
            self.port = int(runner.addresses[0][1])
            print(f"stylebot web chat: {self.url}", flush=True)  # stdout: what `make run` users see
            if self.config.web_token.get_secret_value():
                print("  (the first time, add ?token=<your STYLEBOT_WEB_TOKEN> to it)", flush=True)
            await stop.wait()
        finally:
            await runner.cleanup()

    async def _close_sockets(self, app: web.Application) -> None:
        for ws in list(self._sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"stylebot is stopping")

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=30)
        await ws.prepare(request)
        hello = json.dumps({"type": "hello", "banner": self._banner,
                            "messages": [m.to_json() for m in self._history]})
        self._sockets.add(ws)  # from here on it gets every new message and edit, after the hello
        try:
            await ws.send_str(hello)
            async for _ in ws:  # the page only listens; it posts through /api/send
                pass
        finally:
            self._sockets.discard(ws)
        return ws

    async def _broadcast(self, kind: str, message: _Message) -> None:
        data = json.dumps({"type": kind, "message": message.to_json()})
        for ws in list(self._sockets):
            try:
                await asyncio.wait_for(ws.send_str(data), _SEND_TIMEOUT_S)
            except (ConnectionError, RuntimeError, TimeoutError):
                self._sockets.discard(ws)  # a closed or stuck tab; it reloads history on reconnect

    # --- receiving -----------------------------------------------------------------------------

    async def _send(self, request: web.Request) -> web.Response:
        """POST /api/send: a message from someone in the room."""
        service = self._service
        assert service is not None  # set before the app serves
        post = await self._read_post(request)
        if post.photo is not None and len(post.photo) > self._max_upload:
            return web.json_response({"error": photo_too_large(self._max_upload)}, status=413)
        name = unicodedata.normalize("NFKC", post.name.strip())
        if not _NAME.fullmatch(name) or name.casefold() in ("me", "myself"):
            return web.json_response({"error": replies.BAD_WEB_NAME}, status=400)
        if not await self._claim(name, service):
            return web.json_response({"error": NAME_LOOKS_TAKEN}, status=400)
        said = self._add(_Message(id=self._next_id(), role="user", name=name, text=post.text,
                                  photo=(post.photo_name or "photo") if post.photo is not None else None,
                                  thumb=self._keep_thumbnail(post)))
        await self._broadcast("message", said)
        await self._handle(service, self._origin(name, said.id), post)
        await self._drop_erased(name if _erases_all(post.text) else None)
        return web.json_response({"ok": True, "id": said.id})

    async def _press(self, request: web.Request) -> web.Response:
        """POST /api/press: someone in the room pressed a button under a bot message."""
        service = self._service
        assert service is not None
        form = await request.post()
        name = unicodedata.normalize("NFKC", str(form.get("name", "")).strip())
        if not _NAME.fullmatch(name) or name.casefold() in ("me", "myself"):
            return web.json_response({"error": replies.BAD_WEB_NAME}, status=400)
        if not await self._claim(name, service):
            return web.json_response({"error": NAME_LOOKS_TAKEN}, status=400)
        pressed = self._by_id.get(str(form.get("message", "")))
        origin = self._origin(name, pressed.id if pressed is not None else None)
        try:
            await service.handle(Press(origin=origin, data=str(form.get("data", ""))[:100]))
        except Exception:  # no traceback for users
            log.exception("web chat: could not handle a button press")
            with contextlib.suppress(Exception):
                await service.say(origin, OOPS, private=True)
        await self._drop_erased(None)
        return web.json_response({"ok": True})

    def _keep_thumbnail(self, post: _Post) -> str | None:
        """A small JPEG of a photo someone sent, for every tab to show; None when it is no photo."""
        if post.photo is None:
            return None
        try:
            check_photo(post.photo, max_bytes=self._max_upload)
            with Image.open(io.BytesIO(post.photo)) as img:
                img.draft("RGB", (_THUMB, _THUMB))  # JPEG: decode at a fraction of the size
                small = ImageOps.exif_transpose(img).convert("RGB")
                small.thumbnail((_THUMB, _THUMB))
                buf = io.BytesIO()
                small.save(buf, format="JPEG", quality=80)
        except (Refusal, OSError, ValueError, Image.DecompressionBombError):
            return None
        thumb_id = secrets.token_urlsafe(16)
        self._thumbs[thumb_id] = buf.getvalue()
        return thumb_id

    async def _thumb(self, request: web.Request) -> web.Response:
        """GET /thumb/{id}: a photo's thumbnail while its message is in the room."""
        data = self._thumbs.get(request.match_info["thumb_id"])
        if data is None:
            raise web.HTTPNotFound(text=replies.WEB_NO_SUCH_FILE)
        return web.Response(body=data, content_type="image/jpeg")

    async def _drop_erased(self, forgotten: str | None) -> None:
        """After a command: pictures whose files were erased (a gallery delete, /forget) leave every
        open tab; ``forgotten``: a person who erased everything, whose photos' thumbnails go too."""
        for message in list(self._history):
            alive = [m for m in message.media if self._media.exists(str(m["id"]))]
            gone_thumb = message.thumb is not None and forgotten is not None and \
                message.role == "user" and message.name.casefold() == forgotten.casefold()
            if len(alive) == len(message.media) and not gone_thumb:
                continue
            for item in message.media:
                if item not in alive:
                    self._media.drop(str(item["id"]))
            message.media = alive
            if gone_thumb:
                self._thumbs.pop(str(message.thumb), None)
                message.thumb = None
            if message.role == "bot" and not alive and not message.text.endswith(_ERASED):
                message.text = f"{message.text} {_ERASED}".strip()
            await self._broadcast("edit", message)

    def _origin(self, name: str, message_id: str | None) -> Origin:
        return Origin(platform=self.platform, user_id=name.casefold(), chat_id=ROOM_ID,
                      chat_kind="group", username=name, display_name=name, chat_title="web chat",
                      reply_to={"platform": self.platform, "message_id": message_id, "name": name})

    async def _claim(self, name: str, service: Service) -> bool:
        """Whether ``name`` may speak: it is new, or the same name (any case) spoke before; a name
        that only looks like another one (:func:`bot.names.skeleton`) may not."""
        if self._names is None:
            known = await service.usernames(self.platform)
            self._names = {skeleton(other): other.casefold() for other in known}
        holder = self._names.setdefault(skeleton(name), name.casefold())
        return holder == name.casefold()

    async def _handle(self, service: Service, origin: Origin, post: _Post) -> None:
        text = post.text.strip()
        selfie = post.photo is not None and (not text.startswith("/") or _command(text) == "/selfie")
        if selfie and not text.startswith("/"):
            text = "/selfie"  # in the room, a photo is a selfie unless its text is another command
        try:
            try:
                photo = self._check_photo(post) if selfie else None
                cmd = parse(text, origin=origin, photo=photo, reply_target=None, bot_username=None)
            except Refusal as refusal:
                await service.say(origin, str(refusal), private=True)
                return
            if cmd is None:
                await service.say(origin, replies.NOT_A_COMMAND)
                return
            await service.handle(cmd)
        except Exception:  # no traceback for users: a friendly line, the details in the log
            log.exception("web chat: could not handle a message")
            with contextlib.suppress(Exception):
                await service.say(origin, OOPS, private=True)

    def _check_photo(self, post: _Post) -> bytes:
        assert post.photo is not None
        if not post.photo_type.lower().startswith("image/"):
            raise Refusal(replies.NOT_A_PHOTO)
        check_photo(post.photo, max_bytes=self._max_upload)  # empty, too large, not an image
        return post.photo

    async def _read_post(self, request: web.Request) -> _Post:
        """The form, read with caps: a photo over the limit is cut at limit + 1 byte (refused later)."""
        if request.content_type == "application/x-www-form-urlencoded":  # text only (curl -d)
            form = await request.post()
            return _Post(name=str(form.get("name", "")), text=str(form.get("text", ""))[:_TEXT_MAX_BYTES],
                         photo=None, photo_name=None, photo_type="")
        if request.content_type != "multipart/form-data":
            raise web.HTTPBadRequest(text=replies.WEB_NOT_A_FORM)
        fields: dict[str, str] = {}
        photo: bytes | None = None
        photo_name, photo_type = None, ""
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "photo" and part.filename is not None:
                photo = await _read_capped(part, self._max_upload + 1)
                photo_name, photo_type = part.filename[:80], part.headers.get("Content-Type", "")
                if len(photo) > self._max_upload:
                    break  # don't read the rest of a huge upload
            elif part.name in ("name", "text"):
                raw = await _read_capped(part, _TEXT_MAX_BYTES + 1)
                if len(raw) > _TEXT_MAX_BYTES:
                    raise web.HTTPRequestEntityTooLarge(max_size=_TEXT_MAX_BYTES, actual_size=len(raw),
                                                        text=replies.MESSAGE_TOO_LONG)
                fields[part.name] = raw.decode("utf-8", "replace")
        return _Post(name=fields.get("name", ""), text=fields.get("text", ""), photo=photo,
                     photo_name=photo_name, photo_type=photo_type)

    # --- sending -------------------------------------------------------------------------------

    async def deliver(self, reply: Reply) -> dict[str, Any] | None:
        """Post a bot message, or update one in place (``edit_of``: a ref this method returned)."""
        media = []
        for item in reply.media:
            media_id = self._media.add(item.path)
            if media_id is None:
                log.warning("web chat: not serving a file outside the media dir")
                continue
            media.append({"id": media_id, "kind": item.kind, "caption": item.caption})
        buttons = [[{"label": b.label, "data": b.data} for b in row] for row in reply.buttons]
        target = self._by_id.get(str((reply.edit_of or {}).get("message_id")))
        if target is not None and target.role == "bot":
            target.text, target.final = reply.text, reply.final
            if buttons or reply.final:
                target.buttons = buttons
            if media:
                for media_id in target.media_ids():
                    self._media.drop(media_id)
                target.media = media
            await self._broadcast("edit", target)
            return {"message_id": target.id}
        # A new message (also when the message to edit is gone: restarted, or out of the history).
        to = reply.reply_to
        message = self._add(_Message(
            id=self._next_id(), role="bot", name=self.config.bot.name, text=reply.text, media=media,
            in_reply_to=str(to["message_id"]) if to.get("message_id") else None,
            reply_name=str(to["name"]) if to.get("name") else None, final=reply.final, buttons=buttons))
        await self._broadcast("message", message)
        return {"message_id": message.id}

    def _next_id(self) -> str:
        return f"{self._boot}-{next(self._ids)}"

    def _add(self, message: _Message) -> _Message:
        self._history.append(message)
        self._by_id[message.id] = message
        while len(self._history) > HISTORY:
            old = self._history.popleft()
            del self._by_id[old.id]
            for media_id in old.media_ids():
                self._media.drop(media_id)
            if old.thumb is not None:
                self._thumbs.pop(old.thumb, None)
        return message


def _erases_all(text: str) -> bool:
    """``/forget yes``: the person asked to erase everything."""
    words = text.strip().lower().split()
    return len(words) >= 2 and words[0].split("@")[0] == "/forget" and words[1] == "yes"


def _command(text: str) -> str:
    """``"/Selfie@bot work"`` -> ``"/selfie"``."""
    return text.split(maxsplit=1)[0].split("@")[0].lower() if text else ""


async def _read_capped(part: BodyPartReader, limit: int) -> bytes:
    """At most ``limit`` bytes of a part (more than ``limit - 1`` means it was too large).

    Whole chunks only: aiohttp cannot read fewer bytes at a time than its boundary is long."""
    chunks, size = [], 0
    while size < limit and (chunk := await part.read_chunk()):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)[:limit]
