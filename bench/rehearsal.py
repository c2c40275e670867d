"""Dress rehearsal: the whole bot on a GPU, as a chat user meets it.

`stylebot run` (the bot with its engine child process, default config: batch size 16, compiled) talks
to the e2e fake Telegram server (tests/e2e/fake_telegram.py) with the full-size official-format
generator and CLIP / VGG16 / FaceNet stand-ins that `make gpu-smoke` writes. When the engine has
warmed up, users send photos: one user alone, then ``--users`` at once, then each an `/edit`, then
two users in a group a `/morph`. For every request it reports the time from the user's message to
the reply's upload reaching Telegram, split by the jobs table's timestamps into the bot's intake
(message -> job row), the queue wait (row -> claimed), the engine (claimed -> result stored) and
delivery (result -> upload answered); and the GPU's utilisation (nvidia-smi) while each phase ran.

Usage: python -m bench.rehearsal --official-code DIR [--work .smoke-home] [--out DIR] [--users 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from bench.gpu_smoke import _commit, _prepare_weights, _write_random_table
from storage.db import make_db, make_sessionmaker
from storage.models import Job
from tests.e2e.fake_telegram import Call, FakeChat, FakeTelegram, FakeUser
from tests.e2e.telegram_world import TOKEN, astronaut

_CONFIG = """
[telegram]
base_url = "{base_url}"
base_file_url = "{base_file_url}"

[engine]
model = "auto"
device = "{device}"
clip = "auto"
build_directions = false
{steps}
[limits]
per_user_per_minute = 30
per_user_open_jobs = 3
"""


class GpuMonitor:
    """nvidia-smi's utilisation every 100 ms, kept with the time it was read."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []
        try:
            self.proc: subprocess.Popen[str] | None = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append((time.monotonic(), int(line)))

    def mean(self, start: float, end: float) -> float | None:
        values = [u for t, u in self.samples if start <= t <= end]
        return round(statistics.fmean(values), 1) if values else None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()


@dataclass
class Phase:
    name: str
    sent: list[tuple[dict[str, Any], float]] = field(default_factory=list)  # (message, monotonic)
    delivered: list[Call] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0


def _wall(mono: float, anchor: tuple[float, float]) -> datetime:
    """A monotonic reading as the UTC wall time the jobs table uses."""
    return datetime.fromtimestamp(anchor[0] + mono - anchor[1], UTC)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, round(q * (len(xs) - 1)))], 2) if xs else float("nan")


async def _send_all(tg: FakeTelegram, phase: Phase, sends: list[Any], reply_method: str,
                    timeout: float) -> Phase:
    phase.start = time.monotonic()
    messages = await asyncio.gather(*sends)
    phase.sent = [(m, time.monotonic()) for m in messages]
    for m, _ in phase.sent:
        def replies_with_media(c: Call, mid: int = m["message_id"], chat: int = m["chat"]["id"]) -> bool:
            ref = c.params.get("reply_parameters")
            return (isinstance(ref, dict) and ref.get("message_id") == mid
                    and str(c.params.get("chat_id")) == str(chat))
        phase.delivered.append(await tg.wait_for(reply_method, replies_with_media, timeout=timeout))
    phase.end = max(c.at for c in phase.delivered)
    return phase


async def _job_rows(url: str, since: datetime) -> list[Job]:
    db = make_db(url)
    try:
        async with make_sessionmaker(db)() as s:
            rows = await s.execute(select(Job).where(Job.created_at >= since).order_by(Job.created_at))
            return list(rows.scalars())
    finally:
        await db.dispose()


def _row(phase: Phase, jobs: list[Job], gpu: GpuMonitor, anchor: tuple[float, float]) -> dict[str, Any]:
    totals = [c.at - t for (_, t), c in zip(phase.sent, phase.delivered, strict=True)]
    first = _wall(phase.start, anchor)
    last = _wall(phase.end, anchor)
    mine = [j for j in jobs if first <= j.created_at <= last and j.started_at and j.finished_at]
    sent_wall = [_wall(t, anchor) for _, t in phase.sent]
    intake = [(j.created_at - min(sent_wall, key=lambda s: abs((j.created_at - s).total_seconds())))
              .total_seconds() for j in mine]
    wait = [(j.started_at - j.created_at).total_seconds() for j in mine if j.started_at]
    engine = [(j.finished_at - j.started_at).total_seconds() for j in mine
              if j.started_at and j.finished_at]
    gpu_s = [float((j.result or {}).get("seconds", 0.0)) for j in mine]
    delivery = [(j.replied_at - j.finished_at).total_seconds() for j in mine
                if j.replied_at and j.finished_at]
    return {
        "phase": phase.name, "requests": len(phase.sent), "jobs": len(mine),
        "kinds": sorted({j.kind for j in mine}),
        "total_p50_s": _pct(totals, 0.5), "total_p95_s": _pct(totals, 0.95), "total_max_s": _pct(totals, 1.0),
        "intake_p50_s": _pct(intake, 0.5), "queue_wait_p50_s": _pct(wait, 0.5),
        "queue_wait_p95_s": _pct(wait, 0.95), "engine_p50_s": _pct(engine, 0.5),
        "engine_p95_s": _pct(engine, 0.95), "inversion_compute_p50_s": _pct(gpu_s, 0.5),
        "delivery_p50_s": _pct(delivery, 0.5), "delivery_p95_s": _pct(delivery, 0.95),
        "batches": sorted({(j.result or {}).get("batch") for j in mine}, key=str),
        "compiled": sorted({(j.result or {}).get("compiled") for j in mine}, key=str),
        "gpu_util_mean_pct": gpu.mean(phase.start, phase.end),
    }


async def _rehearse(args: argparse.Namespace) -> dict[str, Any]:
    home = args.work.resolve()
    shutil.rmtree(home / "data", ignore_errors=True)
    _write_random_table(home)  # global edits, as on a deployment whose table is built
    tg = FakeTelegram(TOKEN)
    await tg.start()
    config = home / "rehearsal.toml"
    steps = "" if args.steps is None else f"invert_steps = {args.steps}\nedit_steps = {args.steps}\n"
    config.write_text(_CONFIG.format(base_url=tg.base_url, base_file_url=tg.base_file_url, device=args.device,
                                     steps=steps))
    env = {**os.environ, "STYLEBOT_HOME": str(home), "TELEGRAM_BOT_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    log_path = args.out / "run.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        bot = subprocess.Popen([sys.executable, "-m", "cli", "run", "--config", str(config)], env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    gpu = GpuMonitor()
    anchor = (time.time(), time.monotonic())
    report: dict[str, Any] = {"commit": _commit(), "users": args.users, "phases": []}
    try:
        await tg.wait_for("setMyCommands", timeout=120)
        report["bot_up_s"] = round(time.monotonic() - started, 1)
        while args.device == "cuda" and "warm-up finished" not in log_path.read_text(errors="replace"):
            if bot.poll() is not None or time.monotonic() - started > args.warm_up_timeout_s:
                raise RuntimeError("the engine did not finish warming up; see run.log")
            await asyncio.sleep(1)
        report["warm_up_s"] = round(time.monotonic() - started, 1)
        users = [FakeUser(id=100 + i, first_name=f"user{i}", username=f"user{i}") for i in range(args.users)]
        dms = [FakeChat(id=u.id) for u in users]
        pairs = list(zip(users, dms, strict=True))
        n = args.users
        alone = [tg.send_photo(users[0], dms[0], astronaut(0))]
        phases = [await _send_all(tg, Phase("selfie, 1 user"), alone, "sendPhoto", 300)]
        selfies = [tg.send_photo(u, c, astronaut(i % 9 + 1)) for i, (u, c) in enumerate(pairs)]
        phases.append(await _send_all(tg, Phase(f"selfies, {n} users at once"), selfies, "sendPhoto", 600))
        for command, name in (("/edit", "/edit (global)"), ("/edit!", "/edit! (optimisation)")):
            edits = [tg.send_text(u, c, f"{command} a smiling face") for u, c in pairs]
            phase = Phase(f"{name}, {n} users at once")
            phases.append(await _send_all(tg, phase, edits, "sendMediaGroup", 600))
        group = FakeChat(id=-100777, type="group", title="demo")
        in_group = [tg.send_photo(u, group, astronaut(i), caption="/selfie") for i, u in enumerate(users[:2])]
        await _send_all(tg, Phase("group selfies"), in_group, "sendPhoto", 300)
        morph = [tg.send_text(users[0], group, "/morph @user0 @user1")]
        phases.append(await _send_all(tg, Phase("/morph in a group"), morph, "sendVideo", 300))
        jobs = await _job_rows(f"sqlite+aiosqlite:///{home / 'data' / 'stylebot.db'}", _wall(started, anchor))
        report["phases"] = [_row(p, jobs, gpu, anchor) for p in phases]
    finally:
        gpu.stop()
        bot.send_signal(signal.SIGTERM)
        try:
            # In a thread: the fake server runs on this loop and answers the bot's last calls.
            report["exit_code"] = await asyncio.to_thread(bot.wait, 90)
        except subprocess.TimeoutExpired:
            bot.kill()
            report["exit_code"] = "killed"
        await tg.stop()
        text = log_path.read_text(errors="replace")
        errors = [line for line in text.splitlines() if "Traceback" in line or " ERROR " in line]
        report["log_errors"] = errors[:5]
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official-code", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path(".smoke-home"))
    p.add_argument("--out", type=Path, default=Path("bench/results/rehearsal"))
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--warm-up-timeout-s", type=float, default=600.0)
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the rehearsal itself")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--steps", type=int, default=None, help="inversion and edit steps (default: the config's)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    _prepare_weights(args.work.resolve(), args.official_code.resolve(), args.resolution)
    report = asyncio.run(_rehearse(args))
    (args.out / "rehearsal.json").write_text(json.dumps(report, indent=1))
    print(f"rehearsal at commit {report['commit']}: bot up {report.get('bot_up_s')} s, engine warm "
          f"{report.get('warm_up_s')} s after start")
    cols = ("requests", "total_p50_s", "total_p95_s", "intake_p50_s", "queue_wait_p50_s",
            "queue_wait_p95_s", "engine_p50_s", "inversion_compute_p50_s", "delivery_p50_s",
            "delivery_p95_s", "gpu_util_mean_pct")
    print(f"{'phase':<44}" + " ".join(f"{c[:14]:>14}" for c in cols))
    for row in report["phases"]:
        print(f"{row['phase']:<44}" + " ".join(f"{row[c]!s:>14}" for c in cols) + f"  {row['batches']}")
    print(f"log errors: {report['log_errors'] or 'none'}; exit code {report.get('exit_code')}")
    return 0 if not report["log_errors"] and report.get("exit_code") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
