"""`stylebot run`: the one place that builds the long-lived objects and wires them together.

An adapter that fails is started again after a wait that doubles up to five minutes; the engine
process and the reply pump are not: when one of them ends, everything stops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from typing import Any

from bot.adapters import Adapter
from bot.commands import Reply
from bot.service import Deliver, Service
from settings import Config
from storage.db import make_db, make_sessionmaker, upgrade
from storage.media import MediaStore
from storage.queue import open_queue

__all__ = ["run"]

log = logging.getLogger("stylebot")

_STOP_GRACE_S = 10.0  # how long a stop waits for the reply pump and the adapters to finish
_RESTART_FIRST_S = 1.0  # a failed adapter is started again after this, then twice as long each time
_RESTART_MAX_S = 300.0
_STEADY_S = 60.0  # an adapter that ran this long before failing starts again after the first wait


def _router(adapters: Sequence[Adapter]) -> Deliver:
    by_platform = {a.platform: a for a in adapters}

    async def deliver(reply: Reply) -> dict[str, Any] | None:
        adapter = by_platform.get(str(reply.reply_to.get("platform")))
        if adapter is None:
            return await _log_only(reply)
        return await adapter.deliver(reply)

    return deliver


async def _log_only(reply: Reply) -> dict[str, str] | None:
    log.info("reply (no adapter connected): %s", reply.text.splitlines()[0] if reply.text else "")
    return None


async def run(config: Config, *, engine: Sequence[str] = (), adapters: Sequence[Adapter] = (),
              stop: asyncio.Event | None = None) -> int:
    """Serve until SIGINT/SIGTERM or ``stop``: 0. When the engine process dies or the reply pump
    fails, everything stops and it returns 1; a failing adapter is started again instead.
    ``engine``: the command of the engine process to start, needed when ``[engine] embedded``."""
    if config.engine.embedded and not engine:
        raise ValueError("[engine] embedded is true: say which command starts the engine process")
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await upgrade(config.storage_url)
    db = make_db(config.storage_url)
    child: asyncio.subprocess.Process | None = None
    stack = contextlib.AsyncExitStack()
    try:
        if config.engine.embedded:
            child = await asyncio.create_subprocess_exec(*engine)
            log.info("engine process started (pid %d)", child.pid)
        sessions = make_sessionmaker(db)
        queue = await stack.enter_async_context(open_queue(config.queue, sessions=sessions))
        service = Service(sessions=sessions, queue=queue, media=MediaStore(config.media_dir),
                          config=config, deliver=_router(adapters))
        if not adapters:
            log.warning("no chat adapter is configured yet: jobs are processed, replies are logged")
        pump = asyncio.create_task(service.run(stop))
        tasks = {pump: "the service"}
        for adapter in adapters:
            kept = asyncio.create_task(_keep_running(adapter, service, stop))
            tasks[kept] = f"the {adapter.platform} adapter"
        if child is not None:
            tasks[asyncio.create_task(_watch_engine(child))] = "the engine process"
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
        # Anything that ends before a stop was asked for has failed: say why in one line, stop all.
        failed = [] if stopping.done() else [t for t in tasks if t.done()]
        for task in failed:
            exc = task.exception()
            log.error("%s stopped: %s", tasks[task], exc if exc is not None else "it returned early")
        stop.set()
        # The reply pump ends by itself after the reply it is sending, so that reply is marked as
        # sent (cancelled in between, it would go out again after a restart); adapters close their
        # connections. The engine process is stopped below.
        ending = [task for task, what in tasks.items() if what != "the engine process"]
        await asyncio.wait(ending, timeout=_STOP_GRACE_S)
        for task in tasks:
            task.cancel()
        await asyncio.gather(stopping, *tasks, return_exceptions=True)
        return 1 if failed else 0
    finally:
        if child is not None and child.returncode is None:
            child.terminate()  # the worker hands back unfinished jobs on SIGTERM
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.wait(), 30)
            if child.returncode is None:
                child.kill()
        await stack.aclose()
        await db.dispose()
        log.info("stopped")


async def _keep_running(adapter: Adapter, service: Service, stop: asyncio.Event) -> None:
    """Run ``adapter`` until ``stop``, starting it again (and saying so) whenever it fails."""
    loop = asyncio.get_running_loop()
    wait = _RESTART_FIRST_S
    while not stop.is_set():
        started = loop.time()
        try:
            await adapter.run(service, stop)
            reason = "it returned early"
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
        if stop.is_set():
            return
        if loop.time() - started >= _STEADY_S:
            wait = _RESTART_FIRST_S
        log.error("the %s adapter stopped: %s; starting it again in %g s", adapter.platform, reason, wait)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), wait)
        wait = min(wait * 2, _RESTART_MAX_S)


async def _watch_engine(child: asyncio.subprocess.Process) -> None:
    code = await child.wait()
    raise RuntimeError(f"it exited with code {code}")
