"""The bot process stays small: bot/ and storage/ never pull in torch or the engine."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import bot
import storage

# The CLI's engine commands are the one place in bot/ allowed to import the engine (lazily).
ENGINE_SIDE = {"bot.cli_engine", "bot.cli_edit", "bot.__main__"}


def _modules(package: object) -> list[str]:
    path = [str(Path(package.__file__).parent)]  # type: ignore[attr-defined]
    prefix = package.__name__ + "."  # type: ignore[attr-defined]
    return [m.name for m in pkgutil.walk_packages(path, prefix)
            if m.name not in ENGINE_SIDE and not m.name.startswith("storage.migrations")]


def test_bot_and_storage_import_without_torch_or_engine() -> None:
    names = _modules(bot) + _modules(storage)
    assert "bot.service" in names and "storage.repo" in names and "bot.app" in names
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('engine'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
