"""Telegram: python-telegram-bot updates in, :mod:`bot.parse` commands out; replies back as messages.

The adapter only translates. It long-polls ``getUpdates`` (``[telegram] base_url`` may point at a
local Bot API server), turns each message into ``parse(...)`` (text commands, photos and image
documents, captions, commands sent as a reply to someone's message) and hands the command to the
service. Replies are sent as plain text (no ``parse_mode``: user text can never inject markup), as a
reply to the user's message; a reply with ``edit_of`` edits the progress message in place.

Group privacy: in groups only commands, mentions of the bot and replies to it reach the bot (Telegram
filters the rest when privacy mode is on; the adapter applies the same rule when it is off), and a
plain photo without ``/selfie`` is ignored.

The bot token is never logged: a filter redacts it from the HTTP client's and PTB's log records.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
from collections.abc import Awaitable, Sequence
from typing import Any
from urllib.parse import quote

from telegram import (
    BotCommand,
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputFile,
    InputMediaPhoto,
    Message,
    MessageEntity,
    ReplyParameters,
    Update,
    User,
)
from telegram.error import BadRequest, ChatMigrated, Forbidden, RetryAfter, TelegramError
from telegram.ext import (
    AIORateLimiter,
    Application,
    BaseUpdateProcessor,
    CallbackQueryHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from bot import replies
from bot.commands import Button, Media, Origin, Press, Reply, Target
from bot.delivery import DeliveryFailed, TryLater, Undeliverable
from bot.parse import COMMANDS, parse
from bot.replies import Refusal
from bot.service import Service
from settings import Config

__all__ = ["TelegramAdapter"]

log = logging.getLogger("stylebot.telegram")

_MB = 1024 * 1024
_TEXT_MAX = 4096  # Telegram's limits, in characters
_CAPTION_MAX = 1024
_ALERT_MAX = 200  # a callback query's answer
_UPDATES_PER_CHAT = 8  # one chat's messages handled at a time; the rest of that chat's wait
_DRAIN_S = 10.0  # on stop, how long the replies being sent may take before the client closes
_UPDATES_IN_ALL = 4096  # every waiting update is held in memory (a few kB each)
_LOGGERS = ("httpx", "httpcore", "telegram", "telegram.ext", "telegram.Bot", "telegram.ext.Updater",
            "telegram.ext.Application", "telegram.ext.ExtBot", "telegram.request",
            "telegram.ext.AIORateLimiter")
_RATE_LIMITER_LOG = "telegram.ext.AIORateLimiter"



class _Redact(logging.Filter):
    """Takes the token out of log records (httpx logs request URLs, which carry it, %-quoted or not)."""

    def __init__(self, token: str) -> None:
        super().__init__()
        secret = token.partition(":")[2]  # "<bot id>:<secret>": the bot id alone is public
        self.secrets = [s for s in (token, quote(token, safe=""), secret) if len(s) >= 8]

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler
            return True
        for secret in self.secrets:
            text = text.replace(secret, "<token>")
        # Freeze the text: PTB logs dicts it later fills in (file paths become URLs with the token).
        record.msg, record.args = text, None
        return True


def _not_a_passed_on_429(record: logging.LogRecord) -> bool:
    """Drops the rate limiter's traceback for a 429 it passes on (it retries none): the reply pump
    logs the wait in one line and tries that chat again later."""
    return not str(record.msg).startswith("Rate limit hit after maximum")


class _ChatsSideBySide(BaseUpdateProcessor):
    """Up to ``per_chat`` updates of one chat are handled at a time, chats side by side.

    Handling a message ends with a reply, and Telegram lets a bot send only about 20 messages a
    minute to one group (the rate limiter waits for it). With PTB's shared pool of handler slots,
    a group flooding the bot fills every slot with handlers waiting to reply there, and every
    other chat's message waits behind them. Here the flood waits for its own chat's slots.
    """

    def __init__(self, *, per_chat: int, in_all: int) -> None:
        super().__init__(max_concurrent_updates=in_all)
        self.per_chat = per_chat
        self._chats: dict[int, tuple[asyncio.Semaphore, int]] = {}  # chat id -> (slots, users)

    async def do_process_update(self, update: object, coroutine: Awaitable[Any]) -> None:
        chat = update.effective_chat if isinstance(update, Update) else None
        if chat is None:
            await coroutine
            return
        slots, users = self._chats.get(chat.id, (asyncio.Semaphore(self.per_chat), 0))
        self._chats[chat.id] = (slots, users + 1)
        try:
            async with slots:
                await coroutine
        finally:
            slots, users = self._chats[chat.id]
            if users == 1:
                del self._chats[chat.id]
            else:
                self._chats[chat.id] = (slots, users - 1)
            if asyncio.iscoroutine(coroutine):
                coroutine.close()  # cancelled while waiting: never started, no "never awaited"

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class TelegramAdapter:
    """A Telegram bot (the :class:`bot.app.Adapter` protocol)."""

    platform = "telegram"

    def __init__(self, config: Config, *, poll_timeout: int = 10) -> None:
        # PTB's coming behaviour, opted into: time periods (a 429's retry_after) as timedelta, not
        # a deprecation warning each time Telegram asks the bot to wait.
        os.environ.setdefault("PTB_TIMEDELTA", "true")
        tg = config.telegram
        self._max_photo = tg.max_photo_mb * _MB
        self._max_download = tg.max_download_mb * _MB
        self._poll_timeout = poll_timeout
        self._redact = _Redact(config.telegram_token.get_secret_value())
        # Before build(), and for good: PTB and httpx log API URLs, token inside, even for a request
        # that ends after the adapter stopped.
        for name in _LOGGERS:
            logging.getLogger(name).addFilter(self._redact)
        logging.getLogger(_RATE_LIMITER_LOG).addFilter(_not_a_passed_on_429)
        self.app = (
            Application.builder()
            .token(config.telegram_token.get_secret_value())
            .base_url(tg.base_url)
            .base_file_url(tg.base_file_url)
            .rate_limiter(AIORateLimiter())
            .concurrent_updates(_ChatsSideBySide(per_chat=_UPDATES_PER_CHAT, in_all=_UPDATES_IN_ALL))
            .build()
        )
        self._service: Service | None = None
        self.app.add_handler(MessageHandler(filters.UpdateType.MESSAGE, self._on_message))
        self.app.add_handler(CallbackQueryHandler(self._on_press))
        self.app.add_error_handler(self._on_error)
        self._answered: set[str] = set()  # presses answered with a refusal already
        self._open = False  # replies go out only while the Bot API client is open
        self._sending = 0
        self._idle = asyncio.Event()  # no reply being sent: the client may close
        self._idle.set()

    # --- receiving ---------------------------------------------------------------------------

    async def run(self, service: Service, stop: asyncio.Event) -> None:
        """Poll for updates until ``stop`` is set, then stop polling and close the HTTP client once
        the replies being sent are out (it may run again after it failed)."""
        self._service = service
        updater = self.app.updater
        assert updater is not None  # the builder makes one
        async with self.app:  # initialize (getMe) ... shutdown
            self._open = True
            try:
                await self.app.bot.set_my_commands(
                    [BotCommand(name, _clip(text, 256)) for name, text in COMMANDS.items()])
                await updater.start_polling(timeout=self._poll_timeout,
                                            allowed_updates=["message", "callback_query"],
                                            error_callback=self._on_poll_error)
                await self.app.start()
                log.info("telegram: polling as @%s", self.app.bot.username)
                await stop.wait()
            finally:
                self._open = False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), _DRAIN_S)
                if updater.running:
                    await updater.stop()
                if self.app.running:
                    await self.app.stop()

    def _on_poll_error(self, exc: TelegramError) -> None:
        log.warning("telegram: polling failed (%s); retrying", type(exc).__name__)

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        update_id = update.update_id if isinstance(update, Update) else None
        err = context.error
        log.error("telegram: update %s failed: %s", update_id, type(err).__name__ if err else "error",
                  exc_info=err)

    async def _on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is None or message.from_user is None or self._service is None:
            return
        if message.from_user.is_bot:
            return
        await self._handle(message, self._service)

    async def _on_press(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A button under one of our messages: a command for the service; the press is answered
        (Telegram shows a spinner until it is), with the refusal when there is one."""
        query = update.callback_query
        if query is None:
            return
        message = query.message
        if not isinstance(message, Message) or self._service is None:
            await self._answer(query)
            return
        origin = self._origin(message, user=query.from_user)
        origin.reply_to["callback_query_id"] = query.id
        try:
            await self._service.handle(Press(origin=origin, data=query.data or ""))
        finally:
            await self._answer(query)

    async def _answer(self, query: CallbackQuery, text: str | None = None) -> None:
        if query.id in self._answered:
            self._answered.discard(query.id)
            return
        try:
            await query.answer(text=_clip(text, _ALERT_MAX) if text else None, show_alert=bool(text))
        except TelegramError as exc:  # too late, or the user is gone: nothing more to say
            log.info("telegram: a button press was not answered: %s", type(exc).__name__)

    def _origin(self, message: Message, *, user: User | None = None) -> Origin:
        user, chat = user or message.from_user, message.chat
        assert user is not None
        return Origin(
            platform=self.platform, user_id=str(user.id), chat_id=str(chat.id),
            chat_kind="private" if chat.type == "private" else "group",
            username=user.username, display_name=user.full_name or None, chat_title=chat.title,
            reply_to={"platform": self.platform, "chat_id": chat.id, "message_id": message.message_id},
        )

    def _command_text(self, message: Message, private: bool) -> str | None:
        """The text to parse, with a leading mention of the bot taken off; None: not for the bot."""
        text = _mentions_as_ids(message).strip()
        username = self.app.bot.username
        mention = f"@{username}".lower() if username else None
        mentioned = False
        if mention and text.lower().startswith(mention):
            text, mentioned = text[len(mention):].strip(), True
        if private or text.startswith("/"):
            return text
        replied = message.reply_to_message
        to_bot = (replied is not None and replied.from_user is not None
                  and replied.from_user.id == self.app.bot.id)
        if mentioned or to_bot:
            # A photo that mentions the bot in a group is a selfie, as /selfie would be.
            return "/selfie" if (message.photo or message.document) and not text else text
        return None

    async def _handle(self, message: Message, service: Service) -> None:
        origin = self._origin(message)
        private = origin.chat_kind == "private"
        text = self._command_text(message, private)
        if text is None:
            return  # group chatter that isn't for the bot
        try:
            word = text.split(maxsplit=1)[0].split("@")[0].lower() if text.startswith("/") else ""
            replied = message.reply_to_message
            source: Message | None = None
            if word == "/selfie":
                source = message if (message.photo or message.document) else replied
            elif not word and private:
                source = message
            photo = await self._photo(source) if source is not None else None
            if not word and private and photo is None and source is not None and source.document:
                raise Refusal(replies.NOT_AN_IMAGE_FILE)
            reply_target = None
            if replied is not None and replied.from_user is not None \
                    and replied.from_user.id != self.app.bot.id and word != "/selfie":
                reply_target = Target(user_id=str(replied.from_user.id))
            cmd = parse(text, origin=origin, photo=photo, reply_target=reply_target,
                        bot_username=self.app.bot.username)
        except Refusal as refusal:
            await service.say(origin, str(refusal), private=True)
            return
        if cmd is not None:
            await service.handle(cmd)

    async def _photo(self, message: Message) -> bytes | None:
        """The bytes of a message's photo (largest size) or image document; None when it has none.

        Raises Refusal for files too large to take or documents that aren't images."""
        if message.photo:
            best = max(message.photo, key=lambda p: (p.width * p.height, p.file_size or 0))
            file_id, size = best.file_id, best.file_size
        elif message.document is not None:
            doc = message.document
            if not (doc.mime_type or "").lower().startswith("image/"):
                raise Refusal(replies.NOT_AN_IMAGE_FILE)
            file_id, size = doc.file_id, doc.file_size
        else:
            return None
        self._check_size(size)
        tg_file = await self.app.bot.get_file(file_id)
        self._check_size(tg_file.file_size)
        data = bytes(await tg_file.download_as_bytearray())
        self._check_size(len(data))
        return data

    def _check_size(self, size: int | None) -> None:
        if size is None:
            return
        if size > self._max_download:
            raise Refusal(replies.too_large_to_download(self._max_download))
        if size > self._max_photo:
            raise Refusal(f"{replies.photo_too_large(self._max_photo)} Please send a smaller one.")

    # --- sending -----------------------------------------------------------------------------

    async def deliver(self, reply: Reply) -> dict[str, Any] | None:
        """Send (or edit) one reply; the platform's refusals come out as :mod:`bot.delivery` errors.

        A result with pictures is always a new message (a text message cannot become a photo):
        the service then edits the progress message on its own."""
        if not self._open:
            raise TryLater("telegram: not connected")
        self._sending += 1
        self._idle.clear()
        try:
            return await self._deliver(reply)
        except TelegramError as exc:
            raise _outcome(exc) from None
        finally:
            self._sending -= 1
            if not self._sending:
                self._idle.set()

    async def _deliver(self, reply: Reply) -> dict[str, Any] | None:
        chat_id = reply.reply_to["chat_id"]
        press = reply.reply_to.get("callback_query_id")
        if reply.private and press is not None:  # a refused press: only the presser sees why
            await self.app.bot.answer_callback_query(press, text=_clip(reply.text, _ALERT_MAX),
                                                     show_alert=True)
            self._answered.add(press)
            return None
        markup = _keyboard(reply.buttons)
        if reply.edit_of is not None and not reply.media:
            if await self._edit(reply.edit_of, chat_id, reply.text, markup):
                return dict(reply.edit_of)
            if reply.edit_only:
                return None
        # A first look, replaced by the result in place (its buttons: on the progress message).
        if (reply.edit_of is not None and _one_photo_for(reply.edit_of, reply.media)
                and await self._edit_photo(reply.edit_of, chat_id, reply.media[0])):
            return dict(reply.edit_of)
        params = self._reply_params(reply)
        if reply.media:
            # Under the result itself only when no progress message will carry them (an album
            # cannot have buttons; the progress message above it is edited with them).
            sent = await self._send_media(chat_id, reply.media, reply.text, params,
                                          markup if reply.edit_of is None else None)
            one_photo = len(sent) == 1 and bool(sent[0].photo)  # its picture can be edited later
            ref = {"chat_id": chat_id, "message_id": sent[0].message_id}
            return {**ref, "photo": True} if one_photo else ref
        message = await self.app.bot.send_message(chat_id, _clip(reply.text or "…", _TEXT_MAX),
                                                  reply_parameters=params, reply_markup=markup)
        return {"chat_id": chat_id, "message_id": message.message_id}

    @staticmethod
    def _reply_params(reply: Reply) -> ReplyParameters | None:
        message_id = reply.reply_to.get("message_id")
        if message_id is None:
            return None
        return ReplyParameters(message_id=int(message_id), allow_sending_without_reply=True)

    async def _edit(self, ref: dict[str, Any], chat_id: int, text: str,
                    markup: InlineKeyboardMarkup | None = None) -> bool:
        """Edit a text message; False when it cannot be edited any more (deleted, too old)."""
        try:
            await self.app.bot.edit_message_text(_clip(text or "…", _TEXT_MAX),
                                                 chat_id=ref.get("chat_id", chat_id),
                                                 message_id=int(ref["message_id"]), reply_markup=markup)
        except BadRequest as exc:
            if "not modified" in str(exc).lower():
                return True
            if _chat_gone(exc):
                raise
            log.info("telegram: could not edit message %s: %s", ref.get("message_id"), exc)
            return False
        return True

    async def _edit_photo(self, ref: dict[str, Any], chat_id: int, item: Media) -> bool:
        """Replace the picture and caption of a photo message; False when it cannot be edited."""
        try:
            await self.app.bot.edit_message_media(
                InputMediaPhoto(_file(item, attach=True),
                                caption=_clip(item.caption or "", _CAPTION_MAX) or None),
                chat_id=ref.get("chat_id", chat_id), message_id=int(ref["message_id"]))
        except BadRequest as exc:
            if _chat_gone(exc):
                raise
            log.info("telegram: could not edit photo %s: %s", ref.get("message_id"), exc)
            return False
        return True

    async def _send_media(self, chat_id: int, media: Sequence[Media], text: str,
                          params: ReplyParameters | None,
                          markup: InlineKeyboardMarkup | None = None) -> list[Message]:
        bot = self.app.bot
        if len(media) > 1 and all(m.kind == "photo" for m in media):
            group = [InputMediaPhoto(_file(m, attach=True),
                                     caption=_clip(m.caption or "", _CAPTION_MAX) or None)
                     for m in media[:10]]
            return list(await bot.send_media_group(chat_id, group, reply_parameters=params))
        sent = []
        for i, m in enumerate(media):
            caption = _clip(m.caption or (text if i == 0 else ""), _CAPTION_MAX) or None
            p = params if i == 0 else None
            k = markup if i == len(media) - 1 else None
            if m.kind == "photo":
                sent.append(await bot.send_photo(chat_id, _file(m), caption=caption, reply_parameters=p,
                                                 reply_markup=k))
            elif m.kind == "video":
                sent.append(await bot.send_video(chat_id, _file(m), caption=caption, reply_parameters=p,
                                                 supports_streaming=True, reply_markup=k))
            elif m.kind == "animation":
                sent.append(await bot.send_animation(chat_id, _file(m), caption=caption,
                                                     reply_parameters=p, reply_markup=k))
            else:
                sent.append(await bot.send_document(chat_id, _file(m), caption=caption,
                                                    reply_parameters=p, reply_markup=k))
        return sent


def _one_photo_for(ref: dict[str, Any], media: Sequence[Media]) -> bool:
    """A single photo going where a single photo was sent (Telegram cannot turn text into a photo)."""
    return bool(ref.get("photo")) and len(media) == 1 and media[0].kind == "photo"


def _mentions_as_ids(message: Message) -> str:
    """The message's text with each mention of someone without a username (a ``text_mention``:
    their name, linked to their account) written as ``<@id>``, a person the parser knows by id."""
    text = message.text or message.caption or ""
    entities = message.entities if message.text else message.caption_entities
    units = text.encode("utf-16-le")  # entity offsets count UTF-16 code units
    for e in sorted(entities or (), key=lambda e: e.offset, reverse=True):
        if e.type == MessageEntity.TEXT_MENTION and e.user is not None:
            units = units[:2 * e.offset] + f"<@{e.user.id}>".encode("utf-16-le") + \
                units[2 * (e.offset + e.length):]
    return units.decode("utf-16-le")


def _keyboard(rows: Sequence[Sequence[Button]]) -> InlineKeyboardMarkup | None:
    if not rows:
        return None
    return InlineKeyboardMarkup([[InlineKeyboardButton(b.label, callback_data=b.data) for b in row]
                                 for row in rows])


def _chat_gone(exc: BadRequest) -> bool:
    text = str(exc).lower()
    return "chat not found" in text or "chat_id is empty" in text or "peer_id_invalid" in text


def _outcome(exc: TelegramError) -> DeliveryFailed:
    """What a Bot API error means for the message: never (the chat is gone or refuses the bot, or
    Telegram rejects this request as it is) or later (rate limit, server or network trouble)."""
    if isinstance(exc, RetryAfter):
        wait = exc.retry_after
        seconds = wait.total_seconds() if isinstance(wait, dt.timedelta) else float(wait)
        return TryLater(f"telegram: flood control, retry after {seconds:g} s", retry_after=seconds)
    if isinstance(exc, Forbidden):
        return Undeliverable(f"telegram: {exc.message}")
    if isinstance(exc, ChatMigrated):
        return Undeliverable("telegram: the group became a supergroup")
    if isinstance(exc, BadRequest):  # sent again, the same request gets the same answer
        return Undeliverable(f"telegram: {exc.message}")
    return TryLater(f"telegram: {type(exc).__name__}: {exc.message}")


def _file(media: Media, *, attach: bool = False) -> InputFile:
    """The upload; ``attach``: a part of its own, named in an album's JSON (``attach://...``)."""
    return InputFile(media.path.read_bytes(), filename=media.path.name, attach=attach)

