"""The engine worker process: claim jobs from the queue in micro-batches, run them, store the
results and mark the jobs done in one transaction, only while this worker still holds their lease
(README "Processes" says what that guarantees)."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import storage.repo as repo
from engine.errors import EngineError
from engine.runner import Engine, JobInput, JobOutcome
from settings import Config, EngineConfig, QueueConfig
from storage.media import MediaStore
from storage.models import Job
from storage.queue import JobQueue, open_queue
from storage.specs import JOB_KINDS, EditSpec, InvertSpec, JobSpec, LineupSpec, MixSpec, MorphSpec

__all__ = ["Worker", "WorkerSettings", "default_worker_id"]

log = logging.getLogger("stylebot.worker")


def default_worker_id(device: str) -> str:
    return f"{socket.gethostname()}:{device}"


_ENGINE, _QUEUE = EngineConfig(), QueueConfig()


@dataclass(frozen=True)
class WorkerSettings:
    worker_id: str
    batch_size: int = _ENGINE.batch_size
    batch_wait_ms: int = _ENGINE.batch_wait_ms
    lease_s: float = _QUEUE.lease_s
    poll_s: float = 0.1  # how long one wait for work lasts (the stop flag is checked between)
    idle_poll_s: float = 0.02  # ... between chunks of idle work (a Redis message has time to come)
    resend_after_s: float = 5.0  # an idle worker resends jobs queued longer than this
    progress_every_s: float = 0.5
    media_sweep_s: float = 3600.0  # how often unreferenced media files are looked for
    media_grace_s: float = 3600.0  # ... and how old they must be (a file is written before its row)


class Worker:
    def __init__(
        self, engine: Engine, *, sessions: async_sessionmaker[AsyncSession], queue: JobQueue,
        media: MediaStore, settings: WorkerSettings,
    ) -> None:
        self.engine, self.sessions, self.queue = engine, sessions, queue
        self.media, self.settings = media, settings

    async def run(self, stop: asyncio.Event) -> None:
        """Serve jobs until ``stop`` is set; then hand back what was not started."""
        log.info("engine worker %s ready (%s)", self.settings.worker_id, self.engine.loaded.label)
        await self._recover()
        next_sweep = next_media_sweep = next_resend = 0.0
        idle_work = True  # the engine may have work of its own for idle time (a table to build)
        while not stop.is_set():
            if time.monotonic() >= next_sweep:  # leases expire on the lease_s scale, not per poll
                await self._requeue_expired()
                next_sweep = time.monotonic() + self.settings.lease_s / 3
            if time.monotonic() >= next_media_sweep:
                await self._sweep_media()
                next_media_sweep = time.monotonic() + self.settings.media_sweep_s
            jobs = await self.queue.take(
                worker=self.settings.worker_id, kinds=JOB_KINDS,
                limit=self.engine.ready_batch_size(self.settings.batch_size),
                lease_s=self.settings.lease_s, gather_s=self.settings.batch_wait_ms / 1000,
                wait_s=self.settings.idle_poll_s if idle_work else self.settings.poll_s)
            if jobs:
                await self._run_batch(jobs)
                idle_work = True
                continue
            if time.monotonic() >= next_resend:  # idle: jobs nobody told us about?
                resent = await self.queue.resend_waiting(older_than_s=self.settings.resend_after_s)
                if resent:
                    log.info("resent %d waiting job(s) to the queue", resent)
                next_resend = time.monotonic() + self.settings.resend_after_s
            if idle_work:  # one chunk, then the queue is looked at again
                idle_work = await self._idle_work()
        async with self.sessions.begin() as s:
            await repo.release_jobs(s, worker=self.settings.worker_id)
        self.engine.close()

    async def _idle_work(self) -> bool:
        try:
            return await asyncio.to_thread(self.engine.idle_work)
        except Exception:  # idle work must never stop the worker serving jobs
            log.exception("idle work failed; it is not retried until after the next job")
            return False

    async def _recover(self) -> None:
        """Jobs this worker id still holds were left by its previous process (it was killed)."""
        async with self.sessions.begin() as s:
            requeued, failed = await repo.recover_jobs(s, worker=self.settings.worker_id)
        if requeued or failed:
            log.warning("took back %d jobs a previous run of this worker left; %d failed for good",
                        requeued, failed)

    async def _sweep_media(self) -> None:
        async with self.sessions() as s:
            referenced = await repo.referenced_media_keys(s)
        deleted = await asyncio.to_thread(self.media.sweep, referenced,
                                          older_than_s=self.settings.media_grace_s)
        if deleted:
            log.info("media sweep: deleted %d files no row references", len(deleted))

    async def _requeue_expired(self) -> None:
        async with self.sessions.begin() as s:
            requeued, failed = await repo.requeue_expired(s)
        if requeued or failed:
            log.warning("requeued %d jobs whose worker stopped; %d failed for good", requeued, failed)

    async def _run_batch(self, jobs: Sequence[Job]) -> None:
        kind = jobs[0].kind
        log.info("batch %s: %d %s job(s)", jobs[0].batch_id, len(jobs), kind)
        inputs, outcomes = [], []
        for job in jobs:
            try:
                inputs.append(await self._inputs(job))
            except EngineError as exc:
                outcomes.append(JobOutcome.failed(job.id, exc))
        heartbeat = asyncio.create_task(self._heartbeat([j.id for j in jobs]))
        progress = _ProgressRelay(asyncio.get_running_loop(), self.settings.progress_every_s)
        relay = asyncio.create_task(self._relay(progress, [i.job_id for i in inputs]))
        try:
            if inputs:
                outcomes += await asyncio.to_thread(self.engine.run_batch, kind, inputs,
                                                    progress=progress, preview=progress.preview)
        finally:
            heartbeat.cancel()
            progress.close()
            await relay
        for outcome in outcomes:
            await self._persist(outcome)
        ids = [job.id for job in jobs]
        await self.queue.settled(ids)
        await self.queue.announce(ids)

    async def _inputs(self, job: Job) -> JobInput:
        spec = job.spec
        async with self.sessions() as s:
            latents: dict[str, Any] = {}
            photo = alignment = None
            for index, (name, face_id) in enumerate(_face_refs(spec)):
                face = await repo.get_face(s, int(face_id))
                if face is None:
                    raise EngineError("that face was deleted; please send the selfie again")
                if isinstance(spec, MorphSpec | MixSpec | LineupSpec):  # owners may change their minds
                    await _check_consent(s, spec, index, face.user_id, job)
                if face.model_id != self.engine.model_id:
                    raise EngineError("that face was saved with another model; please send the "
                                      "selfie again")
                latents[name] = repo.latent_of(face)
                if isinstance(spec, EditSpec):  # the photo to paste the edited face back into
                    alignment, photo = face.alignment, self._read(face.photo_key)
        if isinstance(spec, InvertSpec) and spec.photo_key:
            photo = self._read(spec.photo_key)
        return JobInput(job.id, spec, photo=photo, latents=latents, alignment=alignment)

    def _read(self, key: str) -> bytes:
        try:
            return self.media.read(key)
        except FileNotFoundError:  # erased (/forget) after the job was claimed
            raise EngineError("the photo for this job is gone; please send it again") from None

    async def _persist(self, outcome: JobOutcome) -> None:
        """Store a job's outcome and mark it done (or failed), only while the job is still ours.

        ``hold_job`` comes first: nothing can change the job until this transaction commits, so
        a job that was erased (/forget) or taken over by another worker gets no files at all.
        Files are written before the rows that name them; a crash in between leaves files no row
        references, for the media sweep.
        """
        worker = self.settings.worker_id
        async with self.sessions.begin() as s:
            job = await repo.hold_job(s, job_id=outcome.job_id, worker=worker, lease_s=self.settings.lease_s)
            if job is None:
                log.warning("job %s was erased or taken over by another worker; result dropped",
                            outcome.job_id)
                return
            if outcome.error is not None:
                await repo.fail_job(s, job_id=job.id, worker=worker, error=outcome.error,
                                    code=outcome.error_code or "engine_error")
                return
            stored: list[str] = []
            try:
                for data, suffix in outcome.files.values():
                    stored.append(self.media.put(data, suffix=suffix))  # content-addressed
            except OSError as exc:
                log.error("job %s: could not store its results: %s", job.id, exc)
                await repo.fail_job(s, job_id=job.id, worker=worker, error=_storage_failed(exc),
                                    code="storage_error")
                for key in await repo.orphaned_media_keys(s, keys=stored):
                    self.media.delete(key)
                return
            result = {**outcome.result, **dict(zip(outcome.files, stored, strict=True))}
            spec = job.spec
            if outcome.face is not None and job.user_id is not None and isinstance(spec, InvertSpec):
                f = outcome.face
                face = await repo.save_face(
                    s, job_id=job.id, user_id=job.user_id, label=spec.label or "default",
                    model_id=self.engine.model_id, latent=f.latent, aligned_key=result["aligned_key"],
                    photo_key=spec.photo_key, reconstruction_key=result["reconstruction_key"],
                    alignment=f.alignment, quality=f.quality)
                result["face_id"] = face.id
                if job.chat_id is not None:
                    await repo.share_face(s, face_id=face.id, chat_id=job.chat_id)
            await repo.finish_job(s, job_id=job.id, worker=worker, result=result)

    async def _heartbeat(self, job_ids: list[str]) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_s / 3)
            async with self.sessions.begin() as s:
                await repo.heartbeat(s, job_ids=job_ids, worker=self.settings.worker_id,
                                     lease_s=self.settings.lease_s)

    async def _relay(self, progress: _ProgressRelay, job_ids: list[str]) -> None:
        """Progress and first looks to the jobs' rows, for the bot to show. A first look is a file
        named in ``progress_info["preview_key"]`` (kept in later updates; erased with the job)."""
        previews: dict[str, str] = {}
        done: float = 0.0
        info: dict[str, Any] = {}
        async for item in progress:
            if isinstance(item, _Preview):
                try:
                    previews[item.job_id] = await asyncio.to_thread(self.media.put, item.jpeg,
                                                                    suffix=".jpg")
                except OSError as exc:  # the result still comes; only the first look is lost
                    log.warning("job %s: could not store its first look: %s", item.job_id, exc)
                    continue
                ids = [item.job_id]
            else:
                step, total, info = item
                done, ids = step / max(total, 1), job_ids
            async with self.sessions.begin() as s:
                for job_id in ids:
                    extra = {"preview_key": previews[job_id]} if job_id in previews else {}
                    await repo.set_progress(s, job_id=job_id, progress=done, info={**info, **extra})
            await self.queue.announce(ids)


def _face_refs(spec: JobSpec) -> list[tuple[str, int]]:
    """The faces a job uses, (latent name, face id), in the order its people are named."""
    if isinstance(spec, EditSpec):
        return [("face", spec.face_id)]
    if isinstance(spec, MorphSpec | MixSpec):
        more = spec.more_ids or [] if isinstance(spec, MorphSpec) else []
        return [("a", spec.a_id), ("b", spec.b_id), *((f"more{i}", f) for i, f in enumerate(more))]
    if isinstance(spec, LineupSpec):
        return [(f"more{i}", f) for i, f in enumerate(spec.face_ids)]
    return []


async def _check_consent(s: AsyncSession, spec: MorphSpec | MixSpec | LineupSpec, index: int,
                         owner_id: int, job: Job) -> None:
    owner = await repo.get_user(s, owner_id)
    allowed = (job.consent or {}).get("allowed", [])  # asked, and they said yes for this job
    if owner is None or await repo.consent_of(s, owner=owner, asker_id=job.user_id, chat_id=job.chat_id,
                                              allowed=allowed) != "yes":
        who = spec.names[index] if spec.names and index < len(spec.names) else "someone in it"
        raise EngineError(f"{who} no longer allows their face to be used here")


def _storage_failed(exc: OSError) -> str:
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return ("the results could not be saved" + (" (the server is out of storage space)" if full else "")
            + "; please try again later")


@dataclass(frozen=True)
class _Preview:
    job_id: str
    jpeg: bytes


_Step = tuple[int, int, dict[str, Any]]


class _ProgressRelay:
    """progress(step, total, info) and preview(job_id, jpeg) from the engine thread -> an async
    iterator (progress throttled, every preview)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, every_s: float) -> None:
        self.loop, self.every_s = loop, every_s
        self.queue: asyncio.Queue[_Step | _Preview | None] = asyncio.Queue()
        self.last = 0.0

    def preview(self, job_id: str, jpeg: bytes) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, _Preview(job_id, jpeg))

    def __call__(self, step: int, total: int, info: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s or step >= total:
            self.last = now
            clean = {k: v for k, v in info.items() if isinstance(v, int | float | str)}
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (step, total, clean))

    def close(self) -> None:
        self.queue.put_nowait(None)

    def __aiter__(self) -> _ProgressRelay:
        return self

    async def __anext__(self) -> _Step | _Preview:
        item = await self.queue.get()
        if item is None:
            raise StopAsyncIteration
        return item


async def serve(config: Config, *, device: str | None = None, worker_id: str | None = None,
                queue_url: str | None = None, stop: asyncio.Event | None = None) -> None:
    """`stylebot engine`: load the models once, then serve jobs until stopped (SIGINT/SIGTERM).
    ``device`` and ``queue_url`` (a Redis URL: join that worker pool) override the config."""
    import signal

    from engine.generators import resolve_device
    from storage.db import make_db, make_sessionmaker, upgrade

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    e, q = config.engine, config.queue
    if queue_url:
        q = q.model_copy(update={"backend": "redis", "redis_url": queue_url})
    dev = resolve_device(device or e.device)
    await upgrade(config.storage_url)
    db = make_db(config.storage_url)
    settings = WorkerSettings(worker_id=worker_id or default_worker_id(str(dev)),
                              batch_size=e.batch_size, batch_wait_ms=e.batch_wait_ms, lease_s=q.lease_s)
    sessions = make_sessionmaker(db)
    try:
        # The queue first: an unreachable Redis is reported before minutes of model loading.
        async with open_queue(q, sessions=sessions, consumer=settings.worker_id) as jobs:
            runner = await asyncio.to_thread(Engine.from_config, e, device=dev)
            await asyncio.to_thread(runner.warm_up, e.batch_size)
            worker = Worker(runner, sessions=sessions, queue=jobs, media=MediaStore(config.media_dir),
                            settings=settings)
            await worker.run(stop)
    finally:
        await db.dispose()
