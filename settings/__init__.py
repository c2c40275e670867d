"""The configuration every process reads (bot, engine, CLI); no torch, no bot or engine import."""

from settings.load import ENV_PREFIX, default_home, load_config
from settings.schema import (
    REDIS_URL_PATTERN,
    SECTIONS,
    AutoBool,
    BotConfig,
    Config,
    ConfigError,
    DeliveryConfig,
    DiscordConfig,
    EngineConfig,
    LimitsConfig,
    QueueConfig,
    StorageConfig,
    TelegramConfig,
    TimeoutsConfig,
    WebConfig,
    is_loopback,
    mask_url,
)

__all__ = [
    "AutoBool", "BotConfig", "Config", "ConfigError", "DeliveryConfig", "DiscordConfig", "ENV_PREFIX",
    "EngineConfig", "LimitsConfig", "QueueConfig", "REDIS_URL_PATTERN", "SECTIONS", "StorageConfig",
    "TelegramConfig", "TimeoutsConfig", "WebConfig", "default_home", "is_loopback", "load_config",
    "mask_url",
]
