"""`python -m bot` is the `stylebot` command."""

from bot.cli import run

run()
