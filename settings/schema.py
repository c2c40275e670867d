"""The configuration schema: one typed section per TOML table, the defaults written once here.

The shipped ``config.toml`` documents these defaults and a test holds it to them key for key.
Sections are frozen pydantic models in strict mode (TOML has types: ``"8"`` is not a number); each
field says what it accepts in its ``description``, which completes the error line "must be ...".
"""

from __future__ import annotations

import ipaddress
import logging
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr

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
    "SECTIONS",
    "StorageConfig",
    "TelegramConfig",
    "TimeoutsConfig",
    "WebConfig",
    "is_loopback",
    "mask_url",
]

AutoBool = bool | Literal["auto"]

REDIS_URL_PATTERN = r"(rediss?|unix)://\S+"
_HTTP = r"https?://\S+"
_WS = r"wss?://\S+"
_DB_URL = r"[A-Za-z][A-Za-z0-9+_-]*://\S*"
_DEVICE = r"auto|cpu|cuda(:\d+)?"


class ConfigError(Exception):
    """A configuration mistake; ``message`` is one line naming the file and key."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- what a key accepts ----------------------------------------------------------------------


def _int(default: int, minimum: int, maximum: int | None = None) -> Any:
    desc = f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"
    return Field(default, ge=minimum, le=maximum, description=desc)


def _bool(default: bool) -> Any:
    return Field(default, description="true or false")


def _auto(default: AutoBool = "auto") -> Any:
    return Field(default, description='true, false or "auto"')


def _choice(default: str, *values: str) -> Any:
    return Field(default, description="one of " + ", ".join(f'"{x}"' for x in values))


def _text(default: str, desc: str = "a string") -> Any:
    return Field(default, description=desc)


def _matching(pattern: str, *, empty: bool) -> AfterValidator:
    """A string that fully matches ``pattern`` (or is empty, when ``empty``)."""
    regex = re.compile(pattern)

    def check(v: str) -> str:
        if (v or not empty) and not regex.fullmatch(v):
            raise ValueError(pattern)
        return v

    return AfterValidator(check)


def _upper_level(v: str) -> str:
    if v.upper() not in logging.getLevelNamesMapping():
        raise ValueError(v)
    return v.upper()


_LEVELS = sorted(n for n in logging.getLevelNamesMapping() if n not in ("WARN", "FATAL"))
Http = Annotated[str, _matching(_HTTP, empty=False)]
NonEmpty = Annotated[str, _matching(r"(?s).+", empty=False)]
Word = Annotated[str, _matching(r"\S+", empty=False)]
_USERINFO_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@/\s]*@")


def mask_url(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host`` (for repr and error lines)."""
    return _USERINFO_PASSWORD.sub(r"\1***@", text)


class Section(BaseModel):
    """A TOML table: unknown keys refused, values of the exact TOML type, immutable."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class _UrlSection(Section):
    def __repr_args__(self) -> Any:  # a database or Redis URL may hold a password
        for name, value in super().__repr_args__():
            yield name, mask_url(value) if isinstance(value, str) else value


# --- sections ----------------------------------------------------------------------------------


class BotConfig(Section):
    name: NonEmpty = _text("stylebot", "a non-empty string")
    data_dir: str = _text("", 'a directory path or "" (the data dir: ~/.local/share/stylebot)')
    log_level: Annotated[str, AfterValidator(_upper_level)] = _text(
        "INFO", "a logging level name (" + ", ".join(_LEVELS) + ")")


class TelegramConfig(Section):
    enabled: AutoBool = _auto()
    base_url: Http = _text("https://api.telegram.org/bot", "an http(s) URL")
    base_file_url: Http = _text("https://api.telegram.org/file/bot", "an http(s) URL")
    max_photo_mb: int = _int(10, 1)
    max_download_mb: int = _int(20, 1)


class DiscordConfig(Section):
    enabled: AutoBool = _auto()
    api_base: Http = _text("https://discord.com/api/v10", "an http(s) URL")
    gateway_url: Annotated[str, _matching(_WS, empty=True)] = _text("", 'a ws(s) URL or "" (ask the API)')
    max_upload_mb: int = _int(10, 1)
    message_content: bool = _bool(False)


class WebConfig(Section):
    enabled: AutoBool = _auto()
    host: Word = _text("127.0.0.1", "a host name or IP address")
    port: int = _int(8080, 1, 65535)
    access_token: SecretStr = Field(default=SecretStr(""), description="a string")
    max_upload_mb: int = _int(10, 1)


class DeliveryConfig(Section):
    """Replies a platform cannot take now (rate limits, outages) are tried again per chat."""

    attempts: int = _int(10, 1)
    first_retry_s: int = _int(2, 1)
    max_retry_s: int = _int(600, 1)


class StorageConfig(_UrlSection):
    url: Annotated[str, _matching(_DB_URL, empty=True)] = _text(
        "", 'a database URL (dialect+driver://...) or "" (SQLite under data_dir)')
    media_dir: str = _text("", 'a directory path or "" (data_dir/media)')


class QueueConfig(_UrlSection):
    backend: Literal["local", "redis"] = _choice("local", "local", "redis")
    redis_url: Annotated[str, _matching(REDIS_URL_PATTERN, empty=False)] = _text(
        "redis://127.0.0.1:6379/0", "a redis://, rediss:// or unix:// URL")
    max_attempts: int = _int(3, 1)
    lease_s: int = _int(15, 3)
    redeliver_after_s: int = _int(60, 1)


class EngineConfig(Section):
    model: NonEmpty = _text("auto", '"auto", "demo", a weights name or a file path')
    device: Annotated[str, _matching(_DEVICE, empty=False)] = _text(
        "auto", '"auto", "cpu", "cuda" or "cuda:N"')
    batch_size: int = _int(16, 1)
    batch_wait_ms: int = _int(20, 0)
    # The engine's defaults too. Why 300 and 100 (quality flattens, interactive time): BENCHMARKS.md.
    invert_steps: int = _int(300, 1)
    encoder: NonEmpty = _text("auto", '"auto", "none", "e4e-ffhq" or a file path')
    encoder_invert_steps: int = _int(100, 1)
    edit_steps: int = _int(100, 1)
    compile: bool = _bool(True)
    clip: NonEmpty = _text("auto", '"auto", "demo", "clip-vit-b32" or a file path')
    direction_samples: int = _int(32, 1)
    build_directions: bool = _bool(True)
    embedded: bool = _bool(True)


class LimitsConfig(Section):
    per_user_open_jobs: int = _int(2, 1)
    per_chat_open_jobs: int = _int(6, 1)
    queue_cap: int = _int(200, 1)
    per_user_per_minute: int = _int(6, 1)
    morph_max_frames: int = _int(120, 2)
    text_max_chars: int = _int(300, 1)
    consent_wait_s: int = _int(300, 5)


class TimeoutsConfig(Section):
    """Seconds a job of each kind may run before it is failed (and retried up to max_attempts)."""

    invert: int = _int(600, 1)
    edit: int = _int(600, 1)
    morph: int = _int(300, 1)
    mix: int = _int(120, 1)
    lineup: int = _int(600, 1)
    directions: int = _int(7200, 1)


SECTIONS: dict[str, type[Section]] = {
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


class Config(BaseModel):
    """The whole configuration. ``data_dir`` is resolved (absolute); secrets are ``SecretStr``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path
    old_data_dir: Path | None = None  # the default data dir of earlier versions, to move from
    bot: BotConfig = BotConfig()
    telegram: TelegramConfig = TelegramConfig()
    discord: DiscordConfig = DiscordConfig()
    web: WebConfig = WebConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    storage: StorageConfig = StorageConfig()
    queue: QueueConfig = QueueConfig()
    engine: EngineConfig = EngineConfig()
    limits: LimitsConfig = LimitsConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    telegram_token: SecretStr = SecretStr("")
    discord_token: SecretStr = SecretStr("")
    web_token: SecretStr = SecretStr("")  # STYLEBOT_WEB_TOKEN, else [web] access_token

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
        return bool(self.telegram_token.get_secret_value()) if e == "auto" else bool(e)

    @property
    def discord_enabled(self) -> bool:
        """``auto``: on when ``DISCORD_BOT_TOKEN`` is set."""
        e = self.discord.enabled
        return bool(self.discord_token.get_secret_value()) if e == "auto" else bool(e)

    @property
    def web_enabled(self) -> bool:
        """``auto``: on when neither chat platform is enabled (try the bot without tokens)."""
        e = self.web.enabled
        if e == "auto":
            return not (self.telegram_enabled or self.discord_enabled)
        return bool(e)

    def check_web_bind(self) -> None:
        """Refuse a web chat reachable from other machines without an access token.

        :func:`settings.load_config` calls this; the web adapter calls it again before binding."""
        if self.web_enabled and not is_loopback(self.web.host) and not self.web_token.get_secret_value():
            raise ConfigError(
                f"[web] host {self.web.host!r} is not loopback: an access token is required "
                "(set STYLEBOT_WEB_TOKEN or [web] access_token, or bind to 127.0.0.1)")
