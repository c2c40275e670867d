"""Scale-out with real processes and servers: two engine workers on one Redis (taskiq stream) and
one PostgreSQL database, started as `stylebot engine --queue redis://...`; a burst of selfies
spreads over both, one is killed with SIGKILL mid-job, and every job still finishes exactly once
on the other."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from PIL import Image
from postgres_db import fresh_postgres_database
from redis.asyncio import Redis
from servers import empty_redis, scale_out_config
from sqlalchemy import func, select

from bot.commands import Selfie
from bot.service import Service
from settings import load_config
from storage.db import make_db, make_sessionmaker, upgrade
from storage.media import MediaStore
from storage.models import Face, Job
from storage.queue import open_queue
from storage.redis_queue import JOBS_STREAM, WORKER_GROUP

from .drills import CONFIG, Inbox, count, figures, is_result, kill, origin, selfie, stop, until

USERS = [f"user{i}" for i in range(6)]


@contextlib.asynccontextmanager
async def _installation(tmp_path: Path, postgres_url: str, redis_url: str) -> AsyncIterator[
        tuple[Path, Service, Inbox, dict[str, str]]]:
    await empty_redis(redis_url)
    async with fresh_postgres_database(postgres_url) as db_url:
        config_path = tmp_path / "config.toml"
        config_path.write_text(CONFIG.format(batch_size=2, steps=60)
                               + scale_out_config(db_url=db_url, redis_url=redis_url, lease_s=6,
                                                  redeliver_after_s=5))
        home = tmp_path / "home"
        config = load_config(config_path, env={"STYLEBOT_HOME": str(home)})
        await upgrade(config.storage_url)
        db = make_db(config.storage_url)
        sessions = make_sessionmaker(db)
        inbox = Inbox()
        env = {**os.environ, "STYLEBOT_HOME": str(home), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        try:
            async with open_queue(config.queue, sessions=sessions) as queue:
                yield config_path, Service(sessions=sessions, queue=queue, media=MediaStore(config.media_dir),
                                           config=config, deliver=inbox.deliver), inbox, env
        finally:
            await db.dispose()


def _worker(config_path: Path, env: dict[str, str], worker_id: str, redis_url: str
            ) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "cli", "engine", "--config", str(config_path),
                             "--worker-id", worker_id, "--queue", redis_url], env=env)


async def test_two_workers_share_a_burst_and_survive_a_kill(
    tmp_path: Path, postgres_url: str, redis_url: str, astronaut: Image.Image
) -> None:
    async with _installation(tmp_path, postgres_url, redis_url) as (config_path, service, inbox, env):
        for n, user in enumerate(USERS):
            await service.handle(Selfie(origin=origin(user), photo=selfie(astronaut, n)))
        workers = {name: _worker(config_path, env, name, redis_url) for name in ("worker-a", "worker-b")}
        owners_seen: set[str] = set()
        killed_jobs: list[str] = []
        try:
            async def both_busy() -> bool:
                """Both workers hold jobs, and worker-a is well into its batch."""
                async with service.sessions() as s:
                    running = list(await s.scalars(select(Job).where(Job.status == "running")))
                owners_seen.update(j.lease_owner for j in running if j.lease_owner)
                mine = [j for j in running if j.lease_owner == "worker-a"]
                if owners_seen == {"worker-a", "worker-b"} and mine and all(j.progress > 0.05 for j in mine):
                    killed_jobs[:] = [j.id for j in mine]
                    return True
                return False

            await until(both_busy, what="both workers running jobs", timeout_s=240)
            kill(workers.pop("worker-a"))

            async def all_answered() -> bool:
                await service.pump_once()
                return sum(is_result(r) for r in inbox.replies) >= len(USERS)

            await until(all_answered, what="a reply for every selfie", timeout_s=300)
        finally:
            for proc in workers.values():
                assert stop(proc) == 0
        async with service.sessions() as s:
            jobs = list(await s.scalars(select(Job)))
            faces = await s.scalar(select(func.count()).select_from(Face))
        client = Redis.from_url(redis_url)
        pending = (await client.xpending(JOBS_STREAM, WORKER_GROUP))["pending"]
        await client.aclose()
    results = [r for r in inbox.replies if is_result(r)]
    figures("scale-out", jobs=len(jobs), killed_mid_job=len(killed_jobs),
            attempts=count([j.attempts for j in jobs]), unacked_messages=pending)
    assert [j.status for j in jobs] == ["done"] * len(USERS)
    assert faces == len(USERS)  # exactly once: one saved face per selfie
    assert sorted(r.reply_to["user"] for r in results) == sorted(USERS)  # one reply each, none twice
    assert all(r.media for r in results)
    by_id = {j.id: j for j in jobs}
    assert killed_jobs and all(by_id[i].attempts == 2 for i in killed_jobs)  # finished on worker-b
    assert pending == 0
