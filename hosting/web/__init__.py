"""The chat page: one static page, its script and its stylesheet, served by the app itself.

The server and the gateway both call :func:`mount_chat_page`, so the page is the same at
every tier and, as for any client, only the base URL and the token change. There is no build
step and nothing is fetched from elsewhere: the three files are package data, and the
Content-Security-Policy lets the page load only them and talk only to its own origin, so
even model output that slipped into the DOM as HTML could not run or phone home.

The page holds no data, so it is served without auth; every API call it makes sends the token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import Response

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/chat/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "/chat/chat.css": ("chat.css", "text/css; charset=utf-8"),
}


def mount_chat_page(app: FastAPI) -> None:
    """Serve the chat page at ``GET /`` and its two assets under ``/chat/``, without auth."""
    # Three fixed files, read once and served from memory with their security headers:
    # StaticFiles would need a wrapper for the headers and brings directory lookups not needed here.
    for path, (name, media_type) in PAGE_FILES.items():
        body = files(__name__).joinpath(name).read_bytes()
        app.add_api_route(path, _responder(body, media_type), methods=["GET", "HEAD"], include_in_schema=False)


def _responder(body: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    async def serve() -> Response:
        return Response(body, media_type=media_type, headers=SECURITY_HEADERS)

    return serve
