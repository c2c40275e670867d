"""Chat text -> command dataclasses, the same on every platform (no torch, no platform code).

Adapters hand in the message text, the photo bytes when there is one, and the person a message
replies to; they get back a :class:`~bot.commands.Command` or a :class:`~bot.replies.Refusal`
carrying the reply text.
"""

from __future__ import annotations

import re

from bot import replies
from bot.commands import (
    Command,
    Edit,
    Forget,
    Help,
    Lineup,
    Mix,
    Morph,
    Origin,
    Selfie,
    SetPrivacy,
    ShowFaces,
    Target,
)
from bot.replies import Refusal
from storage.specs import MORPH_FRAMES, MORPH_MAX_PEOPLE

__all__ = ["COMMANDS", "parse"]

# name -> one-line description (the platforms' command menus use this too).
COMMANDS: dict[str, str] = {
    "start": "What I can do",
    "help": "What I can do",
    "selfie": "Save your face from a photo: /selfie [label]",
    "edit": "Edit your face with words: /edit smiling face [strength]",
    "morph": "Animate between faces: /morph @me @friend [@more...] [frames] [gif|mp4]",
    "mix": "Style mixing: /mix @a @b coarse|middle|fine",
    "lineup": "Everyone here with one edit: /lineup smiling face [strength]",
    "me": "Your saved faces",
    "privacy": "Who may use your face: /privacy everyone|chat|ask|nobody",
    "forget": "Erase everything about you",
}

_COMMAND = re.compile(r"^/(?P<name>[A-Za-z_]+)(?P<bang>!?)(?:@(?P<bot>\w+))?(?:\s+(?P<rest>.*))?$",
                      re.DOTALL)
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


def _target(word: str, me_words: frozenset[str] = frozenset({"me", "@me", "myself"})) -> Target:
    if word.lower() in me_words:
        return Target(me=True)
    if word.startswith("@") and len(word) > 1:
        return Target(username=word[1:])
    if word.startswith("<@") and word.endswith(">"):  # Discord's mentions, Telegram's text mentions
        return Target(user_id=word.strip("<@!>"))
    raise Refusal(replies.NOT_A_PERSON.format(word[:40]))


def _people(words: list[str], reply_target: Target | None, most: int = 2
            ) -> tuple[list[Target], list[str]]:
    """Two to ``most`` people named in ``words`` (a reply names the second), and the other words."""
    people = [w for w in words if w.startswith(("@", "<@")) or w.lower() in ("me", "myself")]
    rest = [w for w in words if w not in people]
    targets = [_target(w) for w in people]
    if len(targets) == 1 and reply_target is not None:
        targets.append(reply_target)
    elif not targets and reply_target is not None:
        targets = [Target(me=True), reply_target]
    if len(targets) < 2:
        raise Refusal(replies.NAME_TWO_PEOPLE)
    if len(targets) > most:
        raise Refusal(replies.NAME_TWO_PEOPLE if most == 2 else replies.too_many_people(most))
    return targets, rest


def parse(
    text: str, *, origin: Origin, photo: bytes | None = None, reply_target: Target | None = None,
    bot_username: str | None = None,
) -> Command | None:
    """The command in a message, or None when the message is not for the bot.

    A photo without a command is a selfie in a private chat (in groups it needs /selfie or a
    mention, which the adapter decides). Raises Refusal with the text to reply for mistakes.
    """
    text = (text or "").strip()
    m = _COMMAND.match(text)
    if m is None:
        if photo is not None and origin.chat_kind == "private":
            return Selfie(origin=origin, photo=photo)
        return None
    if m["bot"] and bot_username and m["bot"].lower() != bot_username.lower():
        return None  # addressed to another bot in the group
    name, rest = m["name"].lower(), (m["rest"] or "").strip()
    words = rest.split()
    if name in ("start", "help"):
        return Help(origin=origin)
    if name == "selfie":
        if photo is None:
            raise Refusal(replies.SELFIE_NEEDS_A_PHOTO)
        return Selfie(origin=origin, photo=photo, label=words[0] if words else "default")
    if name in ("edit", "lineup"):
        strength = None
        if len(words) > 1 and _NUMBER.match(words[-1]):
            strength = float(words[-1])
            if not -10 <= strength <= 10:
                raise Refusal(replies.STRENGTH_RANGE)
            words = words[:-1]
        if name == "lineup":
            if not words:
                raise Refusal(replies.LINEUP_NEEDS_TEXT)
            return Lineup(origin=origin, text=" ".join(words), strength=strength)
        return Edit(origin=origin, text=" ".join(words), strength=strength,
                    method="optimize" if m["bang"] else "global")
    if name == "morph":
        (a, b, *more), extra = _people(words, reply_target, most=MORPH_MAX_PEOPLE)
        frames, fmt = MORPH_FRAMES, "mp4"
        for word in extra:
            if word.isdigit():
                frames = int(word)
            elif word.lower() in ("gif", "mp4"):
                fmt = word.lower()
            else:
                raise Refusal(replies.NOT_A_MORPH_OPTION.format(word[:40]))
        return Morph(origin=origin, a=a, b=b, frames=frames, fmt=fmt,  # type: ignore[arg-type]
                     more=tuple(more))
    if name == "mix":
        (a, b), extra = _people(words, reply_target)
        layers = (extra[0].lower() if extra else "coarse")
        if layers not in ("coarse", "middle", "fine") or len(extra) > 1:
            raise Refusal(replies.MIX_LAYERS)
        return Mix(origin=origin, a=a, b=b, layers=layers)  # type: ignore[arg-type]
    if name == "me":
        return ShowFaces(origin=origin)
    if name == "forget":
        return Forget(origin=origin, confirmed=rest.lower() in ("yes", "y", "confirm"))
    if name == "privacy":
        if not words:
            return SetPrivacy(origin=origin)
        if words[0].lower() not in ("everyone", "chat", "ask", "nobody"):
            raise Refusal(replies.PRIVACY_POLICIES)
        return SetPrivacy(origin=origin, policy=words[0].lower())  # type: ignore[arg-type]
    raise Refusal(replies.UNKNOWN_COMMAND.format(name[:32]))
