"""The bot process stays small: bot/ and storage/ never pull in torch or the engine (one stdlib-only
exception: `stylebot run` asks engine.weights whether the FFHQ generator is cached, for the web
chat's banner)."""

from __future__ import annotations

import json
import os
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


def test_the_demo_banner_asks_the_weights_cache_without_torch(tmp_path: Path) -> None:
    """The web chat's demo banner needs to know whether the FFHQ generator is cached: `stylebot run`
    asks ``engine.weights``, which is standard library only, so the bot process still has no torch."""
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from bot.config import Config, EngineConfig\n"
        "from bot.cli import demo_banner\n"
        f"banner = demo_banner(Config(data_dir=Path({str(tmp_path)!r}), engine=EngineConfig(model='auto')))\n"
        "print(json.dumps([banner is not None,"
        " sorted(m for m in sys.modules if m == 'torch' or m.startswith('engine'))]))"
    )
    env = {**os.environ, "STYLEBOT_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    shown, engine_modules = json.loads(out.stdout)
    assert shown  # nothing cached in this home: "auto" is the demo model
    assert engine_modules == ["engine", "engine.errors", "engine.progress", "engine.weights"]
