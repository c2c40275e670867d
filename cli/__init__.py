"""The one ``stylebot`` entry point: each package adds its own commands (:mod:`bot.cli`,
:mod:`engine.cli`); this is the only module that knows both. Parsing imports no torch: the
engine's work is imported once an engine command runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bot import cli as bot_cli
from engine import cli as engine_cli
from settings import Config, ConfigError, load_config

__all__ = ["build_parser", "engine_argv", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stylebot", description="Face editing with StyleGAN2: align, invert, render, morph, edit.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bot_cli.add_commands(sub)
    engine_cli.add_commands(sub)
    return parser


def engine_argv(config_path: Path | None) -> list[str]:
    """The engine process `stylebot run` starts: `stylebot engine` with the same config."""
    cmd = [sys.executable, "-m", "cli", "engine"]
    if config_path is not None:
        cmd += ["--config", str(config_path)]
    return cmd


def _process_config(config_path: Path | None) -> Config:
    """`run` and `engine`: the config, logging set up, users' data where this version keeps it."""
    import logging

    config = load_config(config_path)
    # Our own loggers follow [bot] log_level; libraries stop at INFO: their DEBUG lines carry chat
    # messages, SQL parameters (names, face geometry) and request URLs with tokens in them.
    level = logging.getLevelNamesMapping()[config.bot.log_level]
    logging.basicConfig(level=max(level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("stylebot").setLevel(level)
    if config.old_data_dir is not None:  # before anything opens the database
        from storage.data_dir import move_old_data

        move_old_data(config.old_data_dir, config.data_dir)
    return config


def _dispatch(args: argparse.Namespace) -> int:
    if args.command not in ("run", "engine"):
        return engine_cli.dispatch(args)
    config_path = Path(args.config) if args.config else None
    config = _process_config(config_path)
    if args.command == "engine":
        return engine_cli.serve(args, config)
    return bot_cli.run(args, config, banner=engine_cli.demo_banner(config),
                       engine=engine_argv(config_path) if config.engine.embedded else ())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("stylebot: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # user mistakes: one line, no traceback
        from engine.errors import EngineError
        from storage.queue import QueueUnavailable

        if isinstance(exc, EngineError | ConfigError):
            print(f"stylebot: error: {exc.message}", file=sys.stderr)
            return 2
        if isinstance(exc, QueueUnavailable):
            print(f"stylebot: error: {exc.message}", file=sys.stderr)
            return 1
        if isinstance(exc, OSError) and exc.filename is not None:
            print(f"stylebot: error: {exc.strerror}: {exc.filename}", file=sys.stderr)
            return 2
        raise


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
