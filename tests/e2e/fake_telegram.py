"""A local fake of the Telegram Bot API, enough for python-telegram-bot's real client.

An aiohttp server on 127.0.0.1 (a free port): ``POST /bot<token>/<method>`` for the methods the bot
uses, ``GET /file/bot<token>/<path>`` for downloads. Tests inject updates (users sending texts,
photos, documents) and assert on the recorded calls (method, parameters, uploaded files).

It says no as Telegram does: :meth:`FakeTelegram.refuse` makes calls to a chat (or any chat), of
some methods (or all), answer 403 / 400 / 429 with ``retry_after`` / 500, always or a number of
times. Refused calls are kept apart in ``refused``; ``calls`` holds the calls Telegram took.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["BLOCKED", "BOT", "CHAT_NOT_FOUND", "DEACTIVATED", "KICKED", "SERVER_ERROR", "Call", "FakeChat",
           "FakeTelegram", "FakeUser", "Refusal", "too_many_requests"]


@dataclass(frozen=True)
class FakeUser:
    id: int
    first_name: str
    username: str | None = None
    is_bot: bool = False

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "is_bot": self.is_bot, "first_name": self.first_name}
        if self.username:
            out["username"] = self.username
        return out


@dataclass(frozen=True)
class FakeChat:
    id: int
    type: str = "private"  # private | group | supergroup
    title: str | None = None

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": self.type}
        if self.title:
            out["title"] = self.title
        return out


BOT = FakeUser(id=7000001, first_name="StyleBot", username="stylebot_test_bot", is_bot=True)


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)
    result: Any = None
    at: float = field(default_factory=time.monotonic)
    refused: int | None = None  # the HTTP status of a refusal


@dataclass(frozen=True)
class Refusal:
    """What Telegram answers instead of taking a call."""

    status: int
    description: str
    retry_after: int | None = None


BLOCKED = Refusal(403, "Forbidden: bot was blocked by the user")
DEACTIVATED = Refusal(403, "Forbidden: user is deactivated")
KICKED = Refusal(403, "Forbidden: bot was kicked from the group chat")
CHAT_NOT_FOUND = Refusal(400, "Bad Request: chat not found")
SERVER_ERROR = Refusal(500, "Internal Server Error")


def too_many_requests(retry_after: int) -> Refusal:
    return Refusal(429, f"Too Many Requests: retry after {retry_after}", retry_after)


@dataclass
class _Rule:
    refusal: Refusal
    chat_id: int | None
    methods: frozenset[str] | None
    times: int | None  # None: until lifted
    after: int  # matching calls taken before the refusals start

    def matches(self, method: str, params: dict[str, Any]) -> bool:
        if self.times == 0 or (self.methods is not None and method not in self.methods):
            return False
        if self.chat_id is not None and params.get("chat_id") != self.chat_id:
            return False
        self.after -= 1
        return self.after < 0


def _decode(value: str) -> Any:
    if value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


class FakeTelegram:
    def __init__(self, token: str) -> None:
        self.token = token
        self.calls: list[Call] = []
        self.refused: list[Call] = []
        self._rules: list[_Rule] = []
        self.slow: dict[str, float] = {}  # method -> seconds it takes to answer
        self.files: dict[str, bytes] = {}  # file_id -> bytes (what getFile / download serve)
        self.messages: dict[tuple[int, int], dict[str, Any]] = {}  # (chat, id) -> message JSON
        self._updates: list[dict[str, Any]] = []
        self.presses: dict[str, dict[str, Any]] = {}  # callback query id -> the query, until answered
        self._new = asyncio.Condition()
        self._ids = itertools.count(1)
        self._update_ids = itertools.count(100)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/bot{token}/{method}", self._api)
        app.router.add_get("/file/bot{token}/{path:.+}", self._download)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        async with self._new:
            self._new.notify_all()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    # --- how Telegram says no ------------------------------------------------------------------

    def refuse(self, refusal: Refusal, *, chat: FakeChat | None = None,
               methods: tuple[str, ...] | None = None, times: int | None = None,
               after: int = 0) -> Callable[[], None]:
        """Answer ``refusal`` to calls for ``chat`` (None: every chat) of ``methods`` (None: all but
        getUpdates), ``times`` times (None: until the returned function lifts it), once ``after``
        such calls went through."""
        rule = _Rule(refusal, chat.id if chat else None, frozenset(methods) if methods else None, times,
                     after)
        self._rules.append(rule)
        return lambda: self._rules.remove(rule) if rule in self._rules else None

    def _refusal(self, method: str, params: dict[str, Any]) -> Refusal | None:
        for rule in self._rules:
            if rule.matches(method, params):
                if rule.times is not None:
                    rule.times -= 1
                return rule.refusal
        return None

    def refused_to(self, chat: FakeChat) -> list[Call]:
        return [c for c in self.refused if c.params.get("chat_id") == chat.id]

    # --- what users do -------------------------------------------------------------------------

    def _message(self, user: FakeUser, chat: FakeChat, **fields: Any) -> dict[str, Any]:
        msg = {"message_id": next(self._ids), "date": int(time.time()), "chat": chat.json(),
               "from": user.json(), **fields}
        self.messages[(chat.id, msg["message_id"])] = msg
        return msg

    async def _push(self, message: dict[str, Any]) -> dict[str, Any]:
        async with self._new:
            self._updates.append({"update_id": next(self._update_ids), "message": message})
            self._new.notify_all()
        return message

    async def press(self, user: FakeUser, message: dict[str, Any], data: str | None = None,
                    *, button: str | None = None) -> str:
        """``user`` presses a button under the bot's ``message``: the one labelled ``button``, or
        one that sends ``data`` (a forged press may send anything). Returns the query's id."""
        if data is None:
            rows = (message.get("reply_markup") or {}).get("inline_keyboard", [])
            found = [b["callback_data"] for row in rows for b in row if b["text"] == button]
            if not found:
                raise AssertionError(f"no button {button!r} under message {message['message_id']}")
            data = found[0]
        query = {"id": str(next(self._ids) + 900000), "from": user.json(), "message": message,
                 "chat_instance": f"ci{message['chat']['id']}", "data": data}
        self.presses[query["id"]] = query
        async with self._new:
            self._updates.append({"update_id": next(self._update_ids), "callback_query": query})
            self._new.notify_all()
        return str(query["id"])

    def _reply(self, chat: FakeChat, reply_to: int | None) -> dict[str, Any]:
        if reply_to is None:
            return {}
        return {"reply_to_message": self.messages[(chat.id, reply_to)]}

    async def send_text(self, user: FakeUser, chat: FakeChat, text: str, reply_to: int | None = None,
                        mentions: tuple[FakeUser, ...] = ()) -> dict[str, Any]:
        """``mentions``: people named in ``text`` by their first name and linked to their account,
        as Telegram clients do for people without a username (``text_mention`` entities)."""
        fields: dict[str, Any] = {"text": text, **self._reply(chat, reply_to)}
        entities = []
        if text.startswith("/"):
            entities.append({"type": "bot_command", "offset": 0, "length": len(text.split()[0])})
        for person in mentions:
            at = text.index(person.first_name)
            entities.append({"type": "text_mention", "offset": _utf16_len(text[:at]),
                             "length": _utf16_len(person.first_name), "user": person.json()})
        if entities:
            fields["entities"] = entities
        return await self._push(self._message(user, chat, **fields))

    def add_file(self, data: bytes) -> str:
        file_id = f"file-{next(self._ids)}"
        self.files[file_id] = data
        return file_id

    async def send_photo(self, user: FakeUser, chat: FakeChat, jpeg: bytes, caption: str | None = None,
                         reply_to: int | None = None) -> dict[str, Any]:
        thumb = self.add_file(b"not the big one")  # the small size Telegram always adds
        big = self.add_file(jpeg)
        sizes = [{"file_id": thumb, "file_unique_id": thumb + "u", "width": 90, "height": 90,
                  "file_size": 15},
                 {"file_id": big, "file_unique_id": big + "u", "width": 512, "height": 512,
                  "file_size": len(jpeg)}]
        fields: dict[str, Any] = {"photo": sizes, **self._reply(chat, reply_to)}
        if caption:
            fields["caption"] = caption
        return await self._push(self._message(user, chat, **fields))

    async def send_document(self, user: FakeUser, chat: FakeChat, data: bytes, *, file_name: str,
                            mime_type: str, caption: str | None = None,
                            file_size: int | None = None) -> dict[str, Any]:
        file_id = self.add_file(data)
        doc = {"file_id": file_id, "file_unique_id": file_id + "u", "file_name": file_name,
               "mime_type": mime_type, "file_size": len(data) if file_size is None else file_size}
        fields: dict[str, Any] = {"document": doc}
        if caption:
            fields["caption"] = caption
        return await self._push(self._message(user, chat, **fields))

    # --- what tests check ------------------------------------------------------------------------

    def called(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    async def wait_for(self, method: str, predicate: Callable[[Call], bool] = lambda c: True,
                       timeout: float = 30.0, *, after: int = 0) -> Call:
        """The first call of ``method`` (from index ``after`` on) that satisfies ``predicate``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for call in self.calls[after:]:
                if call.method == method and predicate(call):
                    return call
            if asyncio.get_running_loop().time() > deadline:
                seen = [(c.method, c.params.get("text") or c.params.get("caption")) for c in self.calls]
                raise AssertionError(f"no matching {method} within {timeout}s; calls: {seen[-15:]}")
            await asyncio.sleep(0.05)

    # --- the API -----------------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.json_response({"ok": False, "error_code": 401, "description": "Unauthorized"},
                                     status=401)
        method = request.match_info["method"]
        params: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        if request.content_type == "application/json":
            params = await request.json()
        else:
            form = await request.post()
            for key, value in form.items():
                if isinstance(value, web.FileField):
                    if key in files:  # Telegram could not tell two uploads of one name apart
                        return web.json_response({"ok": False, "error_code": 400,
                                                  "description": f"Bad Request: two files named {key}"},
                                                 status=400)
                    files[key] = value.file.read()
                else:
                    params[key] = _decode(str(value))
        for key in ("chat_id", "message_id"):
            if isinstance(params.get(key), str) and params[key].lstrip("-").isdigit():
                params[key] = int(params[key])
        call = Call(method=method, params=params, files=files)
        if method != "getUpdates" and (refusal := self._refusal(method, params)) is not None:
            call.refused = refusal.status
            self.refused.append(call)
            body: dict[str, Any] = {"ok": False, "error_code": refusal.status,
                                    "description": refusal.description}
            if refusal.retry_after is not None:
                body["parameters"] = {"retry_after": refusal.retry_after}
            return web.json_response(body, status=refusal.status)
        if method != "getUpdates":
            self.calls.append(call)
        if method in self.slow:
            await asyncio.sleep(self.slow[method])
        handler = getattr(self, "_m_" + method, None)
        if handler is None:
            return web.json_response({"ok": False, "error_code": 404, "description": "Not Found"},
                                     status=404)
        try:
            result = await handler(params, files)
        except _ApiError as err:
            return web.json_response({"ok": False, "error_code": 400, "description": err.description},
                                     status=400)
        call.result = result
        return web.json_response({"ok": True, "result": result})

    async def _download(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.Response(status=401)
        data = self.files.get(request.match_info["path"].removeprefix("photos/"))
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="application/octet-stream")

    async def _m_getMe(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return {**BOT.json(), "can_join_groups": True, "can_read_all_group_messages": False,
                "supports_inline_queries": False}

    async def _m_deleteWebhook(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return True

    async def _m_setMyCommands(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return True

    async def _m_getUpdates(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        offset = int(params.get("offset", 0) or 0)
        timeout = min(float(params.get("timeout", 0) or 0), 1.0)  # short: tests stay snappy

        def ready() -> list[dict[str, Any]]:
            return [u for u in self._updates if u["update_id"] >= offset]

        async with self._new:
            if not ready() and timeout > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._new.wait_for(lambda: bool(ready())), timeout)
            return ready()

    def _bot_message(self, params: dict[str, Any], **fields: Any) -> dict[str, Any]:
        chat_id = int(params["chat_id"])
        if (markup := _markup(params)) is not None:
            fields["reply_markup"] = markup
        chat = {"id": chat_id, "type": "private" if chat_id > 0 else "supergroup"}
        msg: dict[str, Any] = {"message_id": next(self._ids), "date": int(time.time()), "chat": chat,
                               "from": BOT.json(), **fields}
        reply = params.get("reply_parameters")
        if isinstance(reply, dict) and (chat_id, reply.get("message_id")) in self.messages:
            msg["reply_to_message"] = self.messages[(chat_id, reply["message_id"])]
        self.messages[(chat_id, msg["message_id"])] = msg
        return msg

    async def _m_sendMessage(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return self._bot_message(params, text=params["text"])

    async def _m_editMessageText(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        key = (int(params["chat_id"]), int(params["message_id"]))
        msg = self.messages.get(key)
        if msg is None:
            raise _ApiError("Bad Request: message to edit not found")
        markup = _markup(params)
        if msg.get("text") == params["text"] and msg.get("reply_markup") == markup:
            raise _ApiError("Bad Request: message is not modified: specified new message content "
                            "and reply markup are exactly the same")
        msg["text"] = params["text"]
        msg.pop("reply_markup", None)
        if markup is not None:
            msg["reply_markup"] = markup
        msg["edit_date"] = int(time.time())
        return msg

    def _upload(self, params: dict[str, Any], files: dict[str, bytes], field_name: str) -> str:
        value = params.get(field_name, "")
        name = value.removeprefix("attach://") if isinstance(value, str) else ""
        data = files.get(name) or files.get(field_name)
        if data is None:
            raise _ApiError(f"Bad Request: there is no {field_name} in the request")
        return self.add_file(data)

    def _media_fields(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"caption": params["caption"]} if params.get("caption") else {}

    async def _m_sendPhoto(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        fid = self._upload(params, files, "photo")
        size = {"file_id": fid, "file_unique_id": fid + "u", "width": 128, "height": 64}
        return self._bot_message(params, photo=[size], **self._media_fields(params))

    async def _m_sendVideo(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        fid = self._upload(params, files, "video")
        video = {"file_id": fid, "file_unique_id": fid + "u", "width": 64, "height": 64, "duration": 1}
        return self._bot_message(params, video=video, **self._media_fields(params))

    async def _m_sendAnimation(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        fid = self._upload(params, files, "animation")
        anim = {"file_id": fid, "file_unique_id": fid + "u", "width": 64, "height": 64, "duration": 1}
        return self._bot_message(params, animation=anim, **self._media_fields(params))

    async def _m_sendDocument(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        fid = self._upload(params, files, "document")
        return self._bot_message(params, document={"file_id": fid, "file_unique_id": fid + "u"},
                                 **self._media_fields(params))

    async def _m_sendMediaGroup(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        out = []
        for item in params["media"]:
            fid = self._upload(item, files, "media")
            size = {"file_id": fid, "file_unique_id": fid + "u", "width": 128, "height": 64}
            fields: dict[str, Any] = {"photo": [size], "media_group_id": "g1"}
            if item.get("caption"):
                fields["caption"] = item["caption"]
            out.append(self._bot_message(params, **fields))
        return out

    async def _m_editMessageMedia(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        msg = self.messages.get((int(params["chat_id"]), int(params["message_id"])))
        if msg is None:
            raise _ApiError("Bad Request: message to edit not found")
        if not any(k in msg for k in ("photo", "video", "animation", "document")):
            raise _ApiError("Bad Request: there is no media in the message to edit")
        item = params["media"]
        if not isinstance(item, dict) or item.get("type") != "photo":
            raise _ApiError("Bad Request: unsupported media type in this fake")
        fid = self._upload(item, files, "media")
        for kind in ("photo", "video", "animation", "document", "caption"):
            msg.pop(kind, None)
        msg["photo"] = [{"file_id": fid, "file_unique_id": fid + "u", "width": 128, "height": 64}]
        if item.get("caption"):
            msg["caption"] = item["caption"]
        msg.pop("reply_markup", None)
        if (markup := _markup(params)) is not None:
            msg["reply_markup"] = markup
        msg["edit_date"] = int(time.time())
        return msg

    async def _m_answerCallbackQuery(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        if self.presses.pop(str(params["callback_query_id"]), None) is None:
            raise _ApiError("Bad Request: query is too old and response timeout expired or query ID "
                            "is invalid")
        if len(str(params.get("text") or "")) > 200:
            raise _ApiError("Bad Request: MESSAGE_TOO_LONG")
        return True

    async def _m_getFile(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        file_id = str(params["file_id"])
        if file_id not in self.files:
            raise _ApiError("Bad Request: invalid file_id")
        return {"file_id": file_id, "file_unique_id": file_id + "u",
                "file_size": len(self.files[file_id]), "file_path": f"photos/{file_id}"}


def _utf16_len(text: str) -> int:
    """Telegram counts entity offsets and lengths in UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


def _markup(params: dict[str, Any]) -> dict[str, Any] | None:
    """An inline keyboard as Telegram checks it: each button's callback data 1-64 bytes."""
    markup = params.get("reply_markup")
    if not isinstance(markup, dict):
        return None
    for row in markup.get("inline_keyboard", []):
        for button in row:
            if not 1 <= len(str(button.get("callback_data", "")).encode()) <= 64:
                raise _ApiError("Bad Request: BUTTON_DATA_INVALID")
    return markup


class _ApiError(Exception):
    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description
