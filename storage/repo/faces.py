"""Faces (latents and their media), sharing in chats, media references and erasure."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
from sqlalchemy import delete, exists, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.media import is_media_key
from storage.models import ChatMember, ConsentGrant, Face, FaceShare, Job, User, utcnow
from storage.repo._util import expunge_where, insert_ignore, media_keys_in, plain_json

__all__ = [
    "erase_item",
    "face_media_keys",
    "faces_shared_in",
    "forget_user",
    "get_face",
    "latent_of",
    "latest_face",
    "list_faces",
    "always_allow",
    "consent_of",
    "orphaned_media_keys",
    "referenced_media_keys",
    "save_face",
    "share_face",
    "shared_in_chat",
]

_LATENT_DTYPE = np.dtype("<f4")  # stored little-endian whatever the host, C order


def _latent_bytes(latent: np.ndarray) -> tuple[bytes, int, int]:
    array = np.asarray(latent)
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"a latent is [num_ws, w_dim]; got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"a latent holds floats; got dtype {array.dtype}")
    num_ws, w_dim = array.shape
    return np.ascontiguousarray(array, dtype=_LATENT_DTYPE).tobytes(order="C"), int(num_ws), int(w_dim)


def latent_of(face: Face) -> np.ndarray:
    """The face's latent, [num_ws, w_dim] float32 (native order, writeable), bit-exact as saved."""
    expected = face.num_ws * face.w_dim * _LATENT_DTYPE.itemsize
    if len(face.latent) != expected:
        raise ValueError(f"face {face.id}: latent has {len(face.latent)} bytes, expected {expected}")
    flat = np.frombuffer(face.latent, dtype=_LATENT_DTYPE)
    return flat.astype(np.float32).reshape(face.num_ws, face.w_dim)  # astype copies


def face_media_keys(face: Face) -> set[str]:
    """The media keys a face row references."""
    return {face.aligned_key, face.photo_key, face.reconstruction_key}


async def save_face(
    s: AsyncSession, *, job_id: str | None, user_id: int, label: str, model_id: str, latent: np.ndarray,
    aligned_key: str, photo_key: str, reconstruction_key: str, alignment: dict[str, Any],
    quality: dict[str, Any],
) -> Face:
    """Store the result of an inversion as the user's face called ``label``.

    Idempotent by ``job_id``: when a face from that job exists it is returned unchanged. A face
    with the same (user, label) is replaced in place (same id, so its shares and queued jobs
    that name it stay valid). The files the old version referenced may now be orphans: take
    ``face_media_keys(old)`` before and ``orphaned_media_keys`` after (or let ``sweep`` do it).
    """
    for name, key in (("aligned_key", aligned_key), ("photo_key", photo_key),
                      ("reconstruction_key", reconstruction_key)):
        if not is_media_key(key):
            raise ValueError(f"{name} is not a media key: {key!r}")
    if job_id is not None:
        done = await s.scalar(select(Face).where(Face.job_id == job_id))
        if done is not None:
            return done
    data, num_ws, w_dim = _latent_bytes(latent)
    fields: dict[str, Any] = {
        "model_id": model_id, "latent": data, "num_ws": num_ws, "w_dim": w_dim,
        "aligned_key": aligned_key, "photo_key": photo_key, "reconstruction_key": reconstruction_key,
        "alignment": plain_json(alignment), "quality": plain_json(quality), "job_id": job_id,
        "created_at": utcnow(),
    }
    face = await s.scalar(select(Face).where(Face.user_id == user_id, Face.label == label))
    if face is None:
        face = Face(user_id=user_id, label=label, **fields)
        s.add(face)
    else:
        for name, value in fields.items():
            setattr(face, name, value)
    await s.flush()
    return face


async def get_face(s: AsyncSession, face_id: int) -> Face | None:
    return await s.get(Face, face_id)


async def latest_face(s: AsyncSession, *, user_id: int, label: str | None = None) -> Face | None:
    """The user's face called ``label``; without a label, the most recently saved one."""
    query = select(Face).where(Face.user_id == user_id)
    if label is not None:
        query = query.where(Face.label == label)
    return await s.scalar(query.order_by(Face.created_at.desc(), Face.id.desc()).limit(1))


async def list_faces(s: AsyncSession, *, user_id: int) -> list[Face]:
    """The user's faces, most recent first."""
    query = select(Face).where(Face.user_id == user_id).order_by(Face.created_at.desc(), Face.id.desc())
    return list(await s.scalars(query))


async def share_face(s: AsyncSession, *, face_id: int, chat_id: int) -> None:
    """Make the face visible to ``/morph`` and ``/mix`` in the chat (idempotent)."""
    await insert_ignore(s, FaceShare, {"face_id": face_id, "chat_id": chat_id, "created_at": utcnow()},
                        ["face_id", "chat_id"])


async def shared_in_chat(s: AsyncSession, *, user_id: int, chat_id: int) -> bool:
    """Whether any face of the user is shared in the chat."""
    query = (exists().where(FaceShare.face_id == Face.id, Face.user_id == user_id,
                            FaceShare.chat_id == chat_id))
    return bool(await s.scalar(select(query)))


async def faces_shared_in(s: AsyncSession, *, chat_id: int) -> list[tuple[Face, User]]:
    """Each person's latest face shared in the chat, with its owner, most recent first."""
    rows = await s.execute(select(Face, User).join(FaceShare, FaceShare.face_id == Face.id)
                           .join(User, User.id == Face.user_id).where(FaceShare.chat_id == chat_id)
                           .order_by(Face.created_at.desc(), Face.id.desc()))
    seen: set[int] = set()
    out = []
    for face, user in rows:
        if user.id not in seen:
            seen.add(user.id)
            out.append((face, user))
    return out


async def consent_of(s: AsyncSession, *, owner: User, asker_id: int | None, chat_id: int | None,
                     allowed: Iterable[int] = ()) -> Literal["yes", "no", "ask"]:
    """Whether ``owner``'s privacy lets the asker put their face in a morph, mix or lineup in the
    chat: the owner always; anyone under "everyone"; under "chat" anyone in a chat where the owner
    shared a face; under "ask" those they always allow, or (``allowed``) allowed for this job, else
    "ask"; never under "nobody". Checked when the job is asked for and again when it starts."""
    if owner.id == asker_id or owner.privacy == "everyone":
        return "yes"
    if owner.privacy == "ask":
        granted = asker_id is not None and await s.get(ConsentGrant, (owner.id, asker_id)) is not None
        return "yes" if granted or owner.id in set(allowed) else "ask"
    if owner.privacy == "nobody" or chat_id is None:
        return "no"
    return "yes" if await shared_in_chat(s, user_id=owner.id, chat_id=chat_id) else "no"


async def always_allow(s: AsyncSession, *, owner_id: int, grantee_id: int) -> None:
    """``grantee`` may use ``owner``'s faces from now on without asking (idempotent)."""
    await insert_ignore(s, ConsentGrant, {"owner_id": owner_id, "grantee_id": grantee_id,
                                          "created_at": utcnow()}, ("owner_id", "grantee_id"))


async def _face_keys(s: AsyncSession, *where: Any) -> set[str]:
    rows = await s.execute(select(Face.aligned_key, Face.photo_key, Face.reconstruction_key).where(*where))
    return {key for row in rows for key in row}


async def _job_keys(s: AsyncSession, *where: Any) -> set[str]:
    rows = await s.execute(select(Job.payload, Job.result, Job.progress_info).where(*where))
    return {key for row in rows for key in media_keys_in(list(row))}


async def referenced_media_keys(s: AsyncSession) -> set[str]:
    """Every media key some row still references: faces, and jobs' payloads, results and progress
    (first looks) under keys ending in ``_key`` / ``_keys``. Pass it to ``MediaStore.sweep``."""
    return await _face_keys(s) | await _job_keys(s)


async def orphaned_media_keys(s: AsyncSession, *, keys: Iterable[str]) -> set[str]:
    """The ``keys`` that no row references any more (content-addressed files can be shared by
    several faces and jobs, so a file is deleted only when none of them needs it)."""
    candidates = {key for key in keys if is_media_key(key)}
    return candidates - await referenced_media_keys(s) if candidates else set()


_FACE_REFS = ("face_id", "a_id", "b_id")  # where job payloads name the faces they use (and lists)


def _faces_used(payload: dict[str, Any]) -> set[Any]:
    return ({payload.get(ref) for ref in _FACE_REFS} | set(payload.get("more_ids") or ())
            | set(payload.get("face_ids") or ()))


async def _erase_jobs_using(s: AsyncSession, face_ids: set[int], *, user_id: int) -> set[str]:
    """Other users' morphs and mixes made from these faces: finished ones are deleted (their
    results show the face), unfinished ones fail with a reason (their owners get a reply).
    Returns the media keys the deleted rows referenced."""
    if not face_ids:
        return set()
    jobs = await s.scalars(select(Job).where(Job.user_id != user_id,
                                             Job.kind.in_(("morph", "mix", "lineup"))))
    using = [j for j in jobs if face_ids & _faces_used(j.payload)]
    keys: set[str] = set()
    for job in using:
        if job.status in ("held", "queued", "running"):
            job.status, job.error_code, job.finished_at = "failed", "erased", utcnow()
            job.error = "one of the faces was erased at its owner's request"
            job.lease_owner = job.lease_until = None
        else:
            keys |= media_keys_in([job.payload, job.result, job.progress_info])
            await s.delete(job)
    return keys


async def forget_user(s: AsyncSession, *, user_id: int) -> list[str]:
    """Delete the user and, by cascade, their faces, shares, memberships and jobs.

    Returns (sorted) every media key those rows referenced. The caller deletes the files after
    the commit, keeping any that ``referenced_media_keys`` still lists (the same photo can be
    someone else's too). A missing user: nothing happens, [] is returned.
    """
    # A write comes first: SELECTs alone do not start the transaction on SQLite, so an engine could
    # commit a result between reading the keys and deleting the rows, and its files would be missed.
    # From this write on no other writer commits before ours (PostgreSQL: the user's open jobs stay
    # locked, after waiting for a worker that holds one), so the keys read below are complete.
    await s.execute(update(Job).where(Job.user_id == user_id, Job.status.in_(("queued", "running")))
                    .values(status="failed", error_code="erased", lease_owner=None, lease_until=None)
                    .execution_options(synchronize_session=False))
    keys = await _face_keys(s, Face.user_id == user_id) | await _job_keys(s, Job.user_id == user_id)
    face_ids = set(await s.scalars(select(Face.id).where(Face.user_id == user_id)))
    keys |= await _erase_jobs_using(s, face_ids, user_id=user_id)
    await s.execute(delete(User).where(User.id == user_id))  # ON DELETE CASCADE does the rest
    expunge_where(s, (Face, Job, ChatMember), "user_id", {user_id})
    expunge_where(s, (FaceShare,), "face_id", face_ids)
    await s.flush()
    return sorted(keys)


async def erase_item(s: AsyncSession, *, job_id: str, user_id: int) -> list[str] | None:
    """Delete one finished job of the user's (a gallery item) and what it made: its face (shares
    by cascade) and, as ``forget_user`` does, other people's morphs and mixes of that face. A face
    whose job row is gone is found by the job id it keeps.

    None when the user has no such finished job or face. Returns (sorted) the media keys the deleted rows
    referenced; the caller deletes the files after the commit, keeping those still referenced."""
    job = await s.get(Job, job_id)
    if job is not None and (job.user_id != user_id or job.status not in ("done", "failed")):
        return None
    faces = list(await s.scalars(select(Face).where(Face.job_id == job_id, Face.user_id == user_id)))
    if job is None and not faces:
        return None
    keys = media_keys_in([job.payload, job.result, job.progress_info]) if job is not None else set()
    for face in faces:
        keys |= face_media_keys(face)
    face_ids = {face.id for face in faces}
    keys |= await _erase_jobs_using(s, face_ids, user_id=user_id)
    await s.execute(delete(Face).where(Face.id.in_(face_ids)))
    expunge_where(s, (Face,), "id", face_ids)
    expunge_where(s, (FaceShare,), "face_id", face_ids)
    if job is not None:
        await s.delete(job)
    await s.flush()
    return sorted(keys)
