"""`stylebot run` starts storage, the engine process and the service, and stops cleanly."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import storage.repo as repo
from storage.db import make_db, make_sessionmaker, sqlite_url, upgrade


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_run_starts_engine_and_shuts_down_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[engine]\nmodel = "demo"\ndevice = "cpu"\n[web]\nenabled = false\n')
    env = {**os.environ, "STYLEBOT_HOME": str(tmp_path / "home"), "PYTHONWARNINGS": "ignore",
           "PYTHONUNBUFFERED": "1"}
    env.pop("TELEGRAM_BOT_TOKEN", None)
    env.pop("DISCORD_BOT_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "cli", "run", "--config", str(config)], env=env,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines: list[str] = []
    engine_pid = None
    deadline = time.monotonic() + 120
    try:
        for line in proc.stderr:
            lines.append(line)
            if m := re.search(r"engine process started \(pid (\d+)\)", line):
                engine_pid = int(m.group(1))
            if "engine worker" in line and "ready" in line:
                break
            assert time.monotonic() < deadline, "".join(lines)
        assert engine_pid is not None and _alive(engine_pid), "".join(lines)
        assert (tmp_path / "home" / "data" / "stylebot.db").exists()  # storage under STYLEBOT_HOME
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines.append(out or "")
    assert proc.returncode == 0, "".join(lines)
    assert "Traceback" not in "".join(lines)
    for _ in range(50):
        if not _alive(engine_pid):
            break
        time.sleep(0.1)
    assert not _alive(engine_pid)


def test_a_busy_web_port_is_said_and_tried_again_while_the_engine_goes_on(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    config = tmp_path / "config.toml"
    config.write_text(f'[engine]\nmodel = "demo"\ndevice = "cpu"\n[web]\nport = {port}\n')
    env = {**os.environ, "STYLEBOT_HOME": str(tmp_path / "home"), "PYTHONWARNINGS": "ignore",
           "PYTHONUNBUFFERED": "1"}
    env.pop("TELEGRAM_BOT_TOKEN", None)
    env.pop("DISCORD_BOT_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "cli", "run", "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    said = f"web adapter stopped: [Errno 98] web chat: cannot listen on 127.0.0.1 port {port}"
    deadline = time.monotonic() + 120
    try:
        for line in proc.stdout:  # the engine starts meanwhile; the web chat is tried again and again
            lines.append(line)
            text = "".join(lines)
            if text.count(said) >= 2 and "engine worker" in text and taken.fileno() != -1:
                taken.close()  # the port is free now: the next try listens
            if f"stylebot web chat: http://127.0.0.1:{port}/" in line:
                break
            assert time.monotonic() < deadline, text
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
            assert page.status == 200
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        taken.close()
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines) + (out or "")
    assert proc.returncode == 0, text
    assert re.search(re.escape(said) + r".*; starting it again in 1 s", text)
    assert re.search(re.escape(said) + r".*; starting it again in 2 s", text)
    assert "Traceback" not in text


async def test_an_install_with_its_data_in_the_cache_dir_has_it_moved_on_first_start(tmp_path: Path) -> None:
    old = tmp_path / ".cache" / "stylebot" / "data"
    await upgrade(sqlite_url(old / "stylebot.db"))  # a database as an earlier version left it
    db = make_db(sqlite_url(old / "stylebot.db"))
    async with make_sessionmaker(db).begin() as s:
        await repo.get_or_create_user(s, platform="telegram", platform_user_id="1", username="alice")
    await db.dispose()
    (old / "media" / "ab").mkdir(parents=True)
    (old / "media" / "ab" / "face.png").write_bytes(b"\x89PNG her face")
    weights = tmp_path / ".cache" / "stylebot" / "weights"
    weights.mkdir()
    (weights / "ffhq.safetensors").write_bytes(b"weights stay in the cache")
    config = tmp_path / "config.toml"
    config.write_text('[engine]\nembedded = false\n[web]\nenabled = false\n')
    env = {k: v for k, v in os.environ.items()
           if k not in ("STYLEBOT_HOME", "XDG_DATA_HOME", "TELEGRAM_BOT_TOKEN", "DISCORD_BOT_TOKEN")}
    env |= {"HOME": str(tmp_path), "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "run", "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "no chat adapter is configured" in line:  # storage is open by then
                break
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines) + (out or "")
    new = tmp_path / ".local" / "share" / "stylebot"
    assert proc.returncode == 0, text
    assert f"moved your data (database and media) from {old} to {new}" in text
    assert not old.exists() and (new / "media" / "ab" / "face.png").read_bytes() == b"\x89PNG her face"
    db = make_db(sqlite_url(new / "stylebot.db"))
    async with make_sessionmaker(db)() as s:
        alice = await repo.find_user(s, platform="telegram", platform_user_id="1")
    await db.dispose()
    assert alice is not None and alice.username == "alice"
    assert (weights / "ffhq.safetensors").exists()
