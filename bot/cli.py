"""The bot's command: `stylebot run` (service, chat adapters, and the engine as a child process)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from settings import Config

__all__ = ["add_commands", "run"]


def add_commands(sub: Any) -> None:
    """The bot's subcommands, on the entry point's subparsers."""
    p = sub.add_parser("run", help="the bot: service, engine process and chat adapters")
    p.add_argument("--config", default=None, help="config file (default: built-in defaults)")


def run(args: argparse.Namespace, config: Config, *, banner: str | None,
        engine: Sequence[str]) -> int:
    """Serve until SIGINT/SIGTERM. ``banner``: the web chat's note on the model; ``engine``: the
    command that starts the engine process when ``[engine] embedded``."""
    import asyncio

    from bot.adapters import configured_adapters
    from bot.app import run as run_bot

    adapters = configured_adapters(config, banner=banner)
    return asyncio.run(run_bot(config, engine=engine, adapters=adapters))
