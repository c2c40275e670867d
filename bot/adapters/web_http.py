"""HTTP plumbing of the local web chat: who may connect, the page's files, and the media shelf.

- :class:`Access` is the middleware every request passes. With an access token configured, a
  request must carry it (``Authorization: Bearer <token>``, or the HttpOnly cookie the page sets
  after the first visit with ``?token=<token>``); tokens are compared with
  :func:`hmac.compare_digest` and never logged. Whatever the token, a request whose ``Origin`` is
  another site is refused (a web page elsewhere cannot drive the chat or read it over the
  WebSocket), and on a loopback bind the ``Host`` must be a loopback name too (DNS rebinding).
- :func:`page_routes` serves ``bot/adapters/web_static`` (plain HTML, JS and CSS; no build step).
- :class:`MediaShelf` maps opaque random ids to files the service handed over in a Reply; only
  those are served, never a path built from a request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from importlib.resources import files
from pathlib import Path

from aiohttp import hdrs, web
from yarl import URL

from bot import replies
from settings import is_loopback

__all__ = ["COOKIE", "Access", "MediaShelf", "page_routes", "security_headers"]

COOKIE = "stylebot_web"

_PAGE_FILES = {  # URL path -> (file in bot/adapters/web_static, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
_MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                ".webp": "image/webp", ".mp4": "video/mp4", ".webm": "video/webm"}
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
        "media-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Access:
    """The access checks, as an aiohttp middleware (see the module docstring)."""

    def __init__(self, *, token: str, loopback: bool) -> None:
        self._token = token.encode()
        self._loopback = loopback
        # The cookie holds a value derived from the token, not the token itself.
        self._cookie = hmac.new(self._token, b"stylebot web chat cookie", hashlib.sha256).hexdigest()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._loopback and not is_loopback(request.url.host or ""):
            raise web.HTTPForbidden(text=replies.WEB_LOOPBACK_ONLY)
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None and not self._same_origin(request, origin):
            raise web.HTTPForbidden(text=replies.WEB_OTHER_SITE)
        if not self._token:
            return await handler(request)
        if self._authorized(request):
            return await handler(request)
        if request.method == "GET" and self._matches(request.query.get("token", ""), self._token.decode()):
            # First visit with ?token=: remember it in a cookie and drop it from the address bar.
            response = web.HTTPSeeOther(request.rel_url.with_query(None))
            response.set_cookie(COOKIE, self._cookie, httponly=True, samesite="Strict", path="/",
                                secure=request.secure)
            raise response
        raise web.HTTPUnauthorized(text=replies.WEB_NEEDS_TOKEN, headers={hdrs.WWW_AUTHENTICATE: "Bearer"})

    def _authorized(self, request: web.Request) -> bool:
        auth = request.headers.get(hdrs.AUTHORIZATION, "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and self._matches(value.strip(), self._token.decode()):
            return True
        return self._matches(request.cookies.get(COOKIE, ""), self._cookie)

    @staticmethod
    def _matches(given: str, expected: str) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), expected.encode())

    @staticmethod
    def _same_origin(request: web.Request, origin: str) -> bool:
        url = URL(origin)
        return url.is_absolute() and (url.host or "").lower() == (request.url.host or "").lower() \
            and url.port == request.url.port


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: no sniffing, no framing, a strict CSP for the page."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("Content-Security-Policy", _CSP)
    response.headers.setdefault("Cache-Control", "no-store")


def page_routes() -> list[web.RouteDef]:
    """GET routes for the page's files, read once from the package."""
    static = files("bot.adapters").joinpath("web_static")
    routes = []
    for path, (name, content_type) in _PAGE_FILES.items():
        body = static.joinpath(name).read_bytes()

        async def serve(request: web.Request, body: bytes = body, content_type: str = content_type
                        ) -> web.Response:
            return web.Response(body=body, headers={hdrs.CONTENT_TYPE: content_type})

        routes.append(web.get(path, serve))
    return routes


class MediaShelf:
    """Files handed over in Replies, by opaque id; only files under ``root`` are taken."""

    def __init__(self, root: Path) -> None:
        self._root = root.resolve()
        self._items: dict[str, tuple[Path, str]] = {}

    def add(self, path: Path) -> str | None:
        """An id to serve ``path`` under; None for a file outside the media dir."""
        resolved = path.resolve()
        if not resolved.is_relative_to(self._root):
            return None
        media_id = secrets.token_urlsafe(16)
        self._items[media_id] = (resolved, _MEDIA_TYPES.get(resolved.suffix.lower(), ""))
        return media_id

    def exists(self, media_id: str) -> bool:
        """Whether the file behind ``media_id`` is still there (erased files are not)."""
        item = self._items.get(media_id)
        return item is not None and item[0].is_file()

    def drop(self, media_id: str) -> None:
        self._items.pop(media_id, None)

    async def serve(self, request: web.Request) -> web.StreamResponse:
        """GET /media/{id}: the file (ranges work, for video), or 404."""
        item = self._items.get(request.match_info["media_id"])
        if item is None or not item[0].is_file():
            raise web.HTTPNotFound(text=replies.WEB_NO_SUCH_FILE)
        path, content_type = item
        headers = {hdrs.CONTENT_TYPE: content_type or "application/octet-stream"}
        if not content_type:
            headers[hdrs.CONTENT_DISPOSITION] = "attachment"
        return web.FileResponse(path, headers=headers)
