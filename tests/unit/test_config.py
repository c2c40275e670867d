"""settings: defaults, the shipped config.toml, overrides, one-line errors, secrets, paths."""

from __future__ import annotations

import logging
import re
import tomllib
from pathlib import Path

import pytest
from pydantic import SecretStr

from engine import weights
from settings import SECTIONS, Config, ConfigError, WebConfig, load_config

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config.toml"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def env(home: Path) -> dict[str, str]:
    return {"STYLEBOT_HOME": str(home)}


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path, env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    message = info.value.message
    assert "\n" not in message and message == str(info.value)
    return message


# --- defaults and the shipped file ---------------------------------------------------------------


def test_defaults_load_without_a_file(env: dict[str, str], home: Path) -> None:
    config = load_config(env=env)
    assert config.bot.name == "stylebot" and config.bot.log_level == "INFO"
    assert config.telegram.base_url == "https://api.telegram.org/bot"
    assert config.telegram.base_file_url == "https://api.telegram.org/file/bot"
    assert config.discord.api_base == "https://discord.com/api/v10" and config.discord.gateway_url == ""
    assert (config.web.host, config.web.port) == ("127.0.0.1", 8080)
    assert config.queue.backend == "local" and config.queue.max_attempts == 3
    assert (config.engine.model, config.engine.device, config.engine.batch_size) == ("auto", "auto", 16)
    assert config.engine.embedded is True and config.engine.compile is True
    assert config.limits.morph_max_frames == 120 and config.timeouts.directions == 7200
    assert config.data_dir == (home / "data").resolve()


def test_shipped_config_documents_exactly_the_defaults() -> None:
    raw = tomllib.loads(SHIPPED.read_text(encoding="utf-8"))
    assert set(raw) == set(SECTIONS)
    for name, cls in SECTIONS.items():
        defaults = {key: _plain(f.default) for key, f in cls.model_fields.items()}
        assert raw[name] == defaults, f"config.toml [{name}] differs from {cls.__name__}"


def _plain(value: object) -> object:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def test_shipped_config_loads_and_equals_the_defaults(env: dict[str, str]) -> None:
    assert load_config(SHIPPED, env=env) == load_config(env=env)


def test_every_shipped_key_has_a_comment_above_it() -> None:
    lines = SHIPPED.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+\s*=", line):
            assert lines[i - 1].startswith("#"), f"config.toml line {i + 1} ({line!r}) has no comment"


# --- overrides and errors ------------------------------------------------------------------------


def test_overriding_one_key_keeps_the_others(tmp_path: Path, env: dict[str, str]) -> None:
    config = load_config(write(tmp_path, "[engine]\nbatch_size = 4\n"), env=env)
    defaults = load_config(env=env)
    assert config.engine.batch_size == 4
    assert config.engine == defaults.engine.model_copy(update={"batch_size": 4})
    assert config.model_copy(update={"engine": defaults.engine}) == defaults


def test_unknown_key_is_named(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, "[engine]\nbatch = 4\n")
    message = error_of(path, env)
    assert message.startswith(f"{path}: unknown key [engine] batch")
    assert "batch_size" in message  # the known keys are listed


def test_unknown_section_is_named(tmp_path: Path, env: dict[str, str]) -> None:
    message = error_of(write(tmp_path, "[engin]\nbatch_size = 4\n"), env)
    assert "unknown section [engin]" in message


def test_section_that_is_not_a_table(tmp_path: Path, env: dict[str, str]) -> None:
    assert "[engine] must be a table" in error_of(write(tmp_path, "engine = 3\n"), env)


def test_wrong_type_names_the_key_and_the_value(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, '[engine]\nbatch_size = "eight"\n')
    assert error_of(path, env) == f"{path}: [engine] batch_size must be an integer >= 1, got 'eight'"


@pytest.mark.parametrize(("text", "expected"), [
    ("[web]\nport = 0", "[web] port must be an integer from 1 to 65535, got 0"),
    ("[web]\nport = 70000", "[web] port must be an integer from 1 to 65535, got 70000"),
    ("[engine]\nbatch_size = true", "[engine] batch_size must be an integer >= 1, got True"),
    ("[engine]\nbatch_wait_ms = -1", "[engine] batch_wait_ms must be an integer >= 0, got -1"),
    ('[engine]\ndevice = "gpu"', "[engine] device must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\""),
    ('[queue]\nbackend = "kafka"', "[queue] backend must be one of \"local\", \"redis\", got 'kafka'"),
    ('[bot]\nlog_level = "LOUD"', "[bot] log_level must be a logging level name"),
    ("[telegram]\nmax_photo_mb = 0", "[telegram] max_photo_mb must be an integer >= 1, got 0"),
    ('[telegram]\nenabled = "yes"', "[telegram] enabled must be true, false or \"auto\", got 'yes'"),
    ('[telegram]\nbase_url = "ftp://x/bot"', "[telegram] base_url must be an http(s) URL"),
    ('[discord]\ngateway_url = "https://gw"', "[discord] gateway_url must be a ws(s) URL"),
    ('[storage]\nurl = "stylebot.db"', "[storage] url must be a database URL"),
    ("[limits]\nmorph_max_frames = 1", "[limits] morph_max_frames must be an integer >= 2, got 1"),
    ("[timeouts]\nedit = 0", "[timeouts] edit must be an integer >= 1, got 0"),
    ("[engine]\nembedded = 1", "[engine] embedded must be true or false, got 1"),
    ('[engine]\ncompile = "auto"', "[engine] compile must be true or false, got 'auto'"),
])
def test_bad_values_are_refused_with_the_key(
    tmp_path: Path, env: dict[str, str], text: str, expected: str
) -> None:
    path = write(tmp_path, text + "\n")
    assert error_of(path, env).startswith(f"{path}: {expected}")


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_valid_devices_are_accepted(tmp_path: Path, env: dict[str, str], device: str) -> None:
    assert load_config(write(tmp_path, f'[engine]\ndevice = "{device}"\n'), env=env).engine.device == device


def test_log_level_is_case_insensitive_and_usable_by_logging(tmp_path: Path, env: dict[str, str]) -> None:
    config = load_config(write(tmp_path, '[bot]\nlog_level = "debug"\n'), env=env)
    assert logging.getLevelName(config.bot.log_level) == logging.DEBUG


def test_bad_toml_gives_the_line(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, '[engine]\nmodel = "demo"\nbatch_size = = 3\n')
    message = error_of(path, env)
    assert message.startswith(f"{path}: not valid TOML") and "line 3" in message


def test_missing_explicit_file_is_an_error(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "nope.toml"
    assert error_of(path, env) == f"config file not found: {path}"


# --- secrets -------------------------------------------------------------------------------------


def test_tokens_come_from_env_and_never_show(tmp_path: Path, env: dict[str, str]) -> None:
    secrets = {"TELEGRAM_BOT_TOKEN": "123456:tg-SECRET", "DISCORD_BOT_TOKEN": "dc-SECRET",
               "STYLEBOT_WEB_TOKEN": "web-SECRET"}
    path = write(tmp_path, '[web]\naccess_token = "file-SECRET"\n')
    config = load_config(path, env={**env, **secrets})
    assert config.telegram_token.get_secret_value() == "123456:tg-SECRET"
    assert config.discord_token.get_secret_value() == "dc-SECRET"
    assert config.web_token.get_secret_value() == "web-SECRET"  # the environment wins over the file
    shown = repr(config) + str(config) + repr(config.web) + str(config.web)
    assert "SECRET" not in shown
    assert "base_url" in shown  # the rest of the config is still shown


def test_file_web_token_is_used_without_env(tmp_path: Path, env: dict[str, str]) -> None:
    config = load_config(write(tmp_path, '[web]\naccess_token = "file-SECRET"\n'), env=env)
    assert config.web_token.get_secret_value() == "file-SECRET" and "SECRET" not in repr(config)


def test_passwords_in_urls_never_show(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, '[storage]\nurl = "postgresql+asyncpg://bot:pw-SECRET@db/sb"\n'
                           '[queue]\nredis_url = "redis://:pw-SECRET@cache:6379/0"\n')
    config = load_config(path, env=env)
    assert config.storage_url == "postgresql+asyncpg://bot:pw-SECRET@db/sb"  # usable as is
    assert "SECRET" not in repr(config) + str(config)
    assert "postgresql+asyncpg://bot:***@db/sb" in repr(config) and "redis://:***@cache" in repr(config)
    bad = write(tmp_path, '[storage]\nurl = "postgres://bot:pw-SECRET@db/s b"\n', name="bad.toml")
    assert "SECRET" not in error_of(bad, env)


def test_tokens_default_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", "  42:from-os  ")
    monkeypatch.delenv("DISCORD_BOT_TOKEN", raising=False)
    config = load_config()
    assert config.telegram_token.get_secret_value() == "42:from-os" and config.telegram_enabled


# --- paths ---------------------------------------------------------------------------------------


def test_stylebot_home_moves_data_dir_and_sqlite_url(tmp_path: Path) -> None:
    a = load_config(env={"STYLEBOT_HOME": str(tmp_path / "a")})
    b = load_config(env={"STYLEBOT_HOME": str(tmp_path / "b")})
    assert a.data_dir == (tmp_path / "a" / "data").resolve() and a.data_dir.is_absolute()
    assert b.data_dir == (tmp_path / "b" / "data").resolve()
    assert a.storage_url == f"sqlite+aiosqlite:///{(tmp_path / 'a' / 'data' / 'stylebot.db').resolve()}"
    assert a.storage_url != b.storage_url
    assert a.media_dir == a.data_dir / "media"


def test_data_defaults_to_the_user_data_dir_and_downloads_stay_in_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STYLEBOT_HOME")
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config()
    assert config.data_dir == (tmp_path / ".local" / "share" / "stylebot").resolve()
    assert config.storage_url.endswith(str(tmp_path / ".local" / "share" / "stylebot" / "stylebot.db"))
    assert config.old_data_dir == (tmp_path / ".cache" / "stylebot" / "data").resolve()  # moved from
    assert weights.weights_dir() == tmp_path / ".cache" / "stylebot" / "weights"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert load_config().data_dir == (tmp_path / "xdg" / "stylebot").resolve()


def test_stylebot_home_or_a_data_dir_of_ones_own_moves_nothing(tmp_path: Path) -> None:
    assert load_config(env={"STYLEBOT_HOME": str(tmp_path)}).old_data_dir is None
    path = tmp_path / "config.toml"
    path.write_text('[bot]\ndata_dir = "mine"\n')
    config = load_config(path, env={"HOME": str(tmp_path)})
    assert config.data_dir == tmp_path / "mine" and config.old_data_dir is None


def test_relative_home_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(env={"STYLEBOT_HOME": "rel"}).data_dir == (tmp_path / "rel" / "data").resolve()


def test_data_dir_and_media_dir_from_the_file(tmp_path: Path, env: dict[str, str]) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    path = write(conf_dir, '[bot]\ndata_dir = "state"\n[storage]\nmedia_dir = "pics"\n')
    config = load_config(path, env=env)
    assert config.data_dir == (conf_dir / "state").resolve()  # relative to the config file
    assert config.media_dir == config.data_dir / "pics"  # relative to data_dir
    assert config.storage_url.endswith(f"{conf_dir.resolve()}/state/stylebot.db")

    absolute = write(tmp_path, f'[storage]\nmedia_dir = "{tmp_path / "m"}"\n', name="abs.toml")
    assert load_config(absolute, env=env).media_dir == tmp_path / "m"


def test_explicit_storage_url_is_kept(tmp_path: Path, env: dict[str, str]) -> None:
    url = "postgresql+asyncpg://bot@db/stylebot"
    assert load_config(write(tmp_path, f'[storage]\nurl = "{url}"\n'), env=env).storage_url == url


# --- "auto" resolution and the web bind check ----------------------------------------------------


@pytest.mark.parametrize(("tg", "dc", "expected"), [
    (False, False, (False, False, True)),
    (True, False, (True, False, False)),
    (False, True, (False, True, False)),
    (True, True, (True, True, False)),
])
def test_auto_enables_what_has_a_token(
    env: dict[str, str], tg: bool, dc: bool, expected: tuple[bool, bool, bool]
) -> None:
    tokens = {"TELEGRAM_BOT_TOKEN": "1:t"} if tg else {}
    tokens |= {"DISCORD_BOT_TOKEN": "d"} if dc else {}
    config = load_config(env={**env, **tokens})
    assert (config.telegram_enabled, config.discord_enabled, config.web_enabled) == expected


def test_explicit_switches_win_over_auto(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, "[telegram]\nenabled = false\n[web]\nenabled = true\n")
    config = load_config(path, env={**env, "TELEGRAM_BOT_TOKEN": "1:t"})
    assert not config.telegram_enabled and config.web_enabled
    path = write(tmp_path, "[web]\nenabled = false\n", name="off.toml")
    assert not load_config(path, env=env).web_enabled


def test_platform_enabled_without_token_is_refused(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, "[discord]\nenabled = true\n")
    message = error_of(path, env)
    assert "[discord] enabled" in message and "DISCORD_BOT_TOKEN" in message
    assert load_config(path, env={**env, "DISCORD_BOT_TOKEN": "d"}).discord_enabled


def test_public_web_host_without_token_is_refused(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, '[web]\nhost = "0.0.0.0"\n')
    message = error_of(path, env)
    assert "[web] host '0.0.0.0'" in message and "access token is required" in message

    assert load_config(path, env={**env, "STYLEBOT_WEB_TOKEN": "t0k"}).web.host == "0.0.0.0"
    with_file_token = write(tmp_path, '[web]\nhost = "0.0.0.0"\naccess_token = "t0k"\n', name="t.toml")
    load_config(with_file_token, env=env).check_web_bind()  # the adapter's re-check passes too


def test_public_web_host_is_fine_when_web_is_off(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, '[web]\nhost = "0.0.0.0"\n')
    config = load_config(path, env={**env, "TELEGRAM_BOT_TOKEN": "1:t"})  # auto: web off
    assert not config.web_enabled


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LocalHost"])
def test_loopback_hosts_need_no_token(tmp_path: Path, env: dict[str, str], host: str) -> None:
    assert load_config(write(tmp_path, f'[web]\nhost = "{host}"\n'), env=env).web_enabled


def test_directly_built_config_checks_the_bind(tmp_path: Path) -> None:
    config = Config(data_dir=tmp_path, web=WebConfig(host="192.168.1.5"))
    with pytest.raises(ConfigError, match="access token is required"):
        config.check_web_bind()


# --- the environment ------------------------------------------------------------------------------


def test_urls_and_secrets_come_from_the_environment_too(tmp_path: Path, env: dict[str, str]) -> None:
    path = write(tmp_path, '[storage]\nurl = "postgresql+asyncpg://file@db/sb"\n[engine]\nbatch_size = 4\n')
    config = load_config(path, env={
        **env, "STYLEBOT_STORAGE__URL": "postgresql+asyncpg://bot:pw-SECRET@env/sb",
        "STYLEBOT_QUEUE__REDIS_URL": "redis://cache:6379/1", "STYLEBOT_WEB__ACCESS_TOKEN": "0123"})
    assert config.storage_url == "postgresql+asyncpg://bot:pw-SECRET@env/sb"  # the environment wins
    assert config.queue.redis_url == "redis://cache:6379/1"
    assert config.web_token.get_secret_value() == "0123"  # digits, still a string
    assert config.engine.batch_size == 4 and "SECRET" not in repr(config)


def test_numbers_and_switches_from_the_environment(env: dict[str, str]) -> None:
    config = load_config(env={**env, "STYLEBOT_ENGINE__BATCH_SIZE": "8", "STYLEBOT_ENGINE__COMPILE": "false",
                              "STYLEBOT_TELEGRAM__ENABLED": "false", "STYLEBOT_ENGINE__DEVICE": "cuda:1"})
    assert (config.engine.batch_size, config.engine.compile, config.engine.device) == (8, False, "cuda:1")
    assert config.telegram.enabled is False


@pytest.mark.parametrize(("var", "value", "expected"), [
    ("STYLEBOT_ENGINE__BATCH_SIZE", "eight",
     "$STYLEBOT_ENGINE__BATCH_SIZE: [engine] batch_size must be an integer >= 1, got 'eight'"),
    ("STYLEBOT_ENGINE__BATCH", "4", "$STYLEBOT_ENGINE__BATCH: unknown key [engine] batch"),
    ("STYLEBOT_ENGIN__BATCH_SIZE", "4", "$STYLEBOT_ENGIN__BATCH_SIZE: unknown section [engin]"),
    ("STYLEBOT_STORAGE__URL", "postgres://bot:pw-SECRET@db/s b", "$STYLEBOT_STORAGE__URL: [storage] url"),
])
def test_a_bad_environment_value_names_its_variable(
    env: dict[str, str], var: str, value: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={**env, var: value})
    assert info.value.message.startswith(expected) and "SECRET" not in info.value.message
