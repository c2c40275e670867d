"""Discord slash commands and button presses: their definitions, each handed to the service, and
the commands' registration.

Every command is deferred at once (Discord wants an answer within 3 s). Personal ones (``/me``,
``/privacy``, ``/forget``) are deferred ephemeral: only the asker sees them; the others are the
group's (a refusal of one still reaches only the asker, see :mod:`bot.adapters.discord_send`).
A button press is acknowledged without changing its message and handled by its custom id (so
buttons still work after a restart); a refusal is an ephemeral followup only the presser sees.

Registering commands is rate-limited by Discord, so it happens only when their definition changed:
a hash of what would be sent is kept per application in ``<data_dir>/discord-commands.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, Protocol

import discord
from discord import app_commands

from bot import commands
from bot.adapters.discord_send import LiveInteractions
from bot.commands import (
    Command,
    Edit,
    Forget,
    Help,
    Lineup,
    Mix,
    Morph,
    Origin,
    SetPrivacy,
    ShowFaces,
    Target,
)
from bot.parse import COMMANDS
from bot.replies import OOPS
from bot.service import Service
from storage.specs import MORPH_FRAMES

__all__ = ["add_commands", "handle_press", "sync_if_changed"]

log = logging.getLogger("stylebot.discord")


def _target(user: discord.abc.User, asker: discord.abc.User) -> Target:
    if user.id == asker.id:
        return Target(me=True)
    return Target(user_id=str(user.id), username=user.name)


class SlashHost(Protocol):
    """What the slash commands need of the Discord adapter."""

    live: LiveInteractions

    def origin_of(self, interaction: discord.Interaction) -> Origin: ...

    async def on_selfie(self, service: Service, origin: Origin, photo: discord.Attachment,
                        label: str | None) -> None: ...


async def _handling(adapter: SlashHost, service: Service, interaction: discord.Interaction,
                    work: Callable[[Origin], Awaitable[None]], *, personal: bool = False) -> None:
    """Defer at once (a press: no visible change), then ``work``; a failure gets a friendly line."""
    await interaction.response.defer(ephemeral=personal)
    adapter.live.add(interaction, deferred_private=personal)
    origin = adapter.origin_of(interaction)
    try:
        await work(origin)
    except Exception:
        log.exception("could not handle /%s", interaction.command.name if interaction.command else "a press")
        await service.say(origin, OOPS, private=True)  # don't leave the user looking at "thinking..."
    finally:
        adapter.live.remove(interaction)


async def handle_press(adapter: SlashHost, service: Service, interaction: discord.Interaction) -> None:
    """A button under one of our messages (``interaction`` of the component type)."""
    payload: dict[str, Any] = dict(interaction.data or {})
    data = str(payload.get("custom_id", ""))

    async def press(origin: Origin) -> None:
        await service.handle(commands.Press(origin=origin, data=data))

    await _handling(adapter, service, interaction, press, personal=True)


def add_commands(tree: app_commands.CommandTree[Any], adapter: SlashHost, service: Service) -> None:
    """The slash commands: each defers at once, then hands a command to the service."""

    async def handling(interaction: discord.Interaction, work: Callable[[Origin], Awaitable[None]], *,
                       personal: bool = False) -> None:
        await _handling(adapter, service, interaction, work, personal=personal)

    async def run(interaction: discord.Interaction, build: Callable[[Origin], Command], *,
                  personal: bool = False) -> None:
        await handling(interaction, lambda origin: service.handle(build(origin)), personal=personal)

    def desc(name: str) -> str:
        return COMMANDS[name][:100]

    @tree.command(name="selfie", description=desc("selfie"))
    @app_commands.describe(photo="A clear photo of your face", label="A name for this face (optional)")
    async def selfie(interaction: discord.Interaction, photo: discord.Attachment,
                     label: str | None = None) -> None:
        await handling(interaction, lambda origin: adapter.on_selfie(service, origin, photo, label))

    @tree.command(name="morph", description=desc("morph"))
    @app_commands.describe(a="From this person", b="To this person", frames="How many frames",
                           format="mp4 or gif", c="Then to this person (a group tour)", d="Then",
                           e="Then", f="Then", g="Then", h="Then, and back to the first")
    async def morph(interaction: discord.Interaction, a: discord.User, b: discord.User,
                    frames: int = MORPH_FRAMES, format: Literal["mp4", "gif"] = "mp4",
                    c: discord.User | None = None, d: discord.User | None = None,
                    e: discord.User | None = None, f: discord.User | None = None,
                    g: discord.User | None = None, h: discord.User | None = None) -> None:
        more = tuple(_target(u, interaction.user) for u in (c, d, e, f, g, h) if u is not None)
        await run(interaction, lambda o: Morph(origin=o, a=_target(a, interaction.user),
                                               b=_target(b, interaction.user), frames=frames, fmt=format,
                                               more=more))

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

    @tree.command(name="lineup", description=desc("lineup"))
    @app_commands.describe(text="What to change, e.g. smiling face", strength="-10 to 10 (default 4)")
    async def lineup(interaction: discord.Interaction, text: str,
                     strength: app_commands.Range[float, -10, 10] | None = None) -> None:
        await run(interaction, lambda o: Lineup(origin=o, text=text, strength=strength))

    @tree.command(name="me", description=desc("me"))
    async def me(interaction: discord.Interaction) -> None:
        await run(interaction, lambda o: ShowFaces(origin=o), personal=True)

    @tree.command(name="privacy", description=desc("privacy"))
    @app_commands.describe(policy="Leave empty to see your current setting")
    async def privacy(interaction: discord.Interaction,
                      policy: Literal["everyone", "chat", "ask", "nobody"] | None = None) -> None:
        await run(interaction, lambda o: SetPrivacy(origin=o, policy=policy), personal=True)

    @tree.command(name="forget", description=desc("forget"))
    @app_commands.describe(confirm="True to erase everything I keep about you")
    async def forget(interaction: discord.Interaction, confirm: bool = False) -> None:
        await run(interaction, lambda o: Forget(origin=o, confirmed=confirm), personal=True)

    @tree.context_menu(name="Morph with me")
    async def morph_with_me(interaction: discord.Interaction, user: discord.User) -> None:
        """Right-click someone (or long-press) in the server: a morph of you and them."""
        await run(interaction, lambda o: Morph(origin=o, a=Target(me=True),
                                               b=_target(user, interaction.user)))

    @tree.command(name="help", description=desc("help"))
    async def help_(interaction: discord.Interaction) -> None:
        await run(interaction, lambda o: Help(origin=o))


def _definition_hash(tree: app_commands.CommandTree[Any]) -> str:
    payload = [command.to_dict(tree) for command in tree.get_commands()]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _read_stamps(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or unreadable: register again
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write_stamps(path: Path, stamps: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(stamps, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


async def sync_if_changed(tree: app_commands.CommandTree[Any], *, application_id: int, stamp: Path) -> bool:
    """Register the commands with Discord unless these very definitions were registered for this
    application before; True when they were sent."""
    digest, key = _definition_hash(tree), str(application_id)
    stamps = _read_stamps(stamp)
    if stamps.get(key) == digest:
        log.info("slash commands unchanged since they were registered; not registering again")
        return False
    commands = await tree.sync()
    stamps[key] = digest
    with contextlib.suppress(OSError):  # unwritten, they are only registered again next time
        _write_stamps(stamp, stamps)
    log.info("registered %d slash commands", len(commands))
    return True
