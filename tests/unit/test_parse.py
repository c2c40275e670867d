"""Chat text is understood the same way on every platform."""

from __future__ import annotations

import pytest

from bot.commands import Edit, Forget, Help, Lineup, Mix, Morph, Origin, Selfie, SetPrivacy, ShowFaces, Target
from bot.parse import parse
from bot.replies import Refusal

DM = Origin(platform="t", user_id="1", chat_id="1", chat_kind="private")
GROUP = Origin(platform="t", user_id="1", chat_id="g", chat_kind="group")


def test_commands() -> None:
    assert isinstance(parse("/start", origin=DM), Help)
    assert parse("/edit smiling face", origin=DM) == Edit(origin=DM, text="smiling face")
    assert parse("/edit smiling face 3.5", origin=DM) == Edit(origin=DM, text="smiling face", strength=3.5)
    assert parse("/edit! beard", origin=DM) == Edit(origin=DM, text="beard", method="optimize")
    assert parse("/morph @me @Bob 16 gif", origin=GROUP) == Morph(
        origin=GROUP, a=Target(me=True), b=Target(username="Bob"), frames=16, fmt="gif")
    assert parse("/mix@stylebot @a @b fine", origin=GROUP, bot_username="StyleBot") == Mix(
        origin=GROUP, a=Target(username="a"), b=Target(username="b"), layers="fine")
    assert parse("/morph @a @b @c <@7> 12", origin=GROUP) == Morph(  # a group tour
        origin=GROUP, a=Target(username="a"), b=Target(username="b"), frames=12,
        more=(Target(username="c"), Target(user_id="7")))
    with pytest.raises(Refusal, match="at most 8 faces"):
        parse("/morph " + " ".join(f"@p{i}" for i in range(9)), origin=GROUP)
    with pytest.raises(Refusal, match="Name two people"):
        parse("/mix @a @b @c coarse", origin=GROUP)  # a mix is of two
    assert parse("/lineup smiling face 3", origin=GROUP) == Lineup(origin=GROUP, text="smiling face",
                                                                   strength=3.0)
    with pytest.raises(Refusal, match="Say what to change"):
        parse("/lineup", origin=GROUP)
    assert isinstance(parse("/me", origin=DM), ShowFaces)
    assert parse("/forget", origin=DM) == Forget(origin=DM)
    assert parse("/forget yes", origin=DM) == Forget(origin=DM, confirmed=True)
    assert parse("/privacy nobody", origin=DM) == SetPrivacy(origin=DM, policy="nobody")


def test_photos_and_replies() -> None:
    assert parse("", origin=DM, photo=b"x") == Selfie(origin=DM, photo=b"x")
    assert parse("", origin=GROUP, photo=b"x") is None  # groups: only with /selfie
    assert parse("/selfie work", origin=GROUP, photo=b"x") == Selfie(origin=GROUP, photo=b"x", label="work")
    friend = Target(user_id="42")
    assert parse("/morph", origin=GROUP, reply_target=friend) == Morph(
        origin=GROUP, a=Target(me=True), b=friend)
    assert parse("/morph@otherbot @a @b", origin=GROUP, bot_username="stylebot") is None
    assert parse("hello there", origin=GROUP) is None


@pytest.mark.parametrize("text", ["/frobnicate", "/selfie", "/morph @a", "/morph @a @b sideways",
                                  "/mix @a @b everything", "/privacy public", "/edit smile 99"])
def test_mistakes_get_a_reply(text: str) -> None:
    with pytest.raises(Refusal):
        parse(text, origin=GROUP)
