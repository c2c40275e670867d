"""Discord: the service's replies out, as channel messages, interaction followups and their edits.

A slash command's answers go to its followup webhook while its token lasts (15 minutes), then to
the channel. A private answer (:attr:`bot.commands.Reply.private`) goes out ephemeral, only while
its command is being handled (:class:`LiveInteractions`): when the command was deferred in public
("stylebot is thinking..."), that message is deleted first, so nothing of it shows in the channel.

Discord's refusals come out as :mod:`bot.delivery` errors: 403 / 404 (missing access, unknown
channel, a user who accepts no DMs) never; 429 and 5xx (discord.py has already waited and retried
a few times) and network trouble later.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import discord

from bot.commands import Reply
from bot.delivery import DeliveryFailed, TryLater, Undeliverable

__all__ = ["DiscordSender", "LiveInteractions"]

log = logging.getLogger("stylebot.discord")

_MAX_CONTENT = 2000
_UNKNOWN_MESSAGE = 10008  # the message to edit is gone: a new one goes out instead


@dataclass
class _Live:
    interaction: discord.Interaction
    deferred_private: bool  # its "thinking..." message is ephemeral
    answered: bool = False  # ... and has been replaced by a first answer


class LiveInteractions:
    """Slash commands being handled now, by interaction token (for their private answers)."""

    def __init__(self) -> None:
        self._live: dict[str, _Live] = {}

    def add(self, interaction: discord.Interaction, *, deferred_private: bool) -> None:
        self._live[interaction.token] = _Live(interaction, deferred_private)

    def remove(self, interaction: discord.Interaction) -> None:
        self._live.pop(interaction.token, None)

    def get(self, token: str) -> _Live | None:
        return self._live.get(token)


def _outcome(exc: Exception) -> DeliveryFailed:
    if isinstance(exc, discord.RateLimited):
        wait = exc.retry_after
        return TryLater(f"discord: rate limited, retry after {wait:g} s", retry_after=wait)
    if isinstance(exc, discord.HTTPException):
        reason = f"discord: {exc.status} {exc.text or ''}".strip()
        if exc.status == 429 or exc.status >= 500:
            return TryLater(reason)
        return Undeliverable(reason)  # sent again, the same request gets the same answer
    return TryLater(f"discord: {type(exc).__name__}")


class DiscordSender:
    """``deliver`` for the Discord adapter (``client`` is set while it is connected)."""

    def __init__(self, *, upload_limit: int, live: LiveInteractions) -> None:
        self.client: discord.Client | None = None
        self.upload_limit = upload_limit
        self.live = live

    async def deliver(self, reply: Reply) -> dict[str, Any] | None:
        if self.client is None:
            raise TryLater("discord: not connected")
        try:
            if reply.private and reply.reply_to.get("interaction"):
                return await self._private(reply)
            return await self._deliver(self.client, reply)
        except (TimeoutError, discord.HTTPException, aiohttp.ClientError) as exc:
            raise _outcome(exc) from None

    def _webhook(self, ref: dict[str, Any] | None) -> discord.Webhook | None:
        """The interaction's followup webhook while its token is still good, else None."""
        if not ref or self.client is None or time.time() >= float(ref.get("expires_at", 0)):
            return None
        return discord.Webhook.partial(int(ref["application_id"]), str(ref["token"]), client=self.client)

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

    async def _private(self, reply: Reply) -> dict[str, Any] | None:
        """An ephemeral followup of the command being handled; never a public message."""
        live = self.live.get(str(reply.reply_to["interaction"]["token"]))
        if live is None:
            log.warning("discord: a private answer came after its command; not sent")
            return None
        files, text = self._files(reply)
        interaction = live.interaction
        if not live.answered and not live.deferred_private:
            await interaction.delete_original_response()  # the public "thinking..." goes away
        live.answered = True
        sent = await interaction.followup.send(content=text or "…", files=files, ephemeral=True,
                                               allowed_mentions=discord.AllowedMentions.none(), wait=True)
        return {"channel_id": str(interaction.channel_id), "message_id": str(sent.id)}

    async def _deliver(self, client: discord.Client, reply: Reply) -> dict[str, Any] | None:
        files, text = self._files(reply)
        content = text or None
        none = discord.AllowedMentions.none()
        channel_id = int(reply.reply_to["channel_id"])
        view = _buttons(reply)
        if reply.edit_of is not None:
            try:
                edited = await self._edit(client, reply.edit_of, content, files, bool(reply.media), view)
            except discord.NotFound as exc:
                if exc.code != _UNKNOWN_MESSAGE:
                    raise
                edited = None  # deleted by someone: say it anew
            if edited is not None or reply.edit_only:
                return edited
        interaction = reply.reply_to.get("interaction")
        hook = self._webhook(interaction)
        if hook is not None:
            live = self.live.get(str(interaction["token"])) if interaction else None
            if live is not None:
                live.answered = True
            sent = await hook.send(content=content or "", files=files, allowed_mentions=none, wait=True,
                                   **view)
            return {"channel_id": str(sent.channel.id if sent.channel else channel_id),
                    "message_id": str(sent.id), "interaction": interaction}
        channel = client.get_partial_messageable(channel_id)
        extra: dict[str, Any] = {}
        if reply.reply_to.get("message_id"):  # answer the user's message (a quiet reply, no ping)
            extra["reference"] = discord.MessageReference(
                message_id=int(reply.reply_to["message_id"]), channel_id=channel_id,
                fail_if_not_exists=False)
        msg = await channel.send(content=content, files=files, allowed_mentions=none, **extra, **view)
        return {"channel_id": str(msg.channel.id), "message_id": str(msg.id)}

    async def _edit(self, client: discord.Client, ref: dict[str, Any], content: str | None,
                    files: list[discord.File], with_media: bool,
                    view: dict[str, Any]) -> dict[str, Any] | None:
        """Edit a message the bot sent; None when it can no longer (the followup token ran out)."""
        kwargs: dict[str, Any] = {"content": content, "allowed_mentions": discord.AllowedMentions.none(),
                                  **view}
        if files or with_media:
            kwargs["attachments"] = files
        hook = self._webhook(ref.get("interaction"))
        if hook is not None:
            await hook.edit_message(int(ref["message_id"]), **kwargs)
            return ref
        if ref.get("interaction") is None:
            partial = client.get_partial_messageable(int(ref["channel_id"]))
            await partial.get_partial_message(int(ref["message_id"])).edit(**kwargs)
            return ref
        return None


class _Buttons(discord.ui.View):
    """Buttons to show, not to listen to: presses come to the adapter's ``on_interaction`` by
    custom id (they must work after a restart), so discord.py need not keep every view it sent."""

    def is_dispatchable(self) -> bool:
        return False


def _buttons(reply: Reply) -> dict[str, Any]:
    """``view=`` for a message with the reply's buttons; nothing when it has none."""
    if not reply.buttons:
        return {}
    view = _Buttons(timeout=None)
    for i, row in enumerate(reply.buttons):
        for b in row:
            view.add_item(discord.ui.Button(label=b.label, custom_id=b.data, row=i,
                                            style=discord.ButtonStyle.secondary))
    return {"view": view}
