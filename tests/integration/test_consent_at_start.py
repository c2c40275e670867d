"""Consent is checked again when a morph starts: a morph queued before one of its two people
switched to /privacy nobody fails with a clear reply instead of using their face (the real worker,
the demo engine in this process)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from PIL import Image

from bot.commands import Morph, Selfie, SetPrivacy, Target
from engine.runner import Engine
from engine.worker import Worker, WorkerSettings
from storage.queue import LocalQueue

from .drills import World, origin, selfie, until, world


@pytest.mark.parametrize("bob_first", [False, True])
async def test_a_queued_morph_of_someone_who_then_says_nobody_fails_clearly(
    tmp_path: Path, astronaut: Image.Image, bob_first: bool
) -> None:
    async with world(tmp_path, steps=5) as w:
        engine = Engine(model="demo", device="cpu", invert_steps=5, clip="demo",
                        build_table_when_idle=False)
        stop = asyncio.Event()
        worker = Worker(engine, sessions=w.sessions, queue=LocalQueue(w.sessions), media=w.media,
                        settings=WorkerSettings(worker_id="w1", batch_wait_ms=0))
        for i, user in enumerate(("ann", "bob")):
            await w.service.handle(Selfie(origin=origin(user), photo=selfie(astronaut, i)))
        running = asyncio.create_task(worker.run(stop))
        try:
            await until(lambda: _all(w, "done", 2), what="both selfies", timeout_s=120)
            stop.set()
            await running
            people = [Target(me=True), Target(username="bob")][::-1 if bob_first else 1]
            await w.service.handle(Morph(origin=origin("ann"), a=people[0], b=people[1], frames=4))
            assert "queue" in w.inbox.last
            await w.service.handle(SetPrivacy(origin=origin("bob"), policy="nobody"))
            stop.clear()
            running = asyncio.create_task(worker.run(stop))
            await until(lambda: _all(w, ("done", "failed"), 3), what="the morph", timeout_s=120)
        finally:
            stop.set()
            await running
        morph = [j for j in await w.jobs() if j.kind == "morph"][0]
        assert morph.status == "failed" and not morph.result
        assert morph.error == "@bob no longer allows their face to be used here"
        async with w.pumping():
            await until(lambda: _said(w, "Sorry: @bob no longer allows"), what="the reply", timeout_s=30)


async def _all(w: World, status: str | tuple[str, ...], n: int) -> bool:
    jobs = await w.jobs()
    wanted = (status,) if isinstance(status, str) else status
    return len(jobs) >= n and all(j.status in wanted for j in jobs)


async def _said(w: World, text: str) -> bool:
    return any(r.text.startswith(text) for r in w.inbox.replies)
