"""Configuration: built-in defaults, a TOML file that overrides some keys, secrets from the environment.

The defaults live in the dataclasses below (one source of truth); the shipped ``config.toml`` documents
them and a test asserts it matches them key for key. :func:`load_config` overlays a user file on the
defaults, validates every value and raises :class:`ConfigError` with one line naming the key.

Secrets never come from the shipped file and never appear in ``repr()``/``str()``:
``TELEGRAM_BOT_TOKEN``, ``DISCORD_BOT_TOKEN`` and ``STYLEBOT_WEB_TOKEN`` (which wins over
``[web] access_token``) are read from the environment.

Paths: users' data (database, media) lives in ``[bot] data_dir``, by default the platform's data dir
(``~/.local/share/stylebot``, from platformdirs), or ``$STYLEBOT_HOME/data`` when ``STYLEBOT_HOME`` is
set; downloads (weights, direction tables) stay in the cache dir (``$STYLEBOT_HOME``, default
``~/.cache/stylebot``). A relative ``data_dir`` is taken from the config file's directory; a relative
``media_dir`` is under ``data_dir``. Resolved paths are absolute. ``Config.old_data_dir`` is where
earlier versions kept the default data dir (``~/.cache/stylebot/data``): :mod:`bot.data_dir` moves it.

All checks run in :func:`load_config`, including the ones that depend on the environment (a platform
set to ``enabled = true`` without its token; a non-loopback web host without an access token, see
:meth:`Config.check_web_bind`), so a bad setup fails at start-up with one line.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

import platformdirs

__all__ = [
    "AutoBool",
    "BotConfig",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "DiscordConfig",
    "EngineConfig",
    "LimitsConfig",
    "QueueConfig",
    "REDIS_URL_PATTERN",
    "StorageConfig",
    "TelegramConfig",
    "TimeoutsConfig",
    "WebConfig",
    "default_home",
    "is_loopback",
    "load_config",
]

AutoBool = bool | Literal["auto"]
T = TypeVar("T")


class ConfigError(Exception):
    """A configuration mistake; ``message`` is one line naming the file and key."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- value rules ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """What a key accepts: ``desc`` completes "must be ...", ``check`` returns the normalised value
    or raises ``ValueError`` when the value is not acceptable."""

    desc: str
    check: Callable[[Any], Any]


def _key(default: T, rule: _Rule, *, secret: bool = False) -> T:
    """A dataclass field with its default and the rule :func:`load_config` validates it with."""
    result: T = field(default=default, repr=not secret, metadata={"rule": rule})
    return result


def _int(minimum: int, maximum: int | None = None) -> _Rule:
    desc = f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"

    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError
        if maximum is not None and v > maximum:
            raise ValueError
        return v

    return _Rule(desc, check)


def _bool() -> _Rule:
    def check(v: Any) -> bool:
        if not isinstance(v, bool):
            raise ValueError
        return v

    return _Rule("true or false", check)


def _auto_bool() -> _Rule:
    def check(v: Any) -> AutoBool:
        if isinstance(v, bool) or v == "auto":
            return v
        raise ValueError

    return _Rule('true, false or "auto"', check)


def _str(desc: str = "a string", pattern: str | None = None, *, empty: bool = True) -> _Rule:
    regex = re.compile(pattern) if pattern else None

    def check(v: Any) -> str:
        if not isinstance(v, str) or (not v and not empty):
            raise ValueError
        if v and regex and not regex.fullmatch(v):
            raise ValueError
        return v

    return _Rule(desc, check)


def _choice(*values: str) -> _Rule:
    def check(v: Any) -> str:
        if v not in values:
            raise ValueError
        return str(v)

    return _Rule("one of " + ", ".join(f'"{x}"' for x in values), check)


def _log_level() -> _Rule:
    names = sorted(n for n in logging.getLevelNamesMapping() if n not in ("WARN", "FATAL"))

    def check(v: Any) -> str:
        if not isinstance(v, str) or v.upper() not in logging.getLevelNamesMapping():
            raise ValueError
        return v.upper()

    return _Rule("a logging level name (" + ", ".join(names) + ")", check)


_USERINFO_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@/\s]*@")


def _mask_url(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host`` (for repr and error lines)."""
    return _USERINFO_PASSWORD.sub(r"\1***@", text)


def _masked_repr(self: Any) -> str:
    """A dataclass repr that hides passwords inside URLs (database and Redis URLs may carry one)."""
    parts = ", ".join(f"{f.name}={_mask_url(repr(getattr(self, f.name)))}" for f in fields(self) if f.repr)
    return f"{type(self).__name__}({parts})"


_HTTP = r"https?://\S+"
_WS = r"wss?://\S+"
_DB_URL = r"[A-Za-z][A-Za-z0-9+_-]*://\S*"
REDIS_URL_PATTERN = r"(rediss?|unix)://\S+"
_DEVICE = r"auto|cpu|cuda(:\d+)?"


# --- sections (the defaults: config.toml must match these) ---------------------------------------


@dataclass(frozen=True, kw_only=True)
class BotConfig:
    name: str = _key("stylebot", _str("a non-empty string", empty=False))
    data_dir: str = _key("", _str('a directory path or "" (the data dir: ~/.local/share/stylebot)'))
    log_level: str = _key("INFO", _log_level())


@dataclass(frozen=True, kw_only=True)
class TelegramConfig:
    enabled: AutoBool = _key("auto", _auto_bool())
    base_url: str = _key("https://api.telegram.org/bot", _str("an http(s) URL", _HTTP, empty=False))
    base_file_url: str = _key("https://api.telegram.org/file/bot",
                              _str("an http(s) URL", _HTTP, empty=False))
    max_photo_mb: int = _key(10, _int(1))
    max_download_mb: int = _key(20, _int(1))


@dataclass(frozen=True, kw_only=True)
class DiscordConfig:
    enabled: AutoBool = _key("auto", _auto_bool())
    api_base: str = _key("https://discord.com/api/v10", _str("an http(s) URL", _HTTP, empty=False))
    gateway_url: str = _key("", _str('a ws(s) URL or "" (ask the API)', _WS))
    max_upload_mb: int = _key(10, _int(1))
    message_content: bool = _key(False, _bool())


@dataclass(frozen=True, kw_only=True)
class WebConfig:
    enabled: AutoBool = _key("auto", _auto_bool())
    host: str = _key("127.0.0.1", _str("a host name or IP address", r"\S+", empty=False))
    port: int = _key(8080, _int(1, 65535))
    access_token: str = _key("", _str(), secret=True)
    max_upload_mb: int = _key(10, _int(1))


@dataclass(frozen=True, kw_only=True)
class DeliveryConfig:
    """Replies a platform cannot take now (rate limits, outages) are tried again per chat."""

    attempts: int = _key(10, _int(1))
    first_retry_s: int = _key(2, _int(1))
    max_retry_s: int = _key(600, _int(1))


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    url: str = _key("", _str('a database URL (dialect+driver://...) or "" (SQLite under data_dir)',
                             _DB_URL))
    media_dir: str = _key("", _str('a directory path or "" (data_dir/media)'))

    __repr__ = _masked_repr  # a database URL may hold a password


@dataclass(frozen=True, kw_only=True)
class QueueConfig:
    backend: Literal["local", "redis"] = _key("local", _choice("local", "redis"))
    redis_url: str = _key("redis://127.0.0.1:6379/0",
                          _str("a redis://, rediss:// or unix:// URL", REDIS_URL_PATTERN, empty=False))
    max_attempts: int = _key(3, _int(1))
    lease_s: int = _key(15, _int(3))
    redeliver_after_s: int = _key(60, _int(1))

    __repr__ = _masked_repr  # a Redis URL may hold a password


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    model: str = _key("auto", _str('"auto", "demo", a weights name or a file path', empty=False))
    device: str = _key("auto", _str('"auto", "cpu", "cuda" or "cuda:N"', _DEVICE, empty=False))
    batch_size: int = _key(16, _int(1))
    batch_wait_ms: int = _key(20, _int(0))
    invert_steps: int = _key(300, _int(1))
    edit_steps: int = _key(100, _int(1))
    compile: bool = _key(True, _bool())
    clip: str = _key("auto", _str('"auto", "demo", "clip-vit-b32" or a file path', empty=False))
    direction_samples: int = _key(32, _int(1))
    build_directions: bool = _key(True, _bool())
    embedded: bool = _key(True, _bool())


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    per_user_open_jobs: int = _key(2, _int(1))
    per_chat_open_jobs: int = _key(6, _int(1))
    queue_cap: int = _key(200, _int(1))
    per_user_per_minute: int = _key(6, _int(1))
    morph_max_frames: int = _key(120, _int(2))
    text_max_chars: int = _key(300, _int(1))


@dataclass(frozen=True, kw_only=True)
class TimeoutsConfig:
    """Seconds a job of each kind may run before it is failed (and retried up to max_attempts)."""

    invert: int = _key(600, _int(1))
    edit: int = _key(600, _int(1))
    morph: int = _key(300, _int(1))
    mix: int = _key(120, _int(1))
    directions: int = _key(7200, _int(1))


_SECTIONS: dict[str, type] = {
    "bot": BotConfig,
    "telegram": TelegramConfig,
    "discord": DiscordConfig,
    "web": WebConfig,
    "delivery": DeliveryConfig,
    "storage": StorageConfig,
    "queue": QueueConfig,
    "engine": EngineConfig,
    "limits": LimitsConfig,
    "timeouts": TimeoutsConfig,
}


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 and ::1 (brackets allowed) reach only this machine."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole configuration. ``data_dir`` is resolved (absolute); tokens are hidden from repr."""

    data_dir: Path
    old_data_dir: Path | None = None  # the default data dir of earlier versions, to move from
    bot: BotConfig = field(default_factory=BotConfig)
    telegram: TelegramConfig = field(default_factory=TelegramConfig)
    discord: DiscordConfig = field(default_factory=DiscordConfig)
    web: WebConfig = field(default_factory=WebConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    telegram_token: str = field(default="", repr=False)
    discord_token: str = field(default="", repr=False)
    web_token: str = field(default="", repr=False)  # STYLEBOT_WEB_TOKEN, else [web] access_token

    @property
    def storage_url(self) -> str:
        """``[storage] url``, or SQLite at ``data_dir/stylebot.db`` when it is empty."""
        return self.storage.url or f"sqlite+aiosqlite:///{self.data_dir / 'stylebot.db'}"

    @property
    def media_dir(self) -> Path:
        """``[storage] media_dir`` (relative: under data_dir), or ``data_dir/media`` when empty."""
        if not self.storage.media_dir:
            return self.data_dir / "media"
        return self.data_dir / Path(self.storage.media_dir).expanduser()  # absolute stays absolute

    @property
    def telegram_enabled(self) -> bool:
        """``auto``: on when ``TELEGRAM_BOT_TOKEN`` is set."""
        e = self.telegram.enabled
        return bool(self.telegram_token) if e == "auto" else bool(e)

    @property
    def discord_enabled(self) -> bool:
        """``auto``: on when ``DISCORD_BOT_TOKEN`` is set."""
        e = self.discord.enabled
        return bool(self.discord_token) if e == "auto" else bool(e)

    @property
    def web_enabled(self) -> bool:
        """``auto``: on when neither chat platform is enabled (try the bot without tokens)."""
        e = self.web.enabled
        if e == "auto":
            return not (self.telegram_enabled or self.discord_enabled)
        return bool(e)

    def check_web_bind(self) -> None:
        """Refuse a web chat reachable from other machines without an access token.

        :func:`load_config` calls this; the web adapter may call it again before binding."""
        if self.web_enabled and not is_loopback(self.web.host) and not self.web_token:
            raise ConfigError(
                f"[web] host {self.web.host!r} is not loopback: an access token is required "
                "(set STYLEBOT_WEB_TOKEN or [web] access_token, or bind to 127.0.0.1)")


# --- loading -------------------------------------------------------------------------------------


def default_home(env: Mapping[str, str] | None = None) -> Path:
    """``$STYLEBOT_HOME`` if set, else ``~/.cache/stylebot`` (absolute): the cache dir."""
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


def _section(src: str, name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: [{name}] must be a table of keys, got {raw!r}")
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"{src}: unknown key [{name}] {key} (known: {', '.join(known)})")
    values: dict[str, Any] = {}
    for key, f in known.items():
        value = raw.get(key, f.default)
        rule: _Rule = f.metadata["rule"]
        try:
            values[key] = rule.check(value)
        except ValueError:
            shown = "(hidden)" if not f.repr else _mask_url(repr(value))
            raise ConfigError(f"{src}: [{name}] {key} must be {rule.desc}, got {shown}") from None
    return cls(**values)


def load_config(path: Path | None = None, *, env: Mapping[str, str] | None = None) -> Config:
    """The defaults, overridden by the keys ``path`` sets, with secrets from ``env`` (os.environ).

    ``path=None`` means built-in defaults only. Raises :class:`ConfigError` (one line) for a missing
    or unreadable file, invalid TOML (with its line), an unknown section or key, a wrong type or
    value, a platform enabled without its token, or a non-loopback web host without an access token.
    """
    env = os.environ if env is None else env
    src = str(path) if path is not None else "config"
    data = _read(path) if path is not None else {}
    for name in data:
        if name not in _SECTIONS:
            raise ConfigError(f"{src}: unknown section [{name}] (known: {', '.join(_SECTIONS)})")
    sections = {name: _section(src, name, cls, data.get(name, {})) for name, cls in _SECTIONS.items()}

    bot: BotConfig = sections["bot"]
    old_data_dir = None
    if bot.data_dir:
        base = path.resolve().parent if path is not None else Path.cwd()
        data_dir = (base / _expand(bot.data_dir, env)).resolve()
    else:
        data_dir, old_data_dir = _default_data_dirs(env)

    web: WebConfig = sections["web"]
    config = Config(
        data_dir=data_dir,
        old_data_dir=old_data_dir,
        telegram_token=env.get("TELEGRAM_BOT_TOKEN", "").strip(),
        discord_token=env.get("DISCORD_BOT_TOKEN", "").strip(),
        web_token=env.get("STYLEBOT_WEB_TOKEN", "").strip() or web.access_token.strip(),
        **sections,
    )
    for name, var, token in (("telegram", "TELEGRAM_BOT_TOKEN", config.telegram_token),
                             ("discord", "DISCORD_BOT_TOKEN", config.discord_token)):
        if getattr(config, name).enabled is True and not token:
            raise ConfigError(f"{src}: [{name}] enabled is true but {var} is not set in the environment")
    try:
        config.check_web_bind()
    except ConfigError as exc:
        raise ConfigError(f"{src}: {exc.message}") from None
    return config
