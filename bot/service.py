"""The service: commands in, durable jobs out; finished jobs in, replies out.

It owns policy (consent, per-user and per-chat limits, the queue cap) and never imports torch:
the engine runs in its own process and talks to the service only through the jobs table and
the media store. Replies go through the ``deliver`` callback an adapter provides; it returns a
reference to the message it sent, which the service keeps on the job so that progress updates
edit that message in place. Finished jobs' replies go out through :mod:`bot.reply_pump`.
Answers that concern only the asker (refusals, errors, /me, /privacy, /forget) are private.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import storage.repo as repo
from bot import buttons, replies
from bot.commands import (
    Button,
    Command,
    Edit,
    Forget,
    Help,
    Lineup,
    Media,
    Mix,
    Morph,
    Origin,
    Press,
    Reply,
    Selfie,
    SetPrivacy,
    ShowFaces,
    Target,
)
from bot.delivery import DeliveryFailed, RetryPolicy, Undeliverable
from bot.replies import Refusal
from bot.reply_pump import Deliver, ReplyPump
from settings import Config
from storage.media import MediaStore
from storage.models import Job, User, utcnow
from storage.queue import JobQueue
from storage.specs import MORPH_MAX_PEOPLE, EditSpec, InvertSpec, JobSpec, LineupSpec, MixSpec, MorphSpec

__all__ = ["Deliver", "Service"]

log = logging.getLogger("stylebot.service")

_EXPIRY_EVERY_S = 5.0  # how often unanswered consent asks are looked for
_GALLERY_RESULTS = 5  # /me lists this many of the latest results, each with a delete button


class Service:
    def __init__(
        self, *, sessions: async_sessionmaker[AsyncSession], queue: JobQueue, media: MediaStore,
        config: Config, deliver: Deliver, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sessions, self.queue, self.media = sessions, queue, media
        self.config = config
        self.clock = clock
        self._recent: defaultdict[tuple[str, str], deque[float]] = defaultdict(deque)
        self.replies = ReplyPump(sessions=sessions, queue=queue, media=media, deliver=deliver,
                                 policy=RetryPolicy.from_config(config.delivery), clock=clock)

    # --- commands ------------------------------------------------------------------------

    async def handle(self, cmd: Command) -> None:
        """Act on one command. User mistakes get a clear reply; nothing half-stored."""
        try:
            if isinstance(cmd, Help):
                await self.say(cmd.origin, replies.HELP)
            elif isinstance(cmd, Selfie):
                await self._selfie(cmd)
            elif isinstance(cmd, Morph | Mix):
                await self._pair(cmd)
            elif isinstance(cmd, Edit):
                await self._edit(cmd)
            elif isinstance(cmd, Lineup):
                await self._lineup(cmd)
            elif isinstance(cmd, ShowFaces):
                await self._show_faces(cmd)
            elif isinstance(cmd, SetPrivacy):
                await self._privacy(cmd)
            elif isinstance(cmd, Forget):
                await self._forget(cmd)
            elif isinstance(cmd, Press):
                await self._press(cmd)
        except Refusal as refusal:
            await self.say(cmd.origin, str(refusal), private=True)

    async def say(self, origin: Origin, text: str, *, media: tuple[Media, ...] = (),
                  private: bool = False, buttons: tuple[tuple[Button, ...], ...] = ()
                  ) -> dict[str, Any] | None:
        """Answer a command now; None when the platform would not take it (logged in one line)."""
        try:
            return await self.replies.send_now(Reply(reply_to=origin.reply_to, text=text, media=media,
                                                     private=private, buttons=buttons))
        except DeliveryFailed as exc:
            log.warning("could not answer a %s command: %s", origin.platform, exc.reason)
            return None

    async def usernames(self, platform: str) -> list[str]:
        """The names people have on ``platform`` (the web chat checks new ones against them)."""
        async with self.sessions() as s:
            return await repo.usernames(s, platform=platform)

    async def _user_and_chat(self, s: AsyncSession, origin: Origin) -> tuple[User, int]:
        user = await repo.get_or_create_user(
            s, platform=origin.platform, platform_user_id=origin.user_id,
            username=origin.username, display_name=origin.display_name)
        chat = await repo.get_or_create_chat(
            s, platform=origin.platform, platform_chat_id=origin.chat_id, kind=origin.chat_kind,
            title=origin.chat_title)
        await repo.add_member(s, chat_id=chat.id, user_id=user.id)
        return user, chat.id

    def _rate_limit(self, origin: Origin) -> None:
        window = self._recent[(origin.platform, origin.user_id)]
        now = self.clock()
        while window and now - window[0] > 60:
            window.popleft()
        if len(window) >= self.config.limits.per_user_per_minute:
            raise Refusal(replies.RATE_LIMITED)
        window.append(now)

    async def _check_limits(self, s: AsyncSession, user_id: int, chat_id: int) -> None:
        limits = self.config.limits
        if await repo.count_open_jobs(s) >= limits.queue_cap:
            raise Refusal(replies.BUSY)
        if await repo.count_open_jobs(s, user_id=user_id) >= limits.per_user_open_jobs:
            raise Refusal(replies.USER_JOBS_OPEN)
        if await repo.count_open_jobs(s, chat_id=chat_id) >= limits.per_chat_open_jobs:
            raise Refusal(replies.CHAT_JOBS_OPEN)

    async def _submit(self, origin: Origin, spec: JobSpec, user_id: int, chat_id: int,
                      s: AsyncSession, *, waiting_for: Sequence[int] = ()) -> Job:
        await self._check_limits(s, user_id, chat_id)
        return await repo.create_job(
            s, kind=spec.kind, model=self.config.engine.model, payload=spec.payload(), user_id=user_id,
            chat_id=chat_id, reply_to={**origin.reply_to, "group": origin.chat_kind == "group"},
            max_attempts=self.config.queue.max_attempts,
            timeout_s=float(getattr(self.config.timeouts, spec.kind)), waiting_for=waiting_for)

    async def _queued(self, origin: Origin, job: Job, what: str) -> None:
        """The job row is committed: tell the workers and the user; remember the message.

        A chat that cannot be reached gets no result later either; one that cannot take the note
        now gets the result as a new message."""
        async with self.replies.noting(job.id):
            await self.queue.notify([job.id])
            async with self.sessions() as s:
                position = await repo.queue_position(s, job_id=job.id)
                typical = await repo.typical_run_s(s, kind=job.kind)
                running = await repo.count_running(s)
            # Batches of up to batch_size run one after another (after the one running now), each
            # about as long as recent ones of this kind took.
            batches = math.ceil((position + 1) / self.config.engine.batch_size) + (running > 0)
            ready_in = None if typical is None else typical * batches
            try:
                ref = await self.replies.send_now(Reply(reply_to=origin.reply_to,
                                                        text=replies.queued(what, position, ready_in)))
            except Undeliverable as exc:
                await self.replies.not_deliverable(job.id, exc.reason)
                return
            except DeliveryFailed as exc:
                log.info("job %s: the queued note was not sent: %s", job.id, exc.reason)
                return
            if ref is not None:
                async with self.sessions.begin() as s:
                    await repo.set_reply_ref(s, job_id=job.id, ref=ref)

    async def _selfie(self, cmd: Selfie) -> None:
        self._rate_limit(cmd.origin)
        replies.check_photo(cmd.photo)
        label = replies.clean_label(cmd.label)
        async with self.sessions.begin() as s:
            user, chat_id = await self._user_and_chat(s, cmd.origin)
            await self._check_limits(s, user.id, chat_id)
            photo_key = self._store_photo(cmd.photo)
            job = await self._submit(cmd.origin, InvertSpec(photo_key=photo_key, label=label),
                                     user.id, chat_id, s)
        await self._queued(cmd.origin, job, "your selfie")

    def _store_photo(self, photo: bytes) -> str:
        try:
            return self.media.put(photo, suffix=replies.photo_suffix(photo))
        except OSError as exc:  # nothing is half-stored: the caller's transaction rolls back
            log.error("could not store a photo: %s", exc)
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise Refusal(replies.STORAGE_FULL if full else replies.OOPS) from None

    async def _resolve(self, s: AsyncSession, origin: Origin, me: User, target: Target) -> User:
        if target.me:
            return me
        user = None
        if target.user_id is not None:
            user = await repo.find_user(s, platform=origin.platform, platform_user_id=target.user_id)
        elif target.username:
            user = await repo.find_user_by_username(s, platform=origin.platform,
                                                    username=target.username)
        if user is None:
            raise Refusal(replies.unknown_person(target.describe(), origin.platform))
        return user

    async def _consents(self, s: AsyncSession, owner: User, asker: User, chat_id: int) -> bool:
        """Yes without asking (a button press, a lineup: people with privacy "ask" are not asked)."""
        return await repo.consent_of(s, owner=owner, asker_id=asker.id, chat_id=chat_id) == "yes"

    async def _pair(self, cmd: Morph | Mix) -> None:
        self._rate_limit(cmd.origin)
        kind = "morph" if isinstance(cmd, Morph) else "mix"
        if isinstance(cmd, Morph) and not 2 <= cmd.frames <= self.config.limits.morph_max_frames:
            raise Refusal(replies.frames_range(self.config.limits.morph_max_frames))
        async with self.sessions.begin() as s:
            me, chat_id = await self._user_and_chat(s, cmd.origin)
            faces, names, ask = [], [], []
            for target in (cmd.a, cmd.b, *(cmd.more if isinstance(cmd, Morph) else ())):
                person = await self._resolve(s, cmd.origin, me, target)
                face = await repo.latest_face(s, user_id=person.id)
                if face is None:
                    raise Refusal(replies.no_face_for(target.describe()))
                consent = await repo.consent_of(s, owner=person, asker_id=me.id, chat_id=chat_id)
                if consent == "no":
                    raise Refusal(replies.no_consent(target.describe()))
                if consent == "ask" and person not in ask:
                    ask.append(person)
                faces.append(face)
                names.append(replies.person_name(person))
            if len({f.id for f in faces}) < len(faces):
                raise Refusal(replies.same_face(kind))
            spec: JobSpec
            if isinstance(cmd, Morph):
                # A tour's legs share the frames a two-face morph may have there and back.
                frames = cmd.frames if len(faces) == 2 else min(
                    cmd.frames, max(2, 2 * self.config.limits.morph_max_frames // len(faces)))
                spec = MorphSpec(a_id=faces[0].id, b_id=faces[1].id, layers=cmd.layers,
                                 frames=frames, format=cmd.fmt, names=names,
                                 more_ids=[f.id for f in faces[2:]] or None)
            else:
                spec = MixSpec(a_id=faces[0].id, b_id=faces[1].id, layers=cmd.layers, names=names)
            job = await self._submit(cmd.origin, spec, me.id, chat_id, s,
                                     waiting_for=[p.id for p in ask])
        if not ask:
            await self._queued(cmd.origin, job, "the morph" if kind == "morph" else "the mix")
            return
        wait_min = max(1, round(self.config.limits.consent_wait_s / 60))
        for person in ask:  # asked here, where the asker is: only they can press the buttons
            await self.say(cmd.origin, replies.ask_consent(person, me, kind, wait_min),
                           buttons=buttons.consent_buttons(job.id, replies.person_name(me)))

    async def _edit(self, cmd: Edit) -> None:
        self._rate_limit(cmd.origin)
        text = replies.clean_text(cmd.text, max_chars=self.config.limits.text_max_chars)
        async with self.sessions.begin() as s:
            me, chat_id = await self._user_and_chat(s, cmd.origin)
            face = await repo.latest_face(s, user_id=me.id, label=cmd.label)
            if face is None:
                raise Refusal(replies.NO_OWN_FACE)
            spec = EditSpec(face_id=face.id, text=text, method=cmd.method, strength=cmd.strength)
            job = await self._submit(cmd.origin, spec, me.id, chat_id, s)
        await self._queued(cmd.origin, job, "the edit")

    async def _lineup(self, cmd: Lineup) -> None:
        """Up to MORPH_MAX_PEOPLE of the latest faces shared in the chat whose owners allow it."""
        self._rate_limit(cmd.origin)
        text = replies.clean_text(cmd.text, max_chars=self.config.limits.text_max_chars)
        async with self.sessions.begin() as s:
            me, chat_id = await self._user_and_chat(s, cmd.origin)
            people = [(face, owner) for face, owner in await repo.faces_shared_in(s, chat_id=chat_id)
                      if await self._consents(s, owner, me, chat_id)][:MORPH_MAX_PEOPLE]
            if not people:
                raise Refusal(replies.LINEUP_NOBODY)
            spec = LineupSpec(face_ids=[f.id for f, _ in people], text=text, strength=cmd.strength,
                              names=[replies.person_name(owner) for _, owner in people])
            job = await self._submit(cmd.origin, spec, me.id, chat_id, s)
        await self._queued(cmd.origin, job, "the lineup")

    async def _press(self, cmd: Press) -> None:
        """A button under a result: the job it asks for, checked as a typed command would be.
        Buttons that start no job of the presser's own (delete, answers, the people list) are not
        counted against the rate limit; a person's button counts as the /morph it is."""
        decoded = buttons.decode(cmd.data)
        if decoded is not None and decoded[1] == buttons.DELETE:
            await self._delete_item(cmd, decoded[0])
            return
        if decoded is not None and decoded[1] in buttons.CONSENT_ACTIONS:
            await self._answer(cmd, decoded[0], decoded[1])
            return
        if decoded is not None and (decoded[1] == buttons.MORPH_WITH or buttons.person_of(decoded[1])):
            await self._morph_with(cmd, decoded[0], buttons.person_of(decoded[1]))
            return
        self._rate_limit(cmd.origin)
        async with self.sessions.begin() as s:
            job = await repo.get_job(s, decoded[0]) if decoded else None
            spec = buttons.follow_up(job, decoded[1], max_frames=self.config.limits.morph_max_frames) \
                if job is not None and decoded else None
            if job is None or spec is None:
                raise Refusal(replies.BUTTON_STALE)
            me, chat_id = await self._user_and_chat(s, cmd.origin)
            for face_id in _faces_of(spec):
                face = await repo.get_face(s, face_id)
                owner = await repo.get_user(s, face.user_id) if face is not None else None
                if owner is None:
                    raise Refusal(replies.BUTTON_STALE)
                if owner.id == me.id:
                    continue
                if isinstance(spec, EditSpec):  # an edit is its owner's: like /edit, of your face
                    raise Refusal(replies.BUTTON_NOT_YOURS)
                if not await self._consents(s, owner, me, chat_id):  # checked again, as /morph does
                    raise Refusal(replies.no_consent(f"@{owner.username}" if owner.username
                                                     else "someone in it"))
            new = await self._submit(cmd.origin, spec, me.id, chat_id, s)
        await self._queued(cmd.origin, new, "the morph" if isinstance(spec, MorphSpec) else "the edit")

    async def _show_faces(self, cmd: ShowFaces) -> None:
        """The user's gallery: faces and latest results (pictures), then the list with a delete
        button for each."""
        async with self.sessions.begin() as s:
            me, _ = await self._user_and_chat(s, cmd.origin)
            faces = await repo.list_faces(s, user_id=me.id)
            results = await repo.recent_results(s, user_id=me.id, limit=_GALLERY_RESULTS)
            text = replies.gallery_text(faces, results, me.privacy)
            media = tuple(replies.face_media(self.media, f) for f in faces[:4])
            items = [(f"face {f.label}", f.job_id) for f in faces if f.job_id] + \
                [(f"result {i}", job.id) for i, job in enumerate(results, 1)]
        if media:
            await self.say(cmd.origin, "Your faces:", media=media, private=True)
        await self.say(cmd.origin, text, private=True, buttons=buttons.delete_buttons(items))

    async def _morph_with(self, cmd: Press, job_id: str, person_id: int | None) -> None:
        """Under a new face or an edit: "Morph with..." lists the people here who shared a face (a
        button each); a press on one is /morph @me @them."""
        async with self.sessions.begin() as s:
            job = await repo.get_job(s, job_id)
            if job is None or job.kind not in ("invert", "edit") or job.status != "done":
                raise Refusal(replies.BUTTON_STALE)
            me, chat_id = await self._user_and_chat(s, cmd.origin)
            if job.user_id != me.id:
                raise Refusal(replies.BUTTON_NOT_YOURS)
            if person_id is not None:
                other = await repo.get_user(s, person_id)
                if other is None:
                    raise Refusal(replies.BUTTON_STALE)
                target = Target(user_id=other.platform_user_id, username=other.username)
            else:
                people = [(owner.id, replies.person_name(owner))
                          for _, owner in await repo.faces_shared_in(s, chat_id=chat_id)
                          if owner.id != me.id and await repo.consent_of(
                              s, owner=owner, asker_id=me.id, chat_id=chat_id) != "no"]
        if person_id is not None:
            await self._pair(Morph(origin=cmd.origin, a=Target(me=True), b=target))
        elif not people:
            await self.say(cmd.origin, replies.NOBODY_TO_MORPH_WITH, private=True)
        else:
            await self.say(cmd.origin, replies.MORPH_WITH_WHOM,
                           buttons=buttons.people_buttons(job_id, people[:MORPH_MAX_PEOPLE]))

    async def _answer(self, cmd: Press, job_id: str, action: str) -> None:
        """Allow once, always allow, or deny: the answer of someone a held job asked."""
        async with self.sessions.begin() as s:
            me = await repo.find_user(s, platform=cmd.origin.platform, platform_user_id=cmd.origin.user_id)
            job = await repo.get_job(s, job_id)
            if job is None or job.status != "held":
                raise Refusal(replies.BUTTON_STALE)
            if me is None or me.id not in (job.consent or {}).get("waiting", []):
                raise Refusal(replies.NOT_YOURS_TO_ANSWER)
            answered = await repo.answer_consent(s, job_id=job_id, owner_id=me.id, allow=action != "deny",
                                                 refusal=replies.said_no(replies.person_name(me)))
            if answered is not None and action == "always" and job.user_id is not None:
                await repo.always_allow(s, owner_id=me.id, grantee_id=job.user_id)
        if answered is not None and answered.status == "queued":
            await self.queue.notify([job_id])
        await self.say(cmd.origin, replies.ANSWERED[action], private=True)

    async def expire_asks(self) -> None:
        """Held jobs nobody answered in ``[limits] consent_wait_s`` fail (their askers are told)."""
        wait = self.config.limits.consent_wait_s
        async with self.sessions.begin() as s:
            expired = await repo.expire_held(s, older_than=utcnow() - timedelta(seconds=wait),
                                             error=replies.no_answer(max(1, round(wait / 60))))
        if expired:
            await self.queue.announce(expired)

    async def _delete_item(self, cmd: Press, job_id: str) -> None:
        """A gallery item's delete button: that face or result, its files and rows, gone."""
        async with self.sessions.begin() as s:
            me = await repo.find_user(s, platform=cmd.origin.platform, platform_user_id=cmd.origin.user_id)
            keys = await repo.erase_item(s, job_id=job_id, user_id=me.id) if me is not None else None
        if keys is None:  # not theirs, or gone already: nothing said about whose it is
            raise Refusal(replies.BUTTON_STALE)
        await self._delete_orphans(keys)
        await self.say(cmd.origin, replies.DELETED, private=True)

    async def _delete_orphans(self, keys: list[str]) -> None:
        """Erased rows' files, keeping those another row still names (the same photo may be
        someone else's too)."""
        async with self.sessions() as s:
            orphans = await repo.orphaned_media_keys(s, keys=keys)
        for key in orphans:
            self.media.delete(key)

    async def _privacy(self, cmd: SetPrivacy) -> None:
        async with self.sessions.begin() as s:
            me, _ = await self._user_and_chat(s, cmd.origin)
            if cmd.policy is not None:
                await repo.set_privacy(s, user_id=me.id, policy=cmd.policy)
            policy = cmd.policy or me.privacy
        await self.say(cmd.origin, replies.privacy_text(policy), private=True)

    async def _forget(self, cmd: Forget) -> None:
        if not cmd.confirmed:
            await self.say(cmd.origin, replies.FORGET_CONFIRM, private=True)
            return
        async with self.sessions.begin() as s:
            user = await repo.find_user(s, platform=cmd.origin.platform,
                                        platform_user_id=cmd.origin.user_id)
            keys = await repo.forget_user(s, user_id=user.id) if user is not None else []
        await self._delete_orphans(keys)
        await self.say(cmd.origin, replies.FORGOTTEN, private=True)

    # --- completions -----------------------------------------------------------------------

    async def pump_once(self, *, stop: asyncio.Event | None = None) -> int:
        """Send the replies and progress edits that are due; returns replies delivered."""
        return await self.replies.pump_once(stop=stop)

    async def run(self, stop: asyncio.Event) -> None:
        """Send replies and progress until ``stop`` (:class:`bot.reply_pump.ReplyPump`); meanwhile
        end the asks nobody answered in time."""
        expiry = asyncio.create_task(self._expire_asks_until(stop))
        try:
            await self.replies.run(stop)
        finally:
            expiry.cancel()

    async def _expire_asks_until(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.expire_asks()
            except Exception:
                log.exception("could not end the unanswered consent asks; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _EXPIRY_EVERY_S)


def _faces_of(spec: JobSpec) -> list[int]:
    """The saved faces a job would use."""
    if isinstance(spec, EditSpec):
        return [spec.face_id]
    if isinstance(spec, MorphSpec):
        return [spec.a_id, spec.b_id, *(spec.more_ids or [])]
    if isinstance(spec, MixSpec):
        return [spec.a_id, spec.b_id]
    if isinstance(spec, LineupSpec):
        return list(spec.face_ids)
    return []
