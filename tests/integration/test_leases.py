"""A batch that outlasts its lease (a first batch at a new size, a cold compile, a slow card) while
a second worker runs: the first worker's heartbeat renews the lease, so the job is neither taken
over nor run twice."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from bot.commands import Selfie
from engine.runner import Engine, JobInput, JobOutcome
from engine.worker import Worker, WorkerSettings
from storage.queue import LocalQueue

from .drills import origin, selfie, until, world

LEASE_S = 1.0


class _Counting(Engine):
    """The demo engine, counting the jobs it runs; ``slow_s`` makes every batch take that long
    (a slow card)."""

    def __init__(self, slow_s: float) -> None:
        super().__init__(model="demo", device="cpu", invert_steps=5, clip="demo",
                         build_table_when_idle=False)
        self.slow_s = slow_s
        self.ran: Counter[str] = Counter()

    def run_batch(self, kind: str, inputs: Sequence[JobInput], **kwargs: Any) -> list[JobOutcome]:
        self.ran.update(job.job_id for job in inputs)
        time.sleep(self.slow_s)
        return super().run_batch(kind, inputs, **kwargs)


async def test_a_batch_longer_than_its_lease_is_not_taken_over(
    tmp_path: Path, astronaut: Image.Image
) -> None:
    async with world(tmp_path, batch_size=1) as w:
        await w.service.handle(Selfie(origin=origin("ann"), photo=selfie(astronaut, 0)))
        slow, other = _Counting(slow_s=4 * LEASE_S), _Counting(slow_s=0)
        stop = asyncio.Event()

        def worker(engine: Engine, name: str) -> Worker:
            return Worker(engine, sessions=w.sessions, queue=LocalQueue(w.sessions), media=w.media,
                          settings=WorkerSettings(worker_id=name, batch_wait_ms=0, lease_s=LEASE_S))

        first = asyncio.create_task(worker(slow, "slow-card").run(stop))
        try:
            await until(lambda: _any_running(w), what="the slow worker's claim", timeout_s=60)
            second = asyncio.create_task(worker(other, "second").run(stop))
            await until(lambda: _all_done(w), what="the job", timeout_s=120)
            stop.set()
            await asyncio.gather(first, second)
        finally:
            stop.set()
        (job,) = await w.jobs()
        assert job.status == "done" and job.attempts == 1
        assert sum(slow.ran.values()) == 1 and not other.ran  # run once, by the worker that took it
        assert len(await w.faces()) == 1


async def _any_running(w: Any) -> bool:
    return any(j.status == "running" for j in await w.jobs())


async def _all_done(w: Any) -> bool:
    return all(j.status in ("done", "failed") for j in await w.jobs())
