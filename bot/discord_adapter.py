"""Discord: discord.py gateway events and slash commands in, service replies out.

The adapter only translates. Slash commands (``/selfie``, ``/morph`` ...) are registered globally
through an ``app_commands.CommandTree``; each interaction is deferred at once (Discord wants an
answer within 3 s) and the service's first message goes out as the interaction's followup. Prefix
commands work in DMs and, in servers, when the bot is mentioned (``@stylebot /morph @me @friend``),
with the same text syntax as Telegram (:func:`bot.parse.parse`); a plain image in a DM is a selfie.

Reading the text of server messages needs the privileged **Message Content** intent: enable it
for the bot in the Discord developer portal (Bot -> Privileged Gateway Intents), or prefix commands
in servers will arrive empty (slash commands and DMs work without it).

``[discord] api_base`` / ``gateway_url`` point discord.py at a proxy (or a test server). They are
process-wide settings of discord.py (``Route.BASE``, ``DiscordWebSocket.DEFAULT_GATEWAY``), so one
process talks to one Discord.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any, Literal

import discord
import yarl
from discord import app_commands

from bot.commands import (
    Command,
    Edit,
    Forget,
    Help,
    Mix,
    Morph,
    Origin,
    Reply,
    Selfie,
    SetPrivacy,
    ShowFaces,
    Target,
)
from bot.config import Config, DiscordConfig
from bot.parse import COMMANDS, parse
from bot.replies import MAX_PHOTO_BYTES, OOPS, Refusal
from bot.service import Service

__all__ = ["DiscordAdapter", "INTERACTION_WINDOW_S"]

log = logging.getLogger("stylebot.discord")

DEFAULT_API_BASE = "https://discord.com/api/v10"
INTERACTION_WINDOW_S = 15 * 60  # an interaction token accepts followups for 15 minutes
_WINDOW_MARGIN_S = 60  # stop using the token a minute early; the channel is always there
_MAX_CONTENT = 2000
NOT_AN_IMAGE = "That doesn't look like a photo I can read. Please send a JPEG or PNG."


def _too_big(limit: int) -> str:
    return f"That file is too large (over {limit // (1024 * 1024)} MB). Please send a smaller photo."


def _point_at(cfg: DiscordConfig) -> None:
    """Aim discord.py's REST and gateway URLs at ``[discord] api_base`` / ``gateway_url``."""
    discord.http.Route.BASE = cfg.api_base.rstrip("/")
    if cfg.gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(cfg.gateway_url)


def _is_image(att: discord.Attachment) -> bool:
    return (att.content_type or "").lower().startswith("image/")


def _target(user: discord.abc.User, asker: discord.abc.User) -> Target:
    if user.id == asker.id:
        return Target(me=True)
    return Target(user_id=str(user.id), username=user.name)


class _Client(discord.Client):
    def __init__(self, adapter: DiscordAdapter, service: Service) -> None:
        intents = discord.Intents.none()
        intents.guilds = True
        intents.guild_messages = True
        intents.dm_messages = True
        intents.message_content = True  # privileged: enable it in the developer portal
        super().__init__(intents=intents, allowed_mentions=discord.AllowedMentions.none())
        self.adapter, self.service = adapter, service
        self.tree = app_commands.CommandTree(self)
        _add_commands(self.tree, adapter, service)

    async def setup_hook(self) -> None:
        cfg = self.adapter.config.discord
        if not cfg.gateway_url and cfg.api_base.rstrip("/") != DEFAULT_API_BASE:
            _, url, _ = await self.http.get_bot_gateway()  # a proxy: ask it where its gateway is
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(url)
        commands = await self.tree.sync()
        log.info("registered %d slash commands", len(commands))

    async def on_ready(self) -> None:
        log.info("connected to Discord as %s", self.user)
        self.adapter.ready.set()

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
        self._token = config.discord_token  # never logged
        self._client: _Client | None = None
        self.ready = asyncio.Event()  # set once connected (the gateway's READY and guilds)

    # --- receiving ---------------------------------------------------------------------------

    async def run(self, service: Service, stop: asyncio.Event) -> None:
        _point_at(self.config.discord)
        client = _Client(self, service)
        self._client = client
        async with client:
            runner = asyncio.create_task(client.start(self._token))
            stopper = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                await client.close()
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
            await service.say(origin, str(refusal))
            return
        if cmd is None and photo is not None:
            cmd = Selfie(origin=origin, photo=photo)  # a photo with a mention, in a server
        if cmd is None:
            if private and text:
                await service.say(origin, "Send me a selfie, or /help for what I can do.")
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
            raise Refusal(_too_big(limit))
        if not _is_image(att):
            raise Refusal(NOT_AN_IMAGE)
        return await att.read()

    async def on_selfie(self, service: Service, interaction: discord.Interaction,
                        photo: discord.Attachment, label: str | None) -> None:
        origin = self.origin_of(interaction)
        try:
            data = await self._read_photo(photo, int(origin.reply_to["filesize_limit"]))
        except Refusal as refusal:
            await service.say(origin, str(refusal))
            return
        await service.handle(Selfie(origin=origin, photo=data, label=label or "default"))

    # --- sending -------------------------------------------------------------------------------

    def _webhook(self, ref: dict[str, Any] | None) -> discord.Webhook | None:
        """The interaction's followup webhook while its token is still good, else None."""
        if not ref or self._client is None or time.time() >= float(ref.get("expires_at", 0)):
            return None
        return discord.Webhook.partial(int(ref["application_id"]), str(ref["token"]), client=self._client)

    def _files(self, reply: Reply) -> tuple[list[discord.File], str]:
        limit = min(int(reply.reply_to.get("filesize_limit") or self.upload_limit), self.upload_limit)
        files, notes = [], []
        for i, item in enumerate(reply.media):
            name = f"stylebot-{i + 1}{item.path.suffix}" if i else f"stylebot{item.path.suffix}"
            if not item.path.exists():
                notes.append(f"({name} is no longer available.)")
            elif item.path.stat().st_size > limit:
                notes.append(f"({name} is too large to upload here.)")
            else:
                files.append(discord.File(item.path, filename=name))
        extra = [m.caption for m in reply.media[1:] if m.caption]
        text = "\n".join([reply.text, *(f"+ {c}" for c in extra), *notes]).strip()
        return files, text[:_MAX_CONTENT]

    async def deliver(self, reply: Reply) -> dict[str, Any] | None:
        client = self._client
        if client is None:
            raise RuntimeError("the Discord adapter is not running")
        files, text = self._files(reply)
        content = text or None
        none = discord.AllowedMentions.none()
        channel_id = int(reply.reply_to["channel_id"])
        if reply.edit_of is not None:
            ref = reply.edit_of
            hook = self._webhook(ref.get("interaction"))
            kwargs: dict[str, Any] = {"content": content, "allowed_mentions": none}
            if files or reply.media:
                kwargs["attachments"] = files
            if hook is not None:
                await hook.edit_message(int(ref["message_id"]), **kwargs)
                return ref
            if ref.get("interaction") is None:
                partial = client.get_partial_messageable(int(ref["channel_id"]))
                await partial.get_partial_message(int(ref["message_id"])).edit(**kwargs)
                return ref
            # The followup's token ran out (a long job): say it in the channel instead.
        hook = self._webhook(reply.reply_to.get("interaction"))
        if hook is not None:
            sent = await hook.send(content=content or "", files=files, allowed_mentions=none, wait=True)
            return {"channel_id": str(sent.channel.id if sent.channel else channel_id),
                    "message_id": str(sent.id), "interaction": reply.reply_to["interaction"]}
        channel = client.get_partial_messageable(channel_id)
        extra: dict[str, Any] = {}
        if reply.reply_to.get("message_id"):  # answer the user's message (a quiet reply, no ping)
            extra["reference"] = discord.MessageReference(
                message_id=int(reply.reply_to["message_id"]), channel_id=channel_id,
                fail_if_not_exists=False)
        msg = await channel.send(content=content, files=files, allowed_mentions=none, **extra)
        return {"channel_id": str(msg.channel.id), "message_id": str(msg.id)}


def _add_commands(tree: app_commands.CommandTree[Any], adapter: DiscordAdapter, service: Service) -> None:
    """The slash commands: each defers at once, then hands a command to the service."""

    async def run(interaction: discord.Interaction, build: Any) -> None:
        await interaction.response.defer()
        origin = adapter.origin_of(interaction)
        try:
            await service.handle(build(origin))
        except Refusal as refusal:
            await service.say(origin, str(refusal))
        except Exception:
            log.exception("could not handle /%s", interaction.command.name if interaction.command else "?")
            await service.say(origin, OOPS)  # don't leave the user looking at "thinking..."

    def desc(name: str) -> str:
        return COMMANDS[name][:100]

    @tree.command(name="selfie", description=desc("selfie"))
    @app_commands.describe(photo="A clear photo of your face", label="A name for this face (optional)")
    async def selfie(interaction: discord.Interaction, photo: discord.Attachment,
                     label: str | None = None) -> None:
        await interaction.response.defer()
        try:
            await adapter.on_selfie(service, interaction, photo, label)
        except Exception:
            log.exception("could not handle /selfie")
            await service.say(adapter.origin_of(interaction), OOPS)

    @tree.command(name="morph", description=desc("morph"))
    @app_commands.describe(a="From this person", b="To this person", frames="How many frames",
                           format="mp4 or gif")
    async def morph(interaction: discord.Interaction, a: discord.User, b: discord.User,
                    frames: int = 32, format: Literal["mp4", "gif"] = "mp4") -> None:
        await run(interaction, lambda o: Morph(origin=o, a=_target(a, interaction.user),
                                               b=_target(b, interaction.user), frames=frames, fmt=format))

    @tree.command(name="edit", description=desc("edit"))
    @app_commands.describe(text="What to change, e.g. smiling face", strength="-10 to 10 (default 4)",
                           method="fast (default) or thorough: slower, stronger (like /edit!)")
    async def edit(interaction: discord.Interaction, text: str,
                   strength: app_commands.Range[float, -10, 10] | None = None,
                   method: Literal["fast", "thorough"] = "fast") -> None:
        how: Literal["global", "optimize"] = "optimize" if method == "thorough" else "global"
        await run(interaction, lambda o: Edit(origin=o, text=text, strength=strength, method=how))

    @tree.command(name="mix", description=desc("mix"))
    @app_commands.describe(a="Structure from this person", b="Styles from this person",
                           layers="Which styles to take from b")
    async def mix(interaction: discord.Interaction, a: discord.User, b: discord.User,
                  layers: Literal["coarse", "middle", "fine"] = "coarse") -> None:
        await run(interaction, lambda o: Mix(origin=o, a=_target(a, interaction.user),
                                             b=_target(b, interaction.user), layers=layers))

    @tree.command(name="me", description=desc("me"))
    async def me(interaction: discord.Interaction) -> None:
        await run(interaction, lambda o: ShowFaces(origin=o))

    @tree.command(name="privacy", description=desc("privacy"))
    @app_commands.describe(policy="Leave empty to see your current setting")
    async def privacy(interaction: discord.Interaction,
                      policy: Literal["everyone", "chat", "nobody"] | None = None) -> None:
        await run(interaction, lambda o: SetPrivacy(origin=o, policy=policy))

    @tree.command(name="forget", description=desc("forget"))
    @app_commands.describe(confirm="True to erase everything I keep about you")
    async def forget(interaction: discord.Interaction, confirm: bool = False) -> None:
        await run(interaction, lambda o: Forget(origin=o, confirmed=confirm))

    @tree.command(name="help", description=desc("help"))
    async def help_(interaction: discord.Interaction) -> None:
        await run(interaction, lambda o: Help(origin=o))
