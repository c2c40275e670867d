"""`stylebot run` with Telegram and Discord in one process: when Discord cannot be reached, Telegram
users are still answered, and the Discord adapter keeps trying (saying so) until it gets in.

The real adapters against the local fakes of both platforms; no engine process ([engine] embedded
= false): /help needs none."""

from __future__ import annotations

import asyncio
import re
import warnings
from pathlib import Path

from log_privacy import capturing_logs

from bot.adapters.telegram import TelegramAdapter
from bot.app import run
from settings import load_config

from .discord_world import ANN
from .discord_world import TOKEN as DISCORD_TOKEN
from .fake_discord import FakeDiscord
from .fake_telegram import FakeTelegram, FakeUser
from .telegram_world import TOKEN as TELEGRAM_TOKEN
from .telegram_world import dm, replying_to

with warnings.catch_warnings():  # discord.py imports audioop (voice), deprecated since Python 3.11
    warnings.filterwarnings("ignore", "'audioop' is deprecated", DeprecationWarning)
    from bot.adapters.discord import DiscordAdapter

ALICE = FakeUser(id=1001, first_name="Alice", username="alice")


async def _until(condition: object, timeout: float) -> None:
    for _ in range(int(timeout * 10)):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("it did not happen in time")


async def test_discord_out_of_reach_stops_neither_telegram_nor_itself(tmp_path: Path) -> None:
    tg = FakeTelegram(TELEGRAM_TOKEN)
    await tg.start()
    discord_fake = FakeDiscord("not-the-bots-token.at-all.REFUSED")  # Discord says 401 to the bot
    await discord_fake.start()
    discord_fake.add_user(ANN, "ann")
    path = tmp_path / "config.toml"
    path.write_text(f'[telegram]\nbase_url = "{tg.base_url}"\nbase_file_url = "{tg.base_file_url}"\n'
                    f'[discord]\napi_base = "{discord_fake.api_base}"\n'
                    f'gateway_url = "{discord_fake.gateway_url}"\n'
                    '[engine]\nembedded = false\n[web]\nenabled = false\n')
    config = load_config(path, env={"STYLEBOT_HOME": str(tmp_path / "home"),
                                    "TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN, "DISCORD_BOT_TOKEN": DISCORD_TOKEN})
    discord = DiscordAdapter(config)
    stop = asyncio.Event()
    try:
        with capturing_logs() as logs:
            bot = asyncio.create_task(run(config, adapters=[TelegramAdapter(config, poll_timeout=1), discord],
                                          stop=stop))
            failing = re.compile(r"the discord adapter stopped: .*; starting it again in (\d+) s")
            await _until(lambda: len([m for line in logs.lines if (m := failing.search(line))]) >= 2, 30)
            asked = await tg.send_text(ALICE, dm(ALICE), "/help")
            answer = await tg.wait_for("sendMessage", replying_to(asked), timeout=20)
            assert "selfie" in answer.params["text"]
            discord_fake.token = DISCORD_TOKEN  # the right token is set up in the portal: it gets in
            await asyncio.wait_for(discord.ready.wait(), 30)
            token = await discord_fake.slash(ANN, "help")
            await discord_fake.wait_for(lambda: bool(discord_fake.for_token(token)), timeout=10)
            assert not bot.done()
            stop.set()
            assert await asyncio.wait_for(bot, 30) == 0
    finally:
        stop.set()
        await tg.stop()
        await discord_fake.stop()
    waits = [int(m[1]) for line in logs.lines if (m := failing.search(line))]
    assert waits[:2] == [1, 2]  # twice as long each time
    assert not [line for line in logs.lines if "Traceback" in line]
