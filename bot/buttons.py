"""Buttons under results: which a finished job offers, and the job a press asks for.

A button carries ids only, ``"b1 <job id> <action>"`` (Telegram allows 64 bytes): the service
looks the job up and checks the presser may use its faces, as for a typed command, so a forged or
stale press is refused cleanly and a button never carries anything a user could change.
"""

from __future__ import annotations

import re
from dataclasses import replace

from bot import replies
from bot.commands import Button
from storage.models import Job
from storage.specs import EditSpec, JobSpec, MorphSpec

__all__ = [
    "CONSENT_ACTIONS",
    "DELETE",
    "MORPH_WITH",
    "consent_buttons",
    "STRENGTH_LIMIT",
    "STRENGTH_STEP",
    "buttons_for",
    "decode",
    "delete_buttons",
    "encode",
    "follow_up",
    "people_buttons",
    "person_of",
]

STRENGTH_STEP = 2.0  # weaker / stronger move a global edit's strength by this
STRENGTH_LIMIT = 10.0  # as /edit's strength: -10..10
_PREFIX = "b1"
_DATA = re.compile(r"b1 ([0-9a-f]{32}) ([a-z]+|p[0-9]{1,12})")  # p<id>: a person, for "Morph with..."
# One-tap edits under a new face: action -> the words, as /edit would get them.
SELFIE_EDITS = {"smile": "a smiling face", "older": "an old face", "younger": "a young face",
                "glasses": "a face with glasses"}
_EDIT_ACTIONS = ("weaker", "stronger", "thorough")
_MORPH_ACTIONS = ("gif", "mp4", "reverse", "slower", "faster")
DELETE = "delete"  # under a gallery item (/me): erase that one face or result
MORPH_WITH = "morphwith"  # under a new face: whom to morph with (a button for each person)
CONSENT_ACTIONS = ("allow", "always", "deny")  # under a consent ask, for the person asked


def encode(job_id: str, action: str) -> str:
    return f"{_PREFIX} {job_id} {action}"


def decode(data: str) -> tuple[str, str] | None:
    """(job id, action) from a button's data; None for anything a button of ours never sends."""
    m = _DATA.fullmatch(data or "")
    return (m[1], m[2]) if m else None


def _row(job: Job, actions: list[str]) -> tuple[Button, ...]:
    return tuple(Button(replies.BUTTON_LABELS[a], encode(job.id, a)) for a in actions)


def buttons_for(job: Job) -> tuple[tuple[Button, ...], ...]:
    """The buttons under a finished job's result (none for a failed one)."""
    if job.status != "done":
        return ()
    result = job.result or {}
    if job.kind == "invert":
        return (_row(job, list(SELFIE_EDITS)), _row(job, [MORPH_WITH]))
    if job.kind == "edit":
        if result.get("method") == "global":
            return (_row(job, list(_EDIT_ACTIONS)), _row(job, [MORPH_WITH]))
        return (_row(job, [MORPH_WITH]),)
    if job.kind == "morph":
        other = "gif" if result.get("format", "mp4") == "mp4" else "mp4"
        return (_row(job, [other, "reverse", "slower", "faster"]),)
    return ()


def people_buttons(job_id: str, people: list[tuple[int, str]]) -> tuple[tuple[Button, ...], ...]:
    """One button per person (user id, name), for "Morph with...": three to a row."""
    row = [Button(name[:40], encode(job_id, f"p{user_id}")) for user_id, name in people]
    return tuple(tuple(row[i:i + 3]) for i in range(0, len(row), 3))


def person_of(action: str) -> int | None:
    """The user id a person button carries; None for other actions."""
    return int(action[1:]) if action.startswith("p") and action[1:].isdigit() else None


def consent_buttons(job_id: str, asker: str) -> tuple[tuple[Button, ...], ...]:
    """Allow once / Always allow <asker> / Deny, under the ask for a held job."""
    labels = {"allow": "Allow once", "always": f"Always allow {asker}"[:60], "deny": "Deny"}
    return (tuple(Button(labels[a], encode(job_id, a)) for a in CONSENT_ACTIONS),)


def delete_buttons(items: list[tuple[str, str]]) -> tuple[tuple[Button, ...], ...]:
    """One delete button per gallery item, (label, job id) each: two to a row."""
    row = [Button(f"Delete {label}", encode(job_id, DELETE)) for label, job_id in items]
    return tuple(tuple(row[i:i + 2]) for i in range(0, len(row), 2))


def follow_up(job: Job, action: str, *, max_frames: int) -> JobSpec | None:
    """The job a press of ``action`` under ``job``'s result asks for; None when that button does
    not belong under this result (a forged press, or a result that no longer offers it)."""
    if job.status != "done" or action not in {b.data.split()[-1] for row in buttons_for(job) for b in row}:
        return None
    result = job.result or {}
    spec = job.spec
    if job.kind == "invert" and action in SELFIE_EDITS:
        face_id = result.get("face_id")
        return EditSpec(face_id=int(face_id), text=SELFIE_EDITS[action]) if face_id is not None else None
    if isinstance(spec, EditSpec):
        if action == "thorough":
            return replace(spec, method="optimize", strength=None)
        used = float(result.get("strength", spec.strength or 0.0))
        step = STRENGTH_STEP if action == "stronger" else -STRENGTH_STEP
        return replace(spec, strength=max(-STRENGTH_LIMIT, min(STRENGTH_LIMIT, used + step)))
    if isinstance(spec, MorphSpec):
        if action in ("gif", "mp4"):
            return replace(spec, format="gif" if action == "gif" else "mp4")
        if action == "reverse":
            ids = [spec.a_id, spec.b_id, *(spec.more_ids or [])][::-1]
            return replace(spec, a_id=ids[0], b_id=ids[1], more_ids=ids[2:] or None,
                           names=spec.names[::-1] if spec.names else None)
        frames = spec.frames * 2 if action == "slower" else spec.frames // 2
        return replace(spec, frames=max(2, min(max_frames, frames)))
    return None
