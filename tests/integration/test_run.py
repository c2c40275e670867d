"""`stylebot run` starts storage, the engine process and the service, and stops cleanly."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


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
    proc = subprocess.Popen([sys.executable, "-m", "bot", "run", "--config", str(config)], env=env,
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


def test_a_busy_web_port_stops_run_with_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "config.toml"
        config.write_text(f'[engine]\nmodel = "demo"\ndevice = "cpu"\n[web]\nport = {port}\n')
        env = {**os.environ, "STYLEBOT_HOME": str(tmp_path / "home"), "PYTHONWARNINGS": "ignore"}
        env.pop("TELEGRAM_BOT_TOKEN", None)
        env.pop("DISCORD_BOT_TOKEN", None)
        done = subprocess.run([sys.executable, "-m", "bot", "run", "--config", str(config)], env=env,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert f"web adapter stopped: [Errno 98] web chat: cannot listen on 127.0.0.1 port {port}" in done.stderr
    assert "Traceback" not in done.stderr
