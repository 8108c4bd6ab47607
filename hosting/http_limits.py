"""What every HTTP front holds for a client that has not authenticated yet: the server,
the gateway and the environments webhook serve with :class:`LimitedConfig`.

uvicorn (0.55, httptools) bounds neither the time nor the size of a request's headers:
its keep-alive timer runs only between requests and is cancelled by every byte, so a
client sending one byte a minute holds a connection forever, and httptools buffers a
header of any length. uvicorn's settings have no knob for either (``h11_max_incomplete_event_size``
applies to the slower h11 parser only), so :class:`BoundedHttpProtocol`, a small
subclass of uvicorn's httptools protocol, adds them:

- a deadline for a request's headers, from the moment the connection opens or the
  previous response ended: past it, 408 (or a silent close if nothing came at all);
- a cap on the size of a request's head (request line and header fields): past it, 431.

Keep-alive idle time is uvicorn's own ``timeout_keep_alive``. Refusals are JSON
``{"detail": ...}`` like every other error of the contract, with ``connection: close``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from hosting.errors import ErrorCode, error_body
from hosting.settings_env import ConfigError, float_setting, int_setting

logger = logging.getLogger("hosting.http_limits")


@dataclass(frozen=True)
class HttpLimits:
    """Per-connection limits of one process's HTTP front, read from ``<PREFIX>HTTP_*``."""

    header_timeout_seconds: float = 10.0
    """A request's headers must be complete this long after the connection opened or the
    previous response ended (``<PREFIX>HTTP_HEADER_TIMEOUT_SECONDS``)."""
    keep_alive_seconds: int = 5
    """An idle keep-alive connection is closed after this long (``<PREFIX>HTTP_KEEP_ALIVE_SECONDS``,
    uvicorn's ``timeout_keep_alive``). The gateway reuses a connection to a sandbox for 4 s
    at most, so a sandbox's server keeps the default."""
    max_header_bytes: int = 32 * 1024
    """Most bytes of a request's head: request line and header fields (``<PREFIX>HTTP_MAX_HEADER_BYTES``;
    nginx's default allows 4 lines of 8 KiB)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str], prefix: str) -> HttpLimits:
        """``prefix`` is the process's own: ``AGENT_``, ``GATEWAY_`` or ``ENVIRONMENT_``."""
        limits = cls(
            header_timeout_seconds=float_setting(env, f"{prefix}HTTP_HEADER_TIMEOUT_SECONDS", cls.header_timeout_seconds),
            keep_alive_seconds=int_setting(env, f"{prefix}HTTP_KEEP_ALIVE_SECONDS", cls.keep_alive_seconds, minimum=1),
            max_header_bytes=int_setting(env, f"{prefix}HTTP_MAX_HEADER_BYTES", cls.max_header_bytes, minimum=1024),
        )
        if limits.header_timeout_seconds <= 0:
            raise ConfigError(f"{prefix}HTTP_HEADER_TIMEOUT_SECONDS must be > 0")
        return limits


class LimitedConfig(uvicorn.Config):
    """uvicorn's configuration serving with :class:`BoundedHttpProtocol` under ``limits``."""

    def __init__(self, app: Any, limits: HttpLimits, **options: Any) -> None:
        super().__init__(app, http=BoundedHttpProtocol, timeout_keep_alive=limits.keep_alive_seconds, **options)
        self.limits = limits


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a request that was answered already."""


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size cap on each request's head."""

    def __init__(self, config: uvicorn.Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        assert isinstance(config, LimitedConfig), "serve with LimitedConfig"
        self._limits = config.limits
        self._deadline: asyncio.TimerHandle | None = None
        self._in_head = False
        self._head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        was_in_head = self._in_head
        super().data_received(data)
        # httptools keeps an unfinished header field in memory, so an endless one is cut
        # here. A read is counted only if a head was being read before and after it, when
        # all its bytes are the head's (one that starts a head may end the previous body):
        # a head may pass the cap by what two reads bring (256 KiB each), never more.
        if was_in_head and self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self._limits.max_header_bytes:
                self._refuse(ErrorCode.HEADERS_TOO_LARGE, f"request headers larger than {self._limits.max_header_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self._limits.max_header_bytes:
            self._refuse(ErrorCode.HEADERS_TOO_LARGE, f"request headers larger than {self._limits.max_header_bytes} bytes")
            raise _Refused  # the parser stops here; the app never sees the request
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        next_request_read = bool(self.pipeline)  # its headers are in: no deadline for them
        super().on_response_complete()
        if not next_request_read and not self.transport.is_closing():
            self._arm()

    def send_400_response(self, msg: str) -> None:
        if not self.transport.is_closing():  # closing: refused already (uvicorn's parser-error path)
            super().send_400_response(msg)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self._limits.header_timeout_seconds, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if self._in_head:
            self._refuse(ErrorCode.REQUEST_TIMEOUT,
                         f"request headers not received within {self._limits.header_timeout_seconds:g} s")
        elif not self.transport.is_closing():  # nothing sent at all: nothing to answer
            self.transport.close()

    def _refuse(self, code: ErrorCode, detail: str) -> None:
        """Answer ``code`` and close, unless a response is being written on this
        connection (a pipelined request's head): then only close."""
        if self.transport.is_closing():
            return
        logger.info("refused a request from %s: %s", self.client[0] if self.client else "?", detail)
        if self.cycle is None or self.cycle.response_complete:
            body = json.dumps(error_body(detail, code)).encode()
            self.transport.write(b"".join([
                STATUS_LINE[code.status], b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n", body]))
        self.transport.close()
