"""Discord: discord.py gateway events and slash commands in, service replies out.

The adapter only translates. Slash commands (``/selfie``, ``/morph`` ...) are defined in
:mod:`bot.adapters.discord_commands` and registered globally when their definition changed; replies go out
through :mod:`bot.adapters.discord_send`. Prefix commands work in DMs and, in servers, when the bot is
mentioned (``@stylebot /morph @me @friend``), with the same text syntax as Telegram
(:func:`bot.parse.parse`); a plain image in a DM is a selfie.

No privileged intent is needed: slash commands, DMs and messages that mention the bot carry their
text and attachments without one. ``[discord] message_content = true`` also asks for the Message
Content intent (so "@stylebot /selfie" as a reply to a photo posted earlier can read that photo);
when the application does not have it, the gateway closes with 4014, the adapter says once what to
enable in the developer portal and connects without it.

``[discord] api_base`` / ``gateway_url`` point discord.py at a proxy (or a test server). They are
process-wide settings of discord.py (``Route.BASE``, ``DiscordWebSocket.DEFAULT_GATEWAY``), so one
process talks to one Discord.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any

import discord
import yarl
from discord import app_commands

from bot import replies
from bot.adapters.discord_commands import add_commands, handle_press, sync_if_changed
from bot.adapters.discord_send import DiscordSender, LiveInteractions
from bot.commands import Command, Forget, Mix, Morph, Origin, Reply, Selfie, SetPrivacy, ShowFaces, Target
from bot.parse import parse
from bot.replies import MAX_PHOTO_BYTES, Refusal, personal_in_a_channel
from bot.service import Service
from settings import Config, DiscordConfig

__all__ = ["DiscordAdapter", "INTERACTION_WINDOW_S"]

log = logging.getLogger("stylebot.discord")

DEFAULT_API_BASE = "https://discord.com/api/v10"
INTERACTION_WINDOW_S = 15 * 60  # an interaction token accepts followups for 15 minutes
_WINDOW_MARGIN_S = 60  # stop using the token a minute early; the channel is always there
_MAX_RATELIMIT_WAIT_S = 30.0  # the least discord.py allows


def _point_at(cfg: DiscordConfig) -> None:
    """Aim discord.py's REST and gateway URLs at ``[discord] api_base`` / ``gateway_url``."""
    discord.http.Route.BASE = cfg.api_base.rstrip("/")
    if cfg.gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(cfg.gateway_url)


def _is_image(att: discord.Attachment) -> bool:
    return (att.content_type or "").lower().startswith("image/")


def _command_word(text: str) -> str:
    """``"/Me@stylebot extra"`` -> ``"me"``."""
    return text.split(maxsplit=1)[0].split("@")[0].lstrip("/").lower()


class _Client(discord.Client):
    def __init__(self, adapter: DiscordAdapter, service: Service, *, message_content: bool) -> None:
        intents = discord.Intents.none()
        intents.guilds = True
        intents.guild_messages = True
        intents.dm_messages = True
        intents.message_content = message_content  # privileged: enabled in the developer portal
        # A long rate-limit wait raises instead, so the reply pump retries that chat later.
        super().__init__(intents=intents, allowed_mentions=discord.AllowedMentions.none(),
                         max_ratelimit_timeout=_MAX_RATELIMIT_WAIT_S)
        self.adapter, self.service = adapter, service
        self.tree = app_commands.CommandTree(self)
        add_commands(self.tree, adapter, service)

    async def setup_hook(self) -> None:
        cfg = self.adapter.config.discord
        if not cfg.gateway_url and cfg.api_base.rstrip("/") != DEFAULT_API_BASE:
            _, url, _ = await self.http.get_bot_gateway()  # a proxy: ask it where its gateway is
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(url)
        assert self.application_id is not None  # login fetched it
        await sync_if_changed(self.tree, application_id=self.application_id,
                              stamp=self.adapter.config.data_dir / "discord-commands.json")

    async def on_ready(self) -> None:
        log.info("connected to Discord as %s", self.user)
        self.adapter.ready.set()

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        if interaction.type is discord.InteractionType.component:
            await handle_press(self.adapter, self.service, interaction)

    async def on_message(self, message: discord.Message) -> None:
        try:
            await self.adapter.on_message(self, message)
        except Exception:
            log.exception("could not handle a Discord message")


class DiscordAdapter:
    """Feeds Discord messages and slash commands to the service; sends its replies."""

    platform = "discord"

    def __init__(self, config: Config) -> None:
        self.config = config
        self._token = config.discord_token.get_secret_value()  # never logged
        self.live = LiveInteractions()
        self._sender = DiscordSender(upload_limit=self.upload_limit, live=self.live)
        self.ready = asyncio.Event()  # set once connected (the gateway's READY and guilds)

    async def deliver(self, reply: Reply) -> dict[str, Any] | None:
        return await self._sender.deliver(reply)

    # --- receiving ---------------------------------------------------------------------------

    async def run(self, service: Service, stop: asyncio.Event) -> None:
        """Connect until ``stop``; without the Message Content intent if Discord refuses it."""
        _point_at(self.config.discord)
        message_content = self.config.discord.message_content
        while True:
            try:
                await self._connected(service, stop, message_content=message_content)
                return
            except discord.PrivilegedIntentsRequired:
                if not message_content:
                    raise
                log.warning("discord: this bot may not use the Message Content intent (gateway close "
                            "code 4014): enable it in the Developer Portal (Applications -> your bot -> "
                            "Bot -> Privileged Gateway Intents -> Message Content Intent) or set "
                            "[discord] message_content = false; connecting without it")
                message_content = False

    async def _connected(self, service: Service, stop: asyncio.Event, *, message_content: bool) -> None:
        client = _Client(self, service, message_content=message_content)
        self._sender.client = client
        async with client:
            runner = asyncio.create_task(client.start(self._token))
            stopper = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                await client.close()
                self._sender.client = None
                with contextlib.suppress(asyncio.CancelledError):
                    await runner  # re-raises a login failure
                self.ready.clear()

    @property
    def upload_limit(self) -> int:
        return self.config.discord.max_upload_mb * 1024 * 1024

    def _origin(self, *, user: discord.abc.User, channel_id: int, guild: discord.Guild | None,
                reply_to: dict[str, Any]) -> Origin:
        # A server is one community for consent ("chat" privacy); a DM is its own chat.
        if guild is None:
            return Origin(platform=self.platform, user_id=str(user.id), chat_id=str(channel_id),
                          chat_kind="private", username=user.name, display_name=user.display_name,
                          reply_to={"platform": self.platform, "channel_id": str(channel_id), **reply_to})
        return Origin(platform=self.platform, user_id=str(user.id), chat_id=str(guild.id),
                      chat_kind="group", username=user.name, display_name=user.display_name,
                      chat_title=guild.name,
                      reply_to={"platform": self.platform, "channel_id": str(channel_id), **reply_to})

    def origin_of(self, interaction: discord.Interaction) -> Origin:
        """The Origin of a slash command; replies go to its followup webhook while it lasts."""
        limit = min(interaction.filesize_limit or self.upload_limit, self.upload_limit)
        return self._origin(
            user=interaction.user, channel_id=interaction.channel_id or 0, guild=interaction.guild,
            reply_to={"filesize_limit": limit, "interaction": {
                "application_id": str(interaction.application_id), "token": interaction.token,
                "expires_at": interaction.created_at.timestamp() + INTERACTION_WINDOW_S - _WINDOW_MARGIN_S}})

    async def on_message(self, client: _Client, message: discord.Message) -> None:
        me = client.user
        if me is None or message.author.bot or message.author.id == me.id:
            return
        private = message.guild is None
        if not private and me not in message.mentions:
            return  # in servers the bot answers only when mentioned (or through slash commands)
        text = message.content
        for mention in (f"<@{me.id}>", f"<@!{me.id}>"):
            text = text.replace(mention, " ")
        text = text.strip()
        limit = min(message.guild.filesize_limit, self.upload_limit) if message.guild else self.upload_limit
        origin = self._origin(user=message.author, channel_id=message.channel.id, guild=message.guild,
                              reply_to={"message_id": str(message.id), "filesize_limit": limit})
        service = client.service
        replied = message.reference.resolved if message.reference else None
        reply_target = None
        if isinstance(replied, discord.Message) and replied.author.id not in (me.id, message.author.id):
            reply_target = Target(user_id=str(replied.author.id), username=replied.author.name)
        attachments = list(message.attachments)
        if not attachments and isinstance(replied, discord.Message):
            attachments = list(replied.attachments)  # "/selfie" as a reply to a photo
        wants_photo = not text.startswith("/") or text.lower().startswith("/selfie")
        photo = None
        try:
            if attachments and wants_photo:
                photo = await self._read_photo(attachments[0], limit)
            cmd = parse(text, origin=origin, photo=photo, reply_target=reply_target,
                        bot_username=me.name)
        except Refusal as refusal:
            await service.say(origin, str(refusal), private=True)
            return
        if cmd is None and photo is not None:
            cmd = Selfie(origin=origin, photo=photo)  # a photo with a mention, in a server
        if cmd is None:
            if private and text:
                await service.say(origin, replies.SEND_A_SELFIE)
            return
        if not private and isinstance(cmd, ShowFaces | SetPrivacy | Forget):
            # A channel message cannot be ephemeral: personal answers come through the slash command.
            await service.say(origin, personal_in_a_channel(_command_word(text)), private=True)
            return
        await service.handle(self._named(cmd, message))

    @staticmethod
    def _named(cmd: Command, message: discord.Message) -> Command:
        """Give ``<@123>`` targets their names, so replies say "@bob", not "that person"."""
        if not isinstance(cmd, Morph | Mix):
            return cmd
        names = {str(u.id): u.name for u in message.mentions}

        def name(t: Target) -> Target:
            if t.user_id is not None and t.username is None and t.user_id in names:
                if t.user_id == str(message.author.id):
                    return Target(me=True)
                return dataclasses.replace(t, username=names[t.user_id])
            return t

        return dataclasses.replace(cmd, a=name(cmd.a), b=name(cmd.b))

    async def _read_photo(self, att: discord.Attachment, limit: int) -> bytes:
        limit = min(limit, MAX_PHOTO_BYTES)
        if att.size > limit:
            raise Refusal(replies.file_too_large(limit))
        if not _is_image(att):
            raise Refusal(replies.NOT_A_PHOTO)
        return await att.read()

    async def on_selfie(self, service: Service, origin: Origin, photo: discord.Attachment,
                        label: str | None) -> None:
        try:
            data = await self._read_photo(photo, int(origin.reply_to["filesize_limit"]))
        except Refusal as refusal:
            await service.say(origin, str(refusal), private=True)
            return
        await service.handle(Selfie(origin=origin, photo=data, label=label or "default"))
