"""Everything the bot says, and the small checks behind the clear replies (no torch here)."""

from __future__ import annotations

import io
import re
import unicodedata
import warnings
import zlib
from collections.abc import Sequence
from typing import Any

from PIL import Image, PngImagePlugin

from bot.commands import Media, Reply
from storage.media import MediaStore
from storage.models import Face, Job, User

__all__ = [
    "BUSY",
    "CHAT_JOBS_OPEN",
    "DONE",
    "FORGET_CONFIRM",
    "FORGOTTEN",
    "HELP",
    "MAX_PHOTO_BYTES",
    "MAX_PHOTO_PIXELS",
    "MIN_PHOTO_SIDE",
    "NAME_LOOKS_TAKEN",
    "NO_OWN_FACE",
    "OOPS",
    "STORAGE_FULL",
    "RATE_LIMITED",
    "Refusal",
    "USER_JOBS_OPEN",
    "check_photo",
    "clean_label",
    "clean_text",
    "face_media",
    "faces_summary",
    "final_reply",
    "frames_range",
    "no_consent",
    "no_face_for",
    "personal_in_a_channel",
    "photo_suffix",
    "photo_too_large",
    "privacy_text",
    "queued",
    "same_face",
    "unknown_person",
    "working",
]

MAX_PHOTO_BYTES = 20 * 1024 * 1024
MAX_PHOTO_PIXELS = 40_000_000  # the engine's limit too (engine.align.load_photo)
MIN_PHOTO_SIDE = 32

HELP = """I turn selfies into StyleGAN faces you can edit and morph.

Send a selfie (in groups: a photo with the caption /selfie) and I save your face.
/edit <text> [strength] - e.g. /edit smiling face
/edit! <text> - slower, stronger edit
/morph @me @friend [frames] [gif|mp4] - an animation from one face to another
/mix @a @b coarse|middle|fine - style mixing
/lineup <text> - everyone here who shared a face, with one edit, in a grid
/me - your saved faces
/privacy everyone|chat|ask|nobody - who may use your face in morphs and lineups (default: chat)
/forget - erase everything I keep about you

Try:
/edit smiling face
/edit old man 6 (strength from -10 to 10; negative goes the other way)
/edit! face with a beard
/morph @me @alice 48 gif
/morph @me @alice @bob @carol (a tour through everyone, looping)
/lineup smiling face
/mix @me @alice coarse (your face with Alice's pose and face shape)
Buttons under each result try variations (weaker, stronger, reverse...)."""

RATE_LIMITED = "You're sending commands faster than I can keep up. Please wait a minute."
BUSY = "I'm very busy right now. Please try again in a few minutes."
STORAGE_FULL = "I'm out of storage space right now, so I can't keep your photo. Please try again later."
OOPS = "Sorry, something went wrong on my side. Please try again in a moment."
USER_JOBS_OPEN = "You already have work in progress. I'll start more once it's done."
CHAT_JOBS_OPEN = "This chat already has several jobs running. Please wait for them to finish."
NO_OWN_FACE = "I don't have your face yet. Send me a selfie first."
FORGET_CONFIRM = ("This erases your saved faces, photos, results and settings, for good. "
                  "Send /forget yes to confirm.")
FORGOTTEN = "Done: I have erased everything I kept about you."
NAME_LOOKS_TAKEN = "That name looks just like someone else's here. Please pick a name of your own."
DELETED = "Deleted: its pictures and data are gone."
DONE = "Done."  # a progress message, once the result went out beside it
BUTTON_STALE = "That button doesn't work any more. Send the command again."
BUTTON_NOT_YOURS = "Only the person whose face it is can use that button."
BUTTON_LABELS = {"smile": "Smile", "older": "Older", "younger": "Younger", "glasses": "Glasses",
                 "weaker": "Weaker", "stronger": "Stronger", "thorough": "Thorough (slower)",
                 "gif": "As GIF", "mp4": "As MP4", "reverse": "Reverse", "slower": "Slower",
                 "faster": "Faster", "morphwith": "Morph with..."}
MORPH_WITH_WHOM = "Morph with whom? (People here who shared a face.)"
NOBODY_TO_MORPH_WITH = "Nobody else here has shared a face I may use yet."
NOT_A_PHOTO = "That doesn't look like a photo I can read. Please send a JPEG or PNG."
NOT_AN_IMAGE_FILE = "That file isn't a photo I can read. Please send a JPEG or PNG photo."  # Telegram
NOT_A_COMMAND = "Send a photo of your face, or /help for what I can do."  # web chat
SEND_A_SELFIE = "Send me a selfie, or /help for what I can do."  # Discord
BAD_WEB_NAME = "Type your name first: one word of letters, digits, _ . or - (at most 32), not \"me\"."
MESSAGE_TOO_LONG = "That message is too long."
# The web chat's HTTP refusals, shown by the browser.
WEB_NEEDS_TOKEN = ("This web chat needs its access token: open it once as http://HOST:PORT/?token=... "
                   "(the value of STYLEBOT_WEB_TOKEN).")
WEB_LOOPBACK_ONLY = "This web chat answers only to localhost / 127.0.0.1."
WEB_OTHER_SITE = "Requests from other sites are not allowed."
WEB_NO_SUCH_FILE = "No such file (it may have been erased)."
WEB_NOT_A_FORM = "Expected a form (multipart/form-data)."

_IMAGE_MAGIC = {b"\xff\xd8\xff": ".jpg", b"\x89PNG\r\n\x1a\n": ".png", b"GIF87a": ".gif",
                b"GIF89a": ".gif", b"BM": ".bmp", b"II*\x00": ".tif", b"MM\x00*": ".tif"}
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # markers without a length field
_TOO_MANY_PIXELS = (f"That image is too large (over {MAX_PHOTO_PIXELS // 1_000_000} megapixels). "
                    "Please send a smaller one.")
_DAMAGED = "I couldn't read that image; the file seems to be damaged. Please send it again."
_BOMB = ("That image is too large: it unpacks to far more data than a photo holds. "
         "Please send a regular JPEG or PNG.")
_CUT_OFF = "That photo is incomplete (the file was cut off). Please send it again."
# Format characters clean_text keeps: ZWNJ, ZWJ (emoji sequences such as a woman astronaut with a
# skin tone), and the tag characters of subdivision flags.
_JOINER = re.compile("[\u200c\u200d\U000e0020-\U000e007f]").fullmatch


class Refusal(Exception):
    """A polite no: the text goes back to the user, nothing is stored."""


def photo_suffix(data: bytes) -> str:
    for magic, suffix in _IMAGE_MAGIC.items():
        if data.startswith(magic):
            return suffix
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ""


def check_photo(data: bytes, *, max_bytes: int = MAX_PHOTO_BYTES) -> None:
    """Refuse what the engine could not use, before anything is stored; the engine does the decode.

    Reads the header only (format, width and height: a decompression bomb is refused before any
    pixel is allocated), and checks that a JPEG or PNG is whole (a cut-off upload), without decoding.
    """
    if not data:
        raise Refusal("That file is empty. Please send a photo.")
    if len(data) > max_bytes:
        raise Refusal(photo_too_large(max_bytes))
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        raise Refusal("That's a HEIC photo, which I can't read. Please send it as a JPEG or PNG "
                      "(on an iPhone: send it as a photo, not as a file).")
    suffix = photo_suffix(data)
    if not suffix:
        raise Refusal(NOT_A_PHOTO)
    if suffix == ".png" and _png_unpacks_too_much(data):
        raise Refusal(_BOMB)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd metadata is the engine's business, not a refusal
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise Refusal(_TOO_MANY_PIXELS) from None
    except Exception:  # Pillow raises many types for malformed headers
        raise Refusal(_DAMAGED) from None
    with image:
        w, h = image.size
        if w * h > MAX_PHOTO_PIXELS:
            raise Refusal(_TOO_MANY_PIXELS)
        if min(w, h) < MIN_PHOTO_SIDE:
            raise Refusal(f"That image is too small ({w}x{h} pixels). Please send a photo at least "
                          f"{MIN_PHOTO_SIDE} pixels on each side.")
        if suffix == ".jpg" and not _jpeg_complete(data):
            raise Refusal(_CUT_OFF)
        if suffix == ".png":
            try:
                image.verify()  # chunk by chunk to the end, checksums; no pixels decoded
            except Exception:
                raise Refusal(_CUT_OFF) from None


def photo_too_large(max_bytes: int) -> str:
    return f"That photo is too large (over {max_bytes // (1024 * 1024)} MB)."


def file_too_large(max_bytes: int) -> str:
    """An upload over the platform's limit (Discord)."""
    return f"That file is too large (over {max_bytes // (1024 * 1024)} MB). Please send a smaller photo."


def too_large_to_download(max_bytes: int) -> str:
    """A file over what the bot downloads from Telegram."""
    return f"That file is too large for me to download (over {max_bytes // (1024 * 1024)} MB)."


def _png_packed(kind: bytes, body: bytes) -> bytes | None:
    """The zlib stream of a PNG chunk that holds one (a colour profile, compressed text)."""
    if kind in (b"iCCP", b"zTXt"):
        return body.partition(b"\0")[2][1:]  # name, NUL, compression method, data
    if kind == b"iTXt":
        rest = body.partition(b"\0")[2]  # keyword, NUL, compressed?, method, language, NUL, ...
        if rest[:1] != b"\x01":
            return None
        return rest[2:].partition(b"\0")[2].partition(b"\0")[2]
    return None


def _png_unpacks_too_much(data: bytes) -> bool:
    """Whether a compressed chunk of a PNG unpacks to more than Pillow takes: a decompression bomb.
    Read on the raw chunks, as Pillow only unpacks those after the pixels when it decodes them."""
    pos = 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        packed = _png_packed(data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length])
        if packed is not None:
            stream = zlib.decompressobj()
            try:
                stream.decompress(packed, PngImagePlugin.MAX_TEXT_CHUNK)
            except zlib.error:
                return False  # damaged: said as such by the checks that follow
            if stream.unconsumed_tail:
                return True
        pos += 12 + length
    return False


def _jpeg_complete(data: bytes) -> bool:
    """Whether a JPEG's segments lead to its first scan and the scan data to an end-of-image marker.

    Inside entropy-coded data a 0xFF byte is always followed by 0x00 or a restart marker, so the
    first FF D9 after the scan header ends the image (data after it, such as a motion photo's
    video, does not matter).
    """
    pos = 2  # after SOI
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in _JPEG_STANDALONE:
            pos += 2
        elif marker == 0xD9:  # EOI before any scan
            return False
        else:
            end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
            if marker == 0xDA:  # start of scan
                return data.find(b"\xff\xd9", end) != -1
            pos = end
    return False


def clean_label(label: str) -> str:
    label = (label or "default").strip().lower()
    if len(label) > 32 or not all(c.isalnum() or c in "-_" for c in label):
        raise Refusal("A face label is one short word (letters, digits, - or _).")
    return label


def clean_text(text: str, *, max_chars: int) -> str:
    """Whitespace collapsed, control and format characters (bidi overrides, ...) taken out, except
    the joiners and tags that hold emoji sequences and some scripts' words together."""
    text = unicodedata.normalize("NFC", " ".join((text or "").split()))
    text = "".join(c for c in text if unicodedata.category(c)[0] != "C" or _JOINER(c))
    if not text:
        raise Refusal("Say what the edit should do, e.g. /edit smiling face")
    if len(text) > max_chars:
        raise Refusal(f"That edit text is too long; keep it under {max_chars} characters.")
    return text


# --- mistakes in a command (bot.parse) ---------------------------------------------------------

def too_many_people(most: int) -> str:
    return f"A morph goes through at most {most} faces."


LINEUP_NEEDS_TEXT = "Say what to change, e.g. /lineup smiling face"
LINEUP_NOBODY = ("Nobody here has shared a face I may use yet. Send a selfie (in groups: a photo "
                 "with the caption /selfie).")
NAME_TWO_PEOPLE = "Name two people, e.g. /morph @me @friend (or reply to your friend's message)."
SELFIE_NEEDS_A_PHOTO = "Send /selfie as the caption of a photo, or as a reply to a photo."
STRENGTH_RANGE = "The strength is a number between -10 and 10."
MIX_LAYERS = "Say which styles to mix: /mix @a @b coarse|middle|fine"
PRIVACY_POLICIES = "Privacy is one of: everyone, chat, ask, nobody."
NOT_A_PERSON = "I expected @someone or @me, not {!r}."  # .format(the word, cut to 40)
NOT_A_MORPH_OPTION = "I didn't understand {!r}. Try /morph @me @friend 32 mp4"  # ... the word
UNKNOWN_COMMAND = "I don't know /{}. Send /help for what I can do."  # ... the command, cut to 32


def queued(what: str, position: int, ready_in_s: float | None = None) -> str:
    """``position``: how many queued jobs are ahead of this one; ``ready_in_s``: the estimate."""
    what = what[0].upper() + what[1:]
    when = "" if ready_in_s is None else f" It should be ready in {_about(ready_in_s)}."
    if position <= 0:
        return f"Got it. {what} is next in the queue.{when}"
    ahead = "1 job is" if position == 1 else f"{position} jobs are"
    return f"Got it. {ahead} ahead of yours in the queue.{when}"


def _about(seconds: float) -> str:
    if seconds < 55:
        return f"about {max(5, round(seconds / 5) * 5)} s"
    minutes = max(1, round(seconds / 60))
    return "about a minute" if minutes == 1 else f"about {minutes} minutes"


def working(job: Job) -> str:
    return f"Working... {int(job.progress * 100)}%"


def first_look(job: Job, media: MediaStore) -> Reply:
    """The encoder's guess at a selfie's latent, shown while the optimisation refines it; the
    result replaces it (``preview_ref``)."""
    caption = "A first look: aligned, and my quick guess. Refining it now..."
    path = media.path(str((job.progress_info or {})["preview_key"]))
    return Reply(reply_to=job.reply_to, text=caption, media=(Media(path, "photo", caption),),
                 edit_of=(job.reply_to or {}).get("progress_ref"), final=False)


def frames_range(max_frames: int) -> str:
    return f"A morph has between 2 and {max_frames} frames."


def unknown_person(who: str, platform: str) -> str:
    if platform == "telegram":
        return (f"I don't know {who} yet. On Telegram I only know people who have talked to me "
                "or in a chat I'm in; ask them to send /start or a selfie.")
    return f"I don't know {who} yet. Ask them to send me a selfie."


def personal_in_a_channel(command: str) -> str:
    """A personal command (``/me``, ``/privacy``, ``/forget``) written in a Discord server channel."""
    return (f"Only you should see that answer: use the slash command /{command} here (its answer is "
            "shown to you alone), or send it to me in a direct message.")


def same_face(kind: str) -> str:
    """``/morph`` or ``/mix`` of one face with itself (or a tour naming someone twice)."""
    return f"A {kind} needs different faces: each person once."


def no_face_for(who: str) -> str:
    return NO_OWN_FACE if who == "you" else f"{who} hasn't shared a selfie with me yet."


def no_consent(who: str) -> str:
    return f"Sorry, {who} hasn't allowed their face to be used here."


def privacy_text(policy: str) -> str:
    meaning = {"everyone": "anyone may use your face in their morphs",
               "chat": "people in chats where you shared your face may use it",
               "ask": "I ask you each time someone wants your face (or always allow them)",
               "nobody": "only you may use your face"}[policy]
    return f"Privacy: {policy} ({meaning}). Change it with /privacy everyone|chat|ask|nobody."


def ask_consent(owner: User, asker: User, kind: str, wait_min: int) -> str:
    """The ask, in the chat where someone wants ``owner``'s face (only ``owner`` can answer)."""
    return (f"{person_name(owner)}, {person_name(asker)} would like to use your face in a {kind}. "
            f"Only you can answer; I'll wait {wait_min} minute{'s' if wait_min != 1 else ''}.")


def said_no(who: str) -> str:
    return f"{who} said no to using their face."


def no_answer(wait_min: int) -> str:
    return f"nobody answered my question within {wait_min} minute{'s' if wait_min != 1 else ''}."


NOT_YOURS_TO_ANSWER = "Only the person who was asked can answer this."
ANSWERED = {"allow": "Thanks: allowed this once.", "always": "Thanks: they may use your face from now on.",
            "deny": "OK: your face will not be used."}


def quality_words(psnr: float) -> str:
    """How close a reconstruction came, in words first (dB for those who know them)."""
    word = "good" if psnr >= 28 else "fair" if psnr >= 22 else "poor"
    return f"{word} ({psnr:.1f} dB)"


def person_name(user: User) -> str:
    """What captions call someone: their display name, else @username."""
    return user.display_name or (f"@{user.username}" if user.username else "someone")


_LAYER_WORDS = {"coarse": "pose and face shape", "middle": "features", "fine": "colours and texture",
                "all": "whole face"}


def faces_summary(faces: Sequence[Face], policy: str) -> str:
    if not faces:
        return "You have no saved faces. Send a selfie to add one.\n" + privacy_text(policy)
    lines = [f"- {f.label}: saved {f.created_at:%Y-%m-%d}, likeness "
             f"{quality_words(f.quality.get('psnr', 0))}" for f in faces]
    return "Your faces:\n" + "\n".join(lines) + "\n" + privacy_text(policy)


def gallery_text(faces: Sequence[Face], results: Sequence[Job], policy: str) -> str:
    """/me: the faces, the latest results (numbered as their delete buttons), the privacy setting."""
    text = faces_summary(faces, policy)
    if results:
        lines = [f"{i}. {_result_words(job)}, {job.finished_at or job.created_at:%Y-%m-%d}"
                 for i, job in enumerate(results, 1)]
        text += "\nYour latest results:\n" + "\n".join(lines)
    if faces or results:
        text += "\nThe buttons below delete one item each, for good."
    return text


def _result_words(job: Job) -> str:
    if job.kind in ("edit", "lineup"):
        return f"{job.kind} \"{(job.payload or {}).get('text', '')}\""
    *first, last = _all_names(job)
    return f"{'morph' if job.kind == 'morph' else 'mix'} of {', '.join(first)} and {last}"


def face_media(media: MediaStore, face: Face) -> Media:
    return Media(path=media.path(face.reconstruction_key), kind="photo", caption=face.label)


def _demo_note(result: dict[str, Any]) -> str:
    return ("\n(Demo model: random weights, not a face model. Real faces need the FFHQ weights.)"
            if result.get("is_demo") else "")


def _slow_edit_note(result: dict[str, Any]) -> str:
    """An edit asked to be fast ran the optimisation method: the fast-edit table is being built."""
    if "table_progress" not in result:
        return ""
    done = result["table_progress"]
    how_far = "" if done is None else f", {int(done * 100)}% done"
    return f"\n(Fast edits are still being prepared{how_far}; this one used the slower method.)"


def _strength_note(result: dict[str, Any]) -> str:
    if "strength" not in result:
        return ""
    return f" (strength {result['strength']:g}, from -10 to 10)"


def final_reply(job: Job, media: MediaStore) -> Reply:
    """The message that ends a job: its pictures (in place of its first look, if one was shown), or
    why it failed."""
    to = job.reply_to or {}
    if job.status == "failed":
        return Reply(reply_to=job.reply_to, text=f"Sorry: {job.error}", edit_of=to.get("progress_ref"))
    edit_of = to.get("preview_ref") or to.get("progress_ref")
    r = job.result or {}
    note = _demo_note(r)
    items: tuple[Media, ...]
    if job.kind == "invert":
        caption = (f"Saved as your face. Left: your photo aligned, right: my version of it "
                   f"(likeness {quality_words(r.get('psnr', 0))}).{note}")
        if r.get("note"):
            caption += f"\n{r['note']}"
        items = (Media(media.path(r["panel_key"]), "photo", caption),)
    elif job.kind == "edit":
        items = (Media(media.path(r["before_after_key"]), "photo",
                       f"Before / after: {r.get('text', '')}{_strength_note(r)}{note}{_slow_edit_note(r)}"),)
        if r.get("pasted_key"):
            items += (Media(media.path(r["pasted_key"]), "photo", "In your photo"),)
    elif job.kind == "morph":
        people = _all_names(job)
        route = " to ".join(people) + (f" and back to {people[0]}" if len(people) > 2 else "")
        items = (Media(media.path(r["media_key"]), "video" if r.get("format") == "mp4" else "animation",
                       f"Morph: {route}, {r.get('frames')} frames{note}"),)
    elif job.kind == "lineup":
        who = ", ".join(_all_names(job))
        items = (Media(media.path(r["media_key"]), "photo",
                       f"Lineup: {r.get('text', '')}{_strength_note(r)} - {who} (left to right, "
                       f"top to bottom){note}{_slow_edit_note(r)}"),)
    else:
        a, b = _names(job)
        layers = _LAYER_WORDS.get(str(r.get("layers")), str(r.get("layers")))
        items = (Media(media.path(r["media_key"]), "photo",
                       f"{a} | {b} | {a} with {b}'s {layers}{note}"),)
    return Reply(reply_to=job.reply_to, text=items[0].caption or "", media=items, edit_of=edit_of)


def _names(job: Job) -> tuple[str, str]:
    """The two people of a mix (or the first two of a morph), by name."""
    a, b, *_ = _all_names(job)
    return a, b


def _all_names(job: Job) -> list[str]:
    """The people of a morph or mix in order, by name (older jobs kept none: A, B, ...)."""
    payload = job.payload or {}
    count = len(payload["face_ids"]) if "face_ids" in payload else 2 + len(payload.get("more_ids") or [])
    names = payload.get("names") or []
    return [str(names[i]) if i < len(names) else chr(ord("A") + i) for i in range(count)]
