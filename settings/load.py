"""Loading: the defaults, overlaid by a TOML file, then by the environment; one-line errors.

Every key can also be set as ``STYLEBOT_<SECTION>__<KEY>`` (``STYLEBOT_STORAGE__URL``,
``STYLEBOT_QUEUE__REDIS_URL``, ...): the value is read as a TOML value when it is one (``8``,
``true``, ``"text"``), else as a plain string. The environment wins over the file. Tokens keep
their documented names: ``TELEGRAM_BOT_TOKEN``, ``DISCORD_BOT_TOKEN``, ``STYLEBOT_WEB_TOKEN``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import SecretStr, ValidationError

from settings.schema import SECTIONS, BotConfig, Config, ConfigError, Section, mask_url

__all__ = ["ENV_PREFIX", "default_home", "load_config"]

ENV_PREFIX = "STYLEBOT_"
_TOKENS = (("telegram", "TELEGRAM_BOT_TOKEN"), ("discord", "DISCORD_BOT_TOKEN"))


def default_home(env: Mapping[str, str] | None = None) -> Path:
    """``$STYLEBOT_HOME`` if set, else ``~/.cache/stylebot`` (absolute): the cache dir.

    The one place that reads ``STYLEBOT_HOME``; weights, tables and the data dir derive from it."""
    env = os.environ if env is None else env
    raw = env.get("STYLEBOT_HOME", "").strip()
    home = _expand(raw, env) if raw else _expand("~", env) / ".cache" / "stylebot"
    return home.resolve()


def _default_data_dirs(env: Mapping[str, str]) -> tuple[Path, Path | None]:
    """The data dir when ``[bot] data_dir`` is empty, and the one earlier versions used instead."""
    if env.get("STYLEBOT_HOME", "").strip():
        return default_home(env) / "data", None
    data = Path(platformdirs.user_data_dir("stylebot", appauthor=False)).resolve()
    return data, default_home(env) / "data"


def _expand(raw: str, env: Mapping[str, str]) -> Path:
    if raw == "~" or raw.startswith("~/"):
        home = env.get("HOME") or str(Path.home())
        return Path(home + raw[1:])
    return Path(raw).expanduser()


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file is a directory: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _env_value(text: str) -> Any:
    """``8`` -> 8, ``true`` -> True, ``"a b"`` -> "a b"; anything else is the string itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _from_env(env: Mapping[str, str]) -> dict[tuple[str, str], tuple[Any, str]]:
    """(section, key) -> (value, variable) for every ``STYLEBOT_<SECTION>__<KEY>`` set; a string
    key takes the text as it is (a token of digits stays a string)."""
    found = {}
    for var, text in env.items():
        section, sep, key = var.removeprefix(ENV_PREFIX).lower().partition("__")
        if not (var.startswith(ENV_PREFIX) and sep):
            continue
        field = SECTIONS[section].model_fields.get(key) if section in SECTIONS else None
        textual = field is not None and field.annotation in (str, SecretStr)
        found[(section, key)] = (text.strip() if textual else _env_value(text.strip()), f"${var}")
    return found


def _section(src: dict[str, str], name: str, cls: type[Section], raw: Any) -> Section:
    """Validate one table; ``src`` says where each key came from (the file, or a variable)."""
    where = src.get("", "config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: [{name}] must be a table of keys, got {raw!r}")
    for key in raw:
        if key not in cls.model_fields:
            raise ConfigError(f"{src.get(key, where)}: unknown key [{name}] {key} "
                              f"(known: {', '.join(cls.model_fields)})")
    try:
        return cls(**raw)
    except ValidationError as exc:
        key = str(exc.errors()[0]["loc"][0])
    field = cls.model_fields[key]
    secret = field.annotation is SecretStr
    shown = "(hidden)" if secret else mask_url(repr(raw[key]))
    raise ConfigError(f"{src.get(key, where)}: [{name}] {key} must be {field.description}, got {shown}")


def _sections(path: Path | None, env: Mapping[str, str]) -> dict[str, Section]:
    where = str(path) if path is not None else "config"
    data = _read(path) if path is not None else {}
    for name in data:
        if name not in SECTIONS:
            raise ConfigError(f"{where}: unknown section [{name}] (known: {', '.join(SECTIONS)})")
    overrides = _from_env(env)
    for (name, _), (_, var) in overrides.items():
        if name not in SECTIONS:
            raise ConfigError(f"{var}: unknown section [{name}] (known: {', '.join(SECTIONS)})")
    sections = {}
    for name, cls in SECTIONS.items():
        raw = data.get(name, {})
        src = {"": where}
        if isinstance(raw, dict):
            mine = {key: item for (section, key), item in overrides.items() if section == name}
            raw = {**raw, **{key: value for key, (value, _) in mine.items()}}
            src |= {key: var for key, (_, var) in mine.items()}
        sections[name] = _section(src, name, cls, raw)
    return sections


def _secret(section: Section, key: str) -> str:
    value: SecretStr = getattr(section, key)
    return value.get_secret_value()


def load_config(path: Path | None = None, *, env: Mapping[str, str] | None = None) -> Config:
    """The defaults, overridden by the keys ``path`` sets, then by ``env`` (os.environ).

    ``path=None`` means built-in defaults only. Raises :class:`ConfigError` (one line) for a missing
    or unreadable file, invalid TOML (with its line), an unknown section or key, a wrong type or
    value, a platform enabled without its token, or a non-loopback web host without an access token.
    """
    env = os.environ if env is None else env
    where = str(path) if path is not None else "config"
    sections = _sections(path, env)
    bot = sections["bot"]
    assert isinstance(bot, BotConfig)
    old_data_dir = None
    if bot.data_dir:
        base = path.resolve().parent if path is not None else Path.cwd()
        data_dir = (base / _expand(bot.data_dir, env)).resolve()
    else:
        data_dir, old_data_dir = _default_data_dirs(env)
    web_token = env.get("STYLEBOT_WEB_TOKEN", "").strip()
    config = Config.model_validate({
        **sections,
        "data_dir": data_dir,
        "old_data_dir": old_data_dir,
        "telegram_token": SecretStr(env.get("TELEGRAM_BOT_TOKEN", "").strip()),
        "discord_token": SecretStr(env.get("DISCORD_BOT_TOKEN", "").strip()),
        "web_token": SecretStr(web_token or _secret(sections["web"], "access_token").strip()),
    })
    for name, var in _TOKENS:
        token: SecretStr = getattr(config, f"{name}_token")
        if getattr(config, name).enabled is True and not token.get_secret_value():
            raise ConfigError(f"{where}: [{name}] enabled is true but {var} is not set in the environment")
    try:
        config.check_web_bind()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None
    return config
