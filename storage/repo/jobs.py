"""The durable job queue: the bot inserts rows, engine workers claim, run and finish them.

Life of a job: ``queued`` -> (claim) ``running`` under a lease -> ``done`` | ``failed``; then the
bot replies and stamps ``replied_at`` (:mod:`storage.repo.delivery`). A worker holds a lease
(``lease_owner``, ``lease_until``) and extends it with ``heartbeat``; ``requeue_expired`` puts
jobs whose worker vanished (lease past) or that ran past ``timeout_s`` back in the queue, or
fails them after ``max_attempts``;
``recover_jobs`` does the same at once for the jobs a restarted worker's id still holds.
Every state change is one conditional UPDATE (``WHERE status = 'running' AND lease_owner =
:worker``), so a worker that lost its lease cannot finish, fail or requeue a job another worker
now holds.

How ``claim_jobs`` stays safe with several workers:

- SQLite: one statement,

      UPDATE jobs SET status='running', ... WHERE status = 'queued' AND id IN (
          SELECT id FROM jobs WHERE status = 'queued' AND (kind, model) IN (
              SELECT kind, model FROM jobs WHERE status = 'queued' [AND kind IN :kinds]
              [AND model = :model] ORDER BY created_at, id LIMIT 1)
          ORDER BY created_at, id LIMIT :limit)
      RETURNING *

  SQLite runs one writer at a time and evaluates the subqueries inside that write (the driver
  opens the transaction right before the UPDATE; the 5 s busy timeout makes a second claimer
  wait, then it sees the first one's rows as running).
- PostgreSQL: three statements in the caller's transaction. ``SELECT kind, model ... LIMIT 1
  FOR UPDATE SKIP LOCKED`` (the oldest job no other claim holds), ``SELECT id ... WHERE kind =
  :kind AND model = :model ... LIMIT :limit FOR UPDATE SKIP LOCKED``, then ``UPDATE ... WHERE
  id IN (:ids) AND status = 'queued' RETURNING *``. The row locks keep concurrent claimers on
  disjoint rows without waiting; a row locked right after another claim committed is re-checked
  on its newest version, and the UPDATE re-checks the status. (Not one statement there: a
  locking subquery under ``IN`` can be re-run per row of the UPDATE and so exceed the limit.)

Either way a job is never handed to two claimers; a test races several engines on one SQLite
file and on a PostgreSQL server that the tests start.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, case, func, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from storage.models import Job, utcnow
from storage.repo._util import plain_json

__all__ = [
    "claim_jobs",
    "count_open_jobs",
    "count_queued",
    "create_job",
    "fail_job",
    "finish_job",
    "get_job",
    "heartbeat",
    "hold_job",
    "jobs_in_progress",
    "queue_position",
    "queued_job_ids",
    "recover_jobs",
    "release_jobs",
    "requeue_expired",
    "answer_consent",
    "expire_held",
    "recent_results",
    "set_progress",
    "set_reply_ref",
]

_OPEN = ("held", "queued", "running")  # held too: asks count against the asker's limits
_NOT_RUNNING: dict[str, Any] = {"lease_owner": None, "lease_until": None}
_BACK_IN_QUEUE: dict[str, Any] = {
    "status": "queued", "lease_owner": None, "lease_until": None, "started_at": None, "batch_id": None,
    "progress": 0.0, "progress_info": None,
}


async def _update(s: AsyncSession, *where: ColumnElement[bool], values: dict[str, Any]) -> list[Job]:
    """One conditional UPDATE of jobs; returns the rows it changed, with loaded objects refreshed."""
    stmt = update(Job).where(*where).values(**values).returning(Job)
    rows = await s.scalars(stmt, execution_options={"synchronize_session": False,
                                                    "populate_existing": True})
    return list(rows)


async def create_job(
    s: AsyncSession, *, kind: str, model: str, payload: dict[str, Any], user_id: int | None,
    chat_id: int | None, reply_to: dict[str, Any], max_attempts: int = 3, timeout_s: float = 600.0,
    waiting_for: Sequence[int] = (),
) -> Job:
    """A new queued job (id: uuid4 hex); held instead while ``waiting_for`` people are asked for
    their consent (:func:`answer_consent`)."""
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    if not timeout_s > 0:
        raise ValueError("timeout_s must be positive")
    job = Job(id=uuid.uuid4().hex, kind=kind, model=model, payload=plain_json(payload),
              status="held" if waiting_for else "queued", attempts=0, max_attempts=max_attempts,
              timeout_s=float(timeout_s), progress=0.0, reply_to=plain_json(reply_to), user_id=user_id,
              chat_id=chat_id, created_at=utcnow(),
              consent={"waiting": list(waiting_for), "allowed": []} if waiting_for else None)
    s.add(job)
    await s.flush()
    return job


async def get_job(s: AsyncSession, job_id: str) -> Job | None:
    return await s.get(Job, job_id)


async def claim_jobs(
    s: AsyncSession, *, worker: str, kinds: Sequence[str] | None, limit: int, lease_s: float,
    model: str | None = None, among: Sequence[str] | None = None,
) -> list[Job]:
    """Move up to ``limit`` of the oldest queued jobs of one kind and model to running.

    The kind and model are those of the oldest queued job that ``kinds`` / ``model`` allow
    (None: any); ``among`` limits the choice to these job ids (the ones a broker delivered).
    The claimed jobs get ``attempts + 1``, this worker's lease until now + ``lease_s``,
    ``started_at`` and one fresh ``batch_id``. Oldest first. See the module docstring for why
    two workers never get the same job.
    """
    if limit <= 0 or (kinds is not None and not kinds) or (among is not None and not among):
        return []
    oldest, group = aliased(Job), aliased(Job)
    pick = select(oldest.kind, oldest.model).where(oldest.status == "queued")
    if among is not None:
        pick = pick.where(oldest.id.in_(list(among)))
    if kinds is not None:
        pick = pick.where(oldest.kind.in_(list(kinds)))
    if model is not None:
        pick = pick.where(oldest.model == model)
    pick = pick.order_by(oldest.created_at, oldest.id).limit(1)
    ids: Select[Any] | list[str]
    if s.get_bind().dialect.name == "postgresql":
        first = (await s.execute(pick.with_for_update(skip_locked=True))).first()
        if first is None:
            return []
        same = select(Job.id).where(Job.status == "queued", Job.kind == first.kind, Job.model == first.model)
        if among is not None:
            same = same.where(Job.id.in_(list(among)))
        ids = list(await s.scalars(
            same.order_by(Job.created_at, Job.id).limit(limit).with_for_update(skip_locked=True)))
    else:
        grouped = select(group.id).where(group.status == "queued", tuple_(group.kind, group.model).in_(pick))
        if among is not None:
            grouped = grouped.where(group.id.in_(list(among)))
        ids = grouped.order_by(group.created_at, group.id).limit(limit)
    now = utcnow()
    claimed = await _update(s, Job.status == "queued", Job.id.in_(ids), values={
        "status": "running", "attempts": Job.attempts + 1, "lease_owner": worker,
        "lease_until": now + timedelta(seconds=lease_s), "started_at": now, "batch_id": uuid.uuid4().hex,
        "progress": 0.0, "progress_info": None,
    })
    return sorted(claimed, key=lambda job: (job.created_at, job.id))


def _held_by(worker: str) -> tuple[ColumnElement[bool], ...]:
    return (Job.status == "running", Job.lease_owner == worker)


async def heartbeat(s: AsyncSession, *, job_ids: Sequence[str], worker: str, lease_s: float) -> int:
    """Extend this worker's lease on the jobs; returns how many it still holds."""
    if not job_ids:
        return 0
    until = utcnow() + timedelta(seconds=lease_s)
    return len(await _update(s, Job.id.in_(list(job_ids)), *_held_by(worker), values={"lease_until": until}))


async def hold_job(s: AsyncSession, *, job_id: str, worker: str, lease_s: float) -> Job | None:
    """The job, its lease renewed, if this worker still holds it; None when it was erased or
    taken over. The renewal is a write, so the job cannot change under the caller's transaction
    until it commits (SQLite: no other writer at all; PostgreSQL: the row stays locked)."""
    until = utcnow() + timedelta(seconds=lease_s)
    held = await _update(s, Job.id == job_id, *_held_by(worker), values={"lease_until": until})
    return held[0] if held else None


async def set_progress(s: AsyncSession, *, job_id: str, progress: float, info: dict[str, Any] | None) -> bool:
    """Record progress (clamped to 0..1) of a running job; False when it is not running."""
    value = min(max(float(progress), 0.0), 1.0)
    changed = await _update(s, Job.id == job_id, Job.status == "running",
                            values={"progress": value, "progress_info": plain_json(info)})
    return bool(changed)


async def finish_job(s: AsyncSession, *, job_id: str, worker: str, result: dict[str, Any]) -> bool:
    """Mark the job done with ``result`` if it is still running under this worker's lease.

    False (and nothing changed) when the lease was lost: the job was requeued, maybe re-run or
    finished elsewhere, or erased. A lease that has expired but was not yet taken still counts.
    """
    changed = await _update(s, Job.id == job_id, *_held_by(worker), values={
        "status": "done", "result": plain_json(result), "progress": 1.0, "finished_at": utcnow(),
        "error": None, "error_code": None, **_NOT_RUNNING})
    return bool(changed)


async def fail_job(s: AsyncSession, *, job_id: str, worker: str, error: str, code: str) -> bool:
    """Mark the job failed (for good) if it is still running under this worker's lease."""
    changed = await _update(s, Job.id == job_id, *_held_by(worker), values={
        "status": "failed", "error": error, "error_code": code, "finished_at": utcnow(), **_NOT_RUNNING})
    return bool(changed)


def _times(n: int) -> str:
    return f"{n} time" if n == 1 else f"{n} times"


async def requeue_expired(s: AsyncSession, *, now: datetime | None = None) -> tuple[int, int]:
    """Running jobs whose lease expired (the worker stopped) or that ran past ``timeout_s``:
    back to queued while ``attempts < max_attempts``, else failed with ``error_code``
    ``engine_lost`` / ``timeout``. Returns (requeued, failed)."""
    now = now or utcnow()
    running = list(await s.scalars(select(Job).where(Job.status == "running")))
    return await _give_up_on(s, running, now=now,
                             lost=lambda job: job.lease_until is None or job.lease_until < now)


async def recover_jobs(s: AsyncSession, *, worker: str, now: datetime | None = None) -> tuple[int, int]:
    """A worker starting up: the jobs its id still holds were left by a previous process of it
    that died (kill -9, power cut) without handing them back. They are treated as if their
    lease had run out now, without waiting for it: back to queued, or failed after
    ``max_attempts``. Returns (requeued, failed). A worker id is run by one process at a time."""
    now = now or utcnow()
    held = list(await s.scalars(select(Job).where(*_held_by(worker))))
    return await _give_up_on(s, held, now=now, lost=lambda job: True)


async def _give_up_on(
    s: AsyncSession, jobs: Sequence[Job], *, now: datetime, lost: Callable[[Job], bool],
) -> tuple[int, int]:
    """Requeue (or fail, after ``max_attempts``) the running ``jobs`` that are ``lost`` or
    timed out, each only if nobody finished, released or re-claimed it since it was read."""
    requeued = failed = 0
    for job in jobs:
        timed_out = job.started_at is not None and now > job.started_at + timedelta(seconds=job.timeout_s)
        if not (timed_out or lost(job)):
            continue
        owner = Job.lease_owner.is_(None) if job.lease_owner is None else Job.lease_owner == job.lease_owner
        same_claim = (Job.id == job.id, Job.status == "running", Job.attempts == job.attempts, owner)
        if job.attempts < job.max_attempts:
            requeued += len(await _update(s, *same_claim, values=dict(_BACK_IN_QUEUE)))
            continue
        if timed_out:
            code = "timeout"
            error = (f"this job ran longer than its {job.timeout_s:g} s limit {_times(job.attempts)}, "
                     "so it was stopped")
        else:
            code = "engine_lost"
            error = f"the engine stopped while working on this job {_times(job.attempts)}"
        failed += len(await _update(s, *same_claim, values={
            "status": "failed", "error": error, "error_code": code, "finished_at": now, **_NOT_RUNNING}))
    return requeued, failed


async def release_jobs(s: AsyncSession, *, worker: str) -> int:
    """Clean shutdown: this worker's running jobs go back to the queue, the attempt not counted."""
    values = dict(_BACK_IN_QUEUE, attempts=case((Job.attempts > 0, Job.attempts - 1), else_=0))
    return len(await _update(s, *_held_by(worker), values=values))


async def jobs_in_progress(s: AsyncSession) -> list[Job]:
    """Running jobs whose reply has not ended (a chat known to be unreachable gets no progress),
    oldest first, for progress messages; rows already loaded in the session are refreshed."""
    query = (select(Job).where(Job.status == "running", Job.replied_at.is_(None))
             .order_by(Job.created_at, Job.id))
    return list(await s.scalars(query, execution_options={"populate_existing": True}))


async def set_reply_ref(s: AsyncSession, *, job_id: str, ref: dict[str, Any],
                        name: str = "progress_ref") -> bool:
    """Keep the adapter's reference to a message of the job's reply in ``reply_to[name]``: the
    progress message, or (``preview_ref``) the first look at the result."""
    job = await s.get(Job, job_id)
    if job is None:
        return False
    job.reply_to = {**(job.reply_to or {}), name: plain_json(ref)}
    await s.flush()
    return True


async def queue_position(s: AsyncSession, *, job_id: str) -> int:
    """How many queued jobs are ahead of this one (0 when it is running or finished)."""
    job = await s.get(Job, job_id)
    if job is None or job.status != "queued":
        return 0
    ahead = or_(Job.created_at < job.created_at, and_(Job.created_at == job.created_at, Job.id < job.id))
    count = await s.scalar(select(func.count()).select_from(Job).where(Job.status == "queued", ahead))
    return int(count or 0)


async def typical_run_s(s: AsyncSession, *, kind: str, recent: int = 20) -> float | None:
    """How long a batch of ``kind`` took to run lately (the median of the last ``recent`` done
    jobs, claimed to finished); None before any has run."""
    rows = await s.execute(select(Job.started_at, Job.finished_at)
                           .where(Job.kind == kind, Job.status == "done", Job.started_at.is_not(None),
                                  Job.finished_at.is_not(None))
                           .order_by(Job.finished_at.desc()).limit(recent))
    took = sorted((end - start).total_seconds() for start, end in rows if start and end)
    return took[len(took) // 2] if took else None


async def count_running(s: AsyncSession) -> int:
    return int(await s.scalar(select(func.count()).select_from(Job).where(Job.status == "running")) or 0)


async def count_open_jobs(s: AsyncSession, *, user_id: int | None = None, chat_id: int | None = None) -> int:
    """Held, queued and running jobs, optionally of one user and/or in one chat."""
    query = select(func.count()).select_from(Job).where(Job.status.in_(_OPEN))
    if user_id is not None:
        query = query.where(Job.user_id == user_id)
    if chat_id is not None:
        query = query.where(Job.chat_id == chat_id)
    return int(await s.scalar(query) or 0)


async def queued_job_ids(
    s: AsyncSession, *, among: Sequence[str] | None = None, created_before: datetime | None = None,
    limit: int = 1000,
) -> list[str]:
    """Ids of queued jobs, oldest first: of ``among`` only, and/or created before a time."""
    query = select(Job.id).where(Job.status == "queued")
    if among is not None:
        query = query.where(Job.id.in_(list(among)))
    if created_before is not None:
        query = query.where(Job.created_at < created_before)
    return list(await s.scalars(query.order_by(Job.created_at, Job.id).limit(limit)))


async def count_queued(
    s: AsyncSession, *, kinds: Sequence[str] | None = None, model: str | None = None,
) -> int:
    """Queued jobs (optionally only of these kinds / this model)."""
    query = select(func.count()).select_from(Job).where(Job.status == "queued")
    if kinds is not None:
        query = query.where(Job.kind.in_(list(kinds)))
    if model is not None:
        query = query.where(Job.model == model)
    return int(await s.scalar(query) or 0)


async def recent_results(s: AsyncSession, *, user_id: int, limit: int) -> list[Job]:
    """The user's latest finished edits, morphs and mixes, newest first (their gallery)."""
    query = (select(Job).where(Job.user_id == user_id, Job.status == "done",
                               Job.kind.in_(("edit", "morph", "mix", "lineup")))
             .order_by(Job.finished_at.desc(), Job.id.desc()).limit(limit))
    return list(await s.scalars(query))


async def answer_consent(s: AsyncSession, *, job_id: str, owner_id: int, allow: bool,
                         refusal: str = "") -> Job | None:
    """A held job's answer from one person it waits for: allowed (queued once nobody else is
    waited for) or refused (failed with ``refusal``). None when the job does not wait for them."""
    job = await s.get(Job, job_id, with_for_update=True)
    consent = dict(job.consent or {}) if job is not None else {}
    if job is None or job.status != "held" or owner_id not in consent.get("waiting", []):
        return None
    waiting = [u for u in consent["waiting"] if u != owner_id]
    if not allow:
        job.status, job.error, job.error_code, job.finished_at = "failed", refusal, "refused", utcnow()
    else:
        job.consent = {"waiting": waiting, "allowed": [*consent.get("allowed", []), owner_id]}
        if not waiting:
            job.status = "queued"
    await s.flush()
    return job


async def expire_held(s: AsyncSession, *, older_than: datetime, error: str) -> list[str]:
    """Held jobs asked for before ``older_than`` fail with ``error`` (nobody answered in time)."""
    jobs = list(await s.scalars(select(Job).where(Job.status == "held", Job.created_at < older_than)))
    for job in jobs:
        job.status, job.error, job.error_code, job.finished_at = "failed", error, "no_answer", utcnow()
    await s.flush()
    return [job.id for job in jobs]
