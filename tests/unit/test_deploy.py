"""The deployment files in deploy/ run commands the CLI accepts."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from cli import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _commands() -> list[str]:
    lines = [line.split(":", 1)[1] for line in (DEPLOY / "Procfile").read_text().splitlines()
             if line and not line.startswith("#")]
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        lines += [line.split("=", 1)[1].replace("%i", "0") for line in unit.read_text().splitlines()
                  if line.startswith("ExecStart=")]
    return lines


@pytest.mark.parametrize("command", _commands())
def test_every_deployed_command_parses(command: str) -> None:
    argv = shlex.split(command)
    assert Path(argv[0]).name == "stylebot"
    args = build_parser().parse_args(argv[1:])
    assert args.command in ("run", "engine")
    assert args.config  # every process reads the shared config file


def test_there_is_a_bot_and_an_engine_per_gpu() -> None:
    commands = [shlex.split(c)[1:] for c in _commands()]
    engines = [c for c in commands if c[0] == "engine"]
    assert any(c[0] == "run" for c in commands)
    assert {"cuda:0", "cuda:1"} <= {c[c.index("--device") + 1] for c in engines}
