"""The chat platforms: each adapter turns its platform's updates into commands for the service and
sends the service's replies back. Only the adapters know a platform's API."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from bot.commands import Reply
    from bot.service import Service
    from settings import Config

__all__ = ["Adapter", "configured_adapters"]


class Adapter(Protocol):
    """A chat platform: feeds commands to the service, sends the service's replies.

    Every ``reply_to`` an adapter puts in an Origin carries ``"platform": adapter.platform``,
    so replies find their way back to the adapter that took the command."""

    platform: str

    async def run(self, service: Service, stop: asyncio.Event) -> None:
        """Receive updates until ``stop`` is set."""

    async def deliver(self, reply: Reply) -> dict[str, Any] | None:
        """Send (or edit, with ``reply.edit_of``) a message; return a reference to it."""


def configured_adapters(config: Config, *, banner: str | None = None) -> list[Adapter]:
    """The chat platforms whose tokens are configured, and the local web chat when it is enabled
    (by default when no token is set, showing ``banner``); each is imported only when used."""
    adapters: list[Adapter] = []
    if config.telegram_enabled:
        from bot.adapters.telegram import TelegramAdapter

        adapters.append(TelegramAdapter(config))
    if config.discord_enabled:
        from bot.adapters.discord import DiscordAdapter

        adapters.append(DiscordAdapter(config))
    if config.web_enabled:
        from bot.adapters.web import WebAdapter

        adapters.append(WebAdapter(config, banner=banner))
    return adapters
