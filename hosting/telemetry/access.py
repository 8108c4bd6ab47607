"""One access line per HTTP request, written when its response has ended.

uvicorn writes its access line when a response *starts*: for a relayed turn that is
on the turn's critical path (formatting and writing a log line while the sandbox's
CLI waits for the CPU; bench/README.md, the relay), and the line cannot say how long
the turn took. This line comes once the response is over (as nginx's does), with its
status and duration, and the session id in its path labelled as in spans and other
logs (:func:`hosting.telemetry.tracing.session_label`), never raw unless asked for.
Servers run with uvicorn's own access line off (:class:`hosting.draining.DrainingServer`).
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hosting.telemetry.tracing import labelled_path

logger = logging.getLogger("hosting.access")


class AccessLog:
    """ASGI middleware: ``client - "METHOD path HTTP/v" status duration`` at INFO, after
    the response. A request whose app raised before answering is logged as 500 (what
    the error middleware outside sends)."""

    def __init__(self, app: ASGIApp, raw_session_ids: bool) -> None:
        self.app = app
        self.raw = raw_session_ids

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not logger.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, noting_status)
        finally:
            client = scope.get("client")
            path = labelled_path(scope["path"], self.raw)
            query = scope.get("query_string", b"")
            logger.info('%s - "%s %s%s HTTP/%s" %d %.1f ms', f"{client[0]}:{client[1]}" if client else "-",
                        scope["method"], path, f"?{query.decode('latin-1')}" if query else "",
                        scope.get("http_version", "1.1"), status, (time.perf_counter() - started) * 1000)
