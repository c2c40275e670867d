"""The packages' import rules (README "Processes"): bot/, storage/ and settings/ never pull in torch
or the engine; engine/ never imports bot/; cli/ parses without torch."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

from import_graph import circles, module_edges, package_edges

import bot
import cli
import settings
import storage

REPO = Path(__file__).resolve().parents[2]


def _modules(package: object) -> list[str]:
    path = [str(Path(package.__file__).parent)]  # type: ignore[attr-defined]
    prefix = package.__name__ + "."  # type: ignore[attr-defined]
    return [package.__name__] + [  # type: ignore[attr-defined]
        m.name for m in pkgutil.walk_packages(path, prefix)
        if not m.name.startswith("storage.migrations") and not m.name.endswith("__main__")]


def _imported_after(names: list[str], packages: tuple[str, ...]) -> list[str]:
    """The modules of ``packages`` (top-level names) that importing ``names`` brings in."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {packages!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return list(json.loads(out.stdout))


def test_bot_storage_and_settings_import_without_torch_or_engine() -> None:
    names = _modules(bot) + _modules(storage) + _modules(settings)
    assert "bot.service" in names and "storage.repo" in names and "bot.app" in names
    assert "bot.adapters.web" in names and "settings.load" in names
    assert _imported_after(names, ("torch", "engine", "cli")) == []


def test_the_engine_never_imports_the_bot() -> None:
    engine_dir = REPO / "engine"
    names = [f"engine.{p.stem}" for p in sorted(engine_dir.glob("*.py")) if p.stem != "__init__"]
    assert "engine.worker" in names and "engine.commands" in names
    assert _imported_after(names, ("bot", "cli")) == []


def test_the_entry_point_parses_without_torch() -> None:
    names = _modules(cli)
    imported = _imported_after([*names, "engine.cli"], ("torch", "engine"))
    assert "cli" in names and "engine.cli" in imported
    assert set(imported) <= {"engine", "engine.cli"}  # the engine's parsers only: no torch


def test_the_demo_banner_asks_the_weights_cache_without_torch(tmp_path: Path) -> None:
    """The web chat's demo banner needs to know whether the FFHQ generator is cached: `stylebot run`
    asks ``engine.weights``, which is standard library only, so the bot process still has no torch."""
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from settings import Config, EngineConfig\n"
        "from engine.cli import demo_banner\n"
        f"banner = demo_banner(Config(data_dir=Path({str(tmp_path)!r}), engine=EngineConfig(model='auto')))\n"
        "print(json.dumps([banner is not None,"
        " sorted(m for m in sys.modules if m == 'torch' or m.startswith('engine'))]))"
    )
    env = {**os.environ, "STYLEBOT_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    shown, engine_modules = json.loads(out.stdout)
    assert shown  # nothing cached in this home: "auto" is the demo model
    assert engine_modules == ["engine", "engine.cli", "engine.errors", "engine.progress", "engine.weights"]


# Which package may import which (README "Processes"): nothing else, and no module-level circle.
ALLOWED = {("cli", "bot"), ("cli", "engine"), ("cli", "settings"), ("cli", "storage"),
           ("bot", "storage"), ("bot", "settings"), ("engine", "storage"), ("engine", "settings"),
           ("storage", "settings"), ("bench", "engine"), ("bench", "storage"), ("bench", "settings")}


def test_packages_import_only_what_the_readme_draws() -> None:
    assert set(package_edges(REPO)) <= ALLOWED


def test_no_module_imports_itself_in_a_circle() -> None:
    assert circles(module_edges(REPO)) == []
