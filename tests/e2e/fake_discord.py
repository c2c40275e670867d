"""A local stand-in for Discord's servers: REST API, CDN file route and a JSON gateway websocket.

The real discord.py client (through :class:`bot.adapters.discord.DiscordAdapter`) talks to it on
127.0.0.1. Everything the bot does is recorded for assertions; helpers push gateway events
(messages, slash-command interactions) as Discord would.

It says no as Discord does: :meth:`FakeDiscord.refuse` makes a route (channel messages and their
edits, followups and their edits) answer 403 / 404 / 429 with ``retry_after`` / 500, in one channel
or all, always or a number of times; ``refused_intents`` makes the gateway close with 4014 when the
bot identifies with a privileged intent the application was not granted.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import BodyPartReader, WSMsgType, web

__all__ = ["ROUTES", "FakeDiscord", "Sent"]

APP_ID = "900000000000000001"
BOT_ID = APP_ID
GUILD_ID = "910000000000000001"
CHANNEL_ID = "920000000000000001"
DM_BASE = 930000000000000000
_DISCORD_EPOCH_MS = 1420070400000


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _user(uid: str, name: str, *, bot: bool = False) -> dict[str, Any]:
    return {"id": uid, "username": name, "discriminator": "0", "global_name": name.title(),
            "avatar": None, "bot": bot}


@dataclass
class Sent:
    """A message the bot created (channel message or interaction followup), as it is now."""

    id: str
    channel_id: str
    content: str | None
    files: list[tuple[str, bytes]]  # (filename, bytes) now attached
    via: str  # "channel" or "webhook"
    token: str | None = None
    allowed_mentions: Any = None
    reference: Any = None
    edits: list[dict[str, Any]] = field(default_factory=list)  # each edit's JSON payload
    first: str | None = None  # the content it was created with
    flags: int = 0  # 64: ephemeral, only the user who ran the command sees it
    components: list[dict[str, Any]] = field(default_factory=list)  # action rows of buttons

    def __post_init__(self) -> None:
        self.first = self.content

    @property
    def text(self) -> str:
        return self.content or ""

    @property
    def filenames(self) -> list[str]:
        return [n for n, _ in self.files]


ROUTES = ("channel_send", "channel_edit", "webhook_send", "webhook_edit")


@dataclass
class _Rule:
    route: str
    status: int
    code: int
    message: str
    retry_after: float | None
    channel_id: str | None
    times: int | None  # None: until lifted


class FakeDiscord:
    def __init__(self, token: str) -> None:
        self.token = token
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.api_base = f"{self.base}/api/v10"
        self.gateway_url = f"ws://127.0.0.1:{self.port}/gateway"
        self.commands: list[dict[str, Any]] = []
        self.registrations = 0  # times the bot registered its slash commands
        self.callbacks: list[dict[str, Any]] = []  # interaction callbacks: id, token, body
        self.messages: list[Sent] = []
        self.identify: dict[str, Any] | None = None
        self.identifies: list[dict[str, Any]] = []
        self.refused_intents = 0  # privileged intents this application was not granted
        self.refused: list[tuple[str, int]] = []  # (route, status) of each refused call
        self.deleted_originals: list[str] = []  # interaction tokens whose "thinking..." was deleted
        self._rules: list[_Rule] = []
        self.gateway_query: dict[str, str] = {}
        self.unauthorized: list[str] = []  # REST calls without the bot token (webhooks excepted)
        self.users: dict[str, dict[str, Any]] = {BOT_ID: _user(BOT_ID, "stylebot", bot=True)}
        self.files: dict[str, tuple[bytes, str]] = {}  # what users attach: name -> (bytes, type)
        self.uploads: list[bytes] = []  # every file the bot uploaded, edits replaced or not
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)
        self._ws: web.WebSocketResponse | None = None
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        r, api = app.router, "/api/v10"
        r.add_get("/gateway", self._gateway)
        r.add_get(f"{api}/gateway", self._gateway_info)
        r.add_get(f"{api}/gateway/bot", self._gateway_info)
        r.add_get(f"{api}/users/@me", self._me)
        r.add_get(f"{api}/oauth2/applications/@me", self._application)
        r.add_get(f"{api}/applications/@me", self._application)
        r.add_put(f"{api}/applications/{{app}}/commands", self._put_commands)
        r.add_post(f"{api}/channels/{{cid}}/messages", self._post_message)
        r.add_patch(f"{api}/channels/{{cid}}/messages/{{mid}}", self._patch_message)
        r.add_post(f"{api}/interactions/{{iid}}/{{itoken}}/callback", self._callback)
        r.add_post(f"{api}/webhooks/{{app}}/{{wtoken}}", self._post_webhook)
        r.add_patch(f"{api}/webhooks/{{app}}/{{wtoken}}/messages/{{mid}}", self._patch_webhook)
        r.add_delete(f"{api}/webhooks/{{app}}/{{wtoken}}/messages/@original", self._delete_original)
        r.add_get("/files/{name}", self._file)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # --- how Discord says no ---------------------------------------------------------------

    def refuse(self, route: str, status: int, message: str, *, code: int = 0,
               retry_after: float | None = None, channel_id: str | None = None,
               times: int | None = None) -> None:
        """Answer ``status`` to calls of ``route`` (one of :data:`ROUTES`) in ``channel_id`` (None:
        any), ``times`` times (None: always)."""
        assert route in ROUTES
        self._rules.append(_Rule(route, status, code, message, retry_after, channel_id, times))

    def _refusal(self, route: str, channel_id: str) -> web.Response | None:
        for rule in self._rules:
            if rule.route != route or rule.times == 0 or rule.channel_id not in (None, channel_id):
                continue
            if rule.times is not None:
                rule.times -= 1
            self.refused.append((route, rule.status))
            body: dict[str, Any] = {"message": rule.message, "code": rule.code}
            headers = {"Content-Type": "application/json"}
            if rule.retry_after is not None:
                body |= {"retry_after": rule.retry_after, "global": False}
                headers["Via"] = "1.1 google"  # Discord's 429s pass its proxy; Cloudflare bans do not
            return web.Response(status=rule.status, body=json.dumps(body).encode(), headers=headers)
        return None

    # --- what tests use ----------------------------------------------------------------------

    def add_user(self, uid: str, name: str) -> dict[str, Any]:
        self.users[uid] = _user(uid, name)
        return self.users[uid]

    def add_file(self, name: str, data: bytes, content_type: str) -> dict[str, Any]:
        """Host a file on the fake CDN; returns the attachment payload that points at it."""
        self.files[name] = (data, content_type)
        return {"id": self._id(), "filename": name, "size": len(data), "content_type": content_type,
                "url": f"{self.base}/files/{name}", "proxy_url": f"{self.base}/files/{name}"}

    async def wait_for(self, predicate: Any, *, timeout: float) -> None:
        """Wait until ``predicate()`` holds (re-checked whenever the bot calls the server)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    async def message(self, author: str, content: str, *, dm: bool = False,
                      attachments: list[dict[str, Any]] | None = None,
                      mentions: Sequence[str] = ()) -> str:
        """Push a MESSAGE_CREATE from a user; returns the channel id it was sent in."""
        channel = str(DM_BASE + int(author) % 1000) if dm else CHANNEL_ID
        data: dict[str, Any] = {
            "id": self._id(), "channel_id": channel, "author": self.users[author], "content": content,
            "timestamp": _now(), "edited_timestamp": None, "tts": False, "mention_everyone": False,
            "mentions": [self.users[m] for m in mentions], "mention_roles": [],
            "attachments": attachments or [], "embeds": [], "pinned": False, "type": 0}
        if not dm:
            data["guild_id"] = GUILD_ID
            data["member"] = self._member(author, with_user=False)
        await self._dispatch("MESSAGE_CREATE", data)
        return channel

    async def _interact(self, user: str, kind: int, channel_id: str, **fields: Any) -> str:
        """Push an INTERACTION_CREATE of ``kind`` (2: a command, 3: a component) from ``user`` in
        the guild; returns its token."""
        token = f"interaction-token-{self._id()}"
        await self._dispatch("INTERACTION_CREATE", {
            "id": self._id(), "application_id": APP_ID, "type": kind, "token": token, "version": 1,
            "guild_id": GUILD_ID, "channel_id": channel_id, "channel": self._channel(),
            "member": {**self._member(user, with_user=True), "permissions": "2147483647"},
            "app_permissions": "2147483647", "locale": "en-US", "guild_locale": "en-US",
            "attachment_size_limit": 10 * 1024 * 1024, "entitlements": [],
            "authorizing_integration_owners": {"0": GUILD_ID}, "context": 0, **fields})
        return token

    async def slash(self, user: str, name: str, options: list[dict[str, Any]] | None = None, *,
                    attachments: Sequence[dict[str, Any]] = (), users: Sequence[str] = ()) -> str:
        """Push an application-command INTERACTION_CREATE in the guild; returns its token."""
        command = next(c for c in self.commands if c["name"] == name)
        resolved: dict[str, Any] = {}
        if attachments:
            resolved["attachments"] = {a["id"]: a for a in attachments}
        if users:
            resolved["users"] = {u: self.users[u] for u in users}
            resolved["members"] = {u: self._member(u, with_user=False) for u in users}
        return await self._interact(user, 2, CHANNEL_ID, data={
            "id": command["id"], "name": name, "type": 1, "options": options or [],
            "resolved": resolved, "guild_id": GUILD_ID})

    async def user_menu(self, user: str, name: str, target: str) -> str:
        """``user`` picks the app command ``name`` from ``target``'s context menu (a USER command:
        an INTERACTION_CREATE of command type 2 with a target id); returns its token."""
        command = next(c for c in self.commands if c["name"] == name and c.get("type") == 2)
        return await self._interact(user, 2, CHANNEL_ID, data={
            "id": command["id"], "name": name, "type": 2, "target_id": target, "guild_id": GUILD_ID,
            "resolved": {"users": {target: self.users[target]},
                         "members": {target: self._member(target, with_user=False)}}})

    async def press(self, user: str, message: Sent, label: str | None = None, *,
                    custom_id: str | None = None) -> str:
        """``user`` presses the button labelled ``label`` under ``message`` (or one sending
        ``custom_id``: a forged press may send anything); returns the interaction's token."""
        if custom_id is None:
            found = [c["custom_id"] for row in message.components for c in row.get("components", [])
                     if c.get("label") == label]
            if not found:
                raise AssertionError(f"no button {label!r} under message {message.id}")
            custom_id = found[0]
        return await self._interact(user, 3, message.channel_id, message=self._message_json(message),
                                    data={"custom_id": custom_id, "component_type": 2})

    def for_token(self, token: str) -> list[Sent]:
        return [m for m in self.messages if m.token == token]

    def in_channel(self, channel_id: str) -> list[Sent]:
        return [m for m in self.messages if m.channel_id == channel_id]

    # --- gateway -----------------------------------------------------------------------------

    def _id(self) -> str:
        """A snowflake made now, as Discord's are (discord.py reads creation times from them)."""
        return str(((int(time.time() * 1000) - _DISCORD_EPOCH_MS) << 22) | (next(self._ids) & 0xFFF))

    def _channel(self) -> dict[str, Any]:
        return {"id": CHANNEL_ID, "type": 0, "guild_id": GUILD_ID, "name": "faces", "position": 0,
                "permission_overwrites": [], "nsfw": False, "parent_id": None}

    def _member(self, uid: str, *, with_user: bool) -> dict[str, Any]:
        m: dict[str, Any] = {"roles": [], "joined_at": _now(), "deaf": False, "mute": False, "flags": 0}
        if with_user:
            m["user"] = self.users[uid]
        return m

    def _guild(self) -> dict[str, Any]:
        return {
            "id": GUILD_ID, "name": "Face Club", "icon": None, "owner_id": BOT_ID, "features": [],
            "roles": [{"id": GUILD_ID, "name": "@everyone", "permissions": "2147483647", "position": 0,
                       "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0}],
            "channels": [self._channel()], "threads": [], "emojis": [], "stickers": [],
            "members": [self._member(u, with_user=True) for u in self.users],
            "member_count": len(self.users), "large": False, "unavailable": False,
            "premium_tier": 0, "voice_states": [], "presences": [], "stage_instances": [],
            "guild_scheduled_events": [], "joined_at": _now(), "verification_level": 0,
            "default_message_notifications": 0, "explicit_content_filter": 0, "mfa_level": 0,
            "system_channel_flags": 0, "preferred_locale": "en-US", "nsfw_level": 0,
        }

    async def _dispatch(self, event: str, data: dict[str, Any]) -> None:
        assert self._ws is not None, "the bot is not connected to the gateway"
        await self._ws.send_str(json.dumps({"op": 0, "t": event, "s": next(self._seq), "d": data}))

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        self.gateway_query = dict(request.query)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._ws = ws
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                break
            payload = json.loads(msg.data)
            if payload["op"] == 1:
                await ws.send_str(json.dumps({"op": 11}))
            elif payload["op"] == 2:
                self.identify = payload["d"]
                self.identifies.append(payload["d"])
                ok = payload["d"].get("token") == self.token
                if not ok:
                    await ws.close(code=4004)
                    break
                if payload["d"].get("intents", 0) & self.refused_intents:
                    await ws.close(code=4014, message=b"Disallowed intent(s).")
                    break
                await self._dispatch("READY", {
                    "v": 10, "user": self.users[BOT_ID], "guilds": [{"id": GUILD_ID, "unavailable": True}],
                    "session_id": "session-1", "resume_gateway_url": self.gateway_url,
                    "application": {"id": APP_ID, "flags": 0}, "private_channels": [],
                    "relationships": []})
                await self._dispatch("GUILD_CREATE", self._guild())
            await self._touch()
        return ws

    # --- REST --------------------------------------------------------------------------------

    async def _touch(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _auth(self, request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bot {self.token}":
            self.unauthorized.append(request.path)
            raise web.HTTPUnauthorized(text=json.dumps({"message": "401: Unauthorized", "code": 0}),
                                       content_type="application/json")

    async def _gateway_info(self, request: web.Request) -> web.Response:
        return _json({"url": self.gateway_url, "shards": 1, "session_start_limit": {
            "total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}})

    async def _me(self, request: web.Request) -> web.Response:
        self._auth(request)
        return _json(self.users[BOT_ID])

    async def _application(self, request: web.Request) -> web.Response:
        self._auth(request)
        return _json({
            "id": APP_ID, "name": "stylebot", "description": "", "icon": None, "bot_public": True,
            "bot_require_code_grant": False, "owner": _user("1", "owner"), "verify_key": "0" * 64,
            "flags": 0, "team": None, "summary": "", "rpc_origins": []})

    async def _put_commands(self, request: web.Request) -> web.Response:
        self._auth(request)
        body = await request.json()
        self.registrations += 1
        # Discord answers every command with a description ("" for context-menu commands).
        self.commands = [{"description": "", **c, "id": self._id(), "application_id": APP_ID,
                          "version": "1"} for c in body]
        await self._touch()
        return _json(self.commands)

    async def _read_body(self, request: web.Request) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
        if not request.content_type.startswith("multipart/"):
            return await request.json(), []
        payload: dict[str, Any] = {}
        files: list[tuple[str, bytes]] = []
        reader = await request.multipart()
        async for part in reader:
            assert isinstance(part, BodyPartReader)
            if part.name == "payload_json":
                payload = json.loads(await part.text())
            else:
                files.append((part.filename or "", bytes(await part.read())))
        self.uploads.extend(data for _, data in files)
        return payload, files

    def _message_json(self, sent: Sent) -> dict[str, Any]:
        files = sent.files
        return {
            "id": sent.id, "channel_id": sent.channel_id, "author": self.users[BOT_ID],
            "content": sent.text, "timestamp": _now(), "edited_timestamp": None, "tts": False,
            "mention_everyone": False, "mentions": [], "mention_roles": [], "embeds": [],
            "pinned": False, "type": 0, "webhook_id": APP_ID if sent.via == "webhook" else None,
            "attachments": [{"id": str(i), "filename": n, "size": len(b), "url": f"{self.base}/files/{n}",
                             "proxy_url": f"{self.base}/files/{n}"} for i, (n, b) in enumerate(files)],
            "components": sent.components,
        }

    async def _create(self, request: web.Request, channel_id: str, via: str,
                      token: str | None) -> web.Response:
        payload, files = await self._read_body(request)
        if (bad := _bad_components(payload)) is not None:
            return bad
        sent = Sent(id=self._id(), channel_id=channel_id, content=payload.get("content"), files=files,
                    via=via, token=token, allowed_mentions=payload.get("allowed_mentions"),
                    reference=payload.get("message_reference"), flags=int(payload.get("flags") or 0),
                    components=list(payload.get("components") or []))
        self.messages.append(sent)
        await self._touch()
        return _json(self._message_json(sent))

    async def _edit(self, request: web.Request, mid: str) -> web.Response:
        payload, files = await self._read_body(request)
        sent = next((m for m in self.messages if m.id == mid), None)
        if sent is None:
            raise web.HTTPNotFound(text=json.dumps({"message": "Unknown Message", "code": 10008}),
                                   content_type="application/json")
        if (bad := _bad_components(payload)) is not None:
            return bad
        sent.edits.append(payload)
        if "content" in payload:
            sent.content = payload["content"]
        if "components" in payload:
            sent.components = list(payload["components"] or [])
        if "attachments" in payload:  # discord.py lists the files it keeps and uploads
            sent.files = files
        await self._touch()
        return _json(self._message_json(sent))

    async def _post_message(self, request: web.Request) -> web.Response:
        self._auth(request)
        cid = request.match_info["cid"]
        return self._refusal("channel_send", cid) or await self._create(request, cid, "channel", None)

    async def _patch_message(self, request: web.Request) -> web.Response:
        self._auth(request)
        return (self._refusal("channel_edit", request.match_info["cid"])
                or await self._edit(request, request.match_info["mid"]))

    async def _callback(self, request: web.Request) -> web.Response:
        body, _ = await self._read_body(request)
        iid = request.match_info["iid"]
        self.callbacks.append({"id": iid, "token": request.match_info["itoken"], **body})
        await self._touch()
        return _json({"interaction": {"id": iid, "type": 2,
                                                  "response_message_loading": body.get("type") == 5}})

    async def _post_webhook(self, request: web.Request) -> web.Response:
        return (self._refusal("webhook_send", CHANNEL_ID)
                or await self._create(request, CHANNEL_ID, "webhook", request.match_info["wtoken"]))

    async def _patch_webhook(self, request: web.Request) -> web.Response:
        return (self._refusal("webhook_edit", CHANNEL_ID)
                or await self._edit(request, request.match_info["mid"]))

    async def _delete_original(self, request: web.Request) -> web.Response:
        self.deleted_originals.append(request.match_info["wtoken"])
        await self._touch()
        return web.Response(status=204)

    async def _file(self, request: web.Request) -> web.Response:
        data, content_type = self.files[request.match_info["name"]]
        return web.Response(body=data, content_type=content_type)


def _bad_components(payload: dict[str, Any]) -> web.Response | None:
    """Discord's 400 for buttons it would not take: custom ids of 1-100 characters, labels of at
    most 80, at most 5 buttons a row and 5 rows."""
    rows = payload.get("components") or []
    buttons = [c for row in rows for c in row.get("components", [])]
    if len(rows) <= 5 and all(len(row.get("components", [])) <= 5 for row in rows) and all(
            1 <= len(b.get("custom_id", "")) <= 100 and len(b.get("label", "")) <= 80 for b in buttons):
        return None
    return web.json_response({"message": "Invalid Form Body", "code": 50035}, status=400)


def _json(data: Any) -> web.Response:
    # discord.py parses a body as JSON only for exactly "application/json" (no charset).
    return web.Response(body=json.dumps(data).encode(), headers={"Content-Type": "application/json"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
