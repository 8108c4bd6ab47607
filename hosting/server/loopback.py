"""A server on a loopback address answers only requests addressed to a loopback name.

A page in the user's browser cannot reach 127.0.0.1 directly (another origin), but it can
by DNS rebinding: its own name, re-resolved to 127.0.0.1, makes the browser send the
page's requests to the server with ``Host: <the page's name>``. Answering only requests
whose ``Host`` is ``localhost``, a 127.0.0.0/8 address or ``[::1]`` (any port) defeats that.

A tiny middleware rather than Starlette's ``TrustedHostMiddleware``: that one answers a
plain-text 400, where the contract wants 421 (Misdirected Request) with a JSON
``{"detail": ...}``, and its patterns cannot say "any address in 127.0.0.0/8".
"""

from __future__ import annotations

import ipaddress
import re

from starlette.types import ASGIApp, Receive, Scope, Send

from hosting.contract import error_response
from hosting.errors import ErrorCode, HostingError

_HOST_HEADER = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9.-]+))(?::[0-9]{1,5})?")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address or a host name, no port) names this machine's loopback."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_host_header(value: str) -> bool:
    """Whether a ``Host`` header value is a loopback name or address, with or without a port."""
    match = _HOST_HEADER.fullmatch(value)
    return match is not None and is_loopback(match["v6"] or match["name"])


class LoopbackHostOnly:
    """Pure ASGI middleware: 421 ``misdirected`` to any request whose one ``Host`` header
    is missing or not a loopback name (see the module doc)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hosts = [value for name, value in scope["headers"] if name == b"host"]
        if len(hosts) == 1 and loopback_host_header(hosts[0].decode("latin-1")):
            await self.app(scope, receive, send)
            return
        refusal = HostingError("this server is on a loopback address and answers only requests to "
                               "localhost, 127.0.0.1 or [::1]", code=ErrorCode.MISDIRECTED)
        await error_response(refusal)(scope, receive, send)
