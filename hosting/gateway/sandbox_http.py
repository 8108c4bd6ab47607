"""The relay's HTTP/1.1 client to its sandboxes: keep-alive connections, bodies streamed raw.

Written here rather than taken from a client library because the relay needs very little
(HTTP/1.1 to one server per sandbox, a request with its whole body, the answer's bytes as
they arrive) and pays for every layer on each relayed turn: on the bench machine a bare
relay spent 2.3 ms of CPU per relayed stream with aiohttp's client and 1.4 ms with this one,
and on two shared cores that CPU is the sandbox's latency (bench/README.md). Parsing, the part that
is easy to get wrong, is httptools (llhttp, the parser uvicorn serves with); this module
only frames requests, pools connections and hands over what the parser found.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

import httptools

KEEP_IDLE_SECONDS = 4.0
"""An idle connection is reused for this long at most: under uvicorn's keep-alive (5 s),
so the sandbox does not close it just as a request is written to it."""
PAUSE_READING_BYTES = 256 * 1024
"""Unread bytes past which the sandbox's socket is not read until the relay catches up
(a slow client slows its sandbox rather than the gateway's memory)."""
MAX_HEAD_BYTES = 64 * 1024
"""Most bytes of an answer's status line and headers (httptools keeps an unfinished
header in memory): past it the connection is broken off."""
MAX_ANSWER_BYTES = 16 * 2**20
"""Most bytes of an answer read whole (:meth:`SandboxAnswer.read`, a non-streaming
answer): a sandbox's answer is small JSON, so one without end is broken off here rather
than held by the gateway. Streams are read piecewise and capped per event by the relay."""


class ConnectFailed(Exception):
    """No connection could be made: the request was never sent."""


class ConnectionBroken(Exception):
    """The connection closed, or the answer could not be parsed, after the request was sent."""


@functools.lru_cache(maxsize=1024)
def origin_of(address: str) -> Origin:
    return Origin(address)


class Origin:
    """Where a sandbox listens, from its address (``http://host:port`` or ``https://...``)."""

    def __init__(self, address: str) -> None:
        parts = urlsplit(address)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) address: {address!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.host_header = parts.netloc.rpartition("@")[2].encode("ascii")


class SandboxConnection(asyncio.Protocol):
    """One connection and the answer being read on it (one at a time: no pipelining)."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._head_bytes = 0
        self._answered = False
        self._error: str | None = None
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.complete = False
        self._keep_alive = False
        self.idle_since = 0.0
        self.on_lost_while_idle: Callable[[], None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        self._answered = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._break(f"unreadable answer: {exc}")
            return
        if self.status is None:  # still in the head: every byte read so far is the head's
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self.close(f"answer headers larger than {MAX_HEAD_BYTES} bytes")

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self.on_lost_while_idle is not None:
            self.on_lost_while_idle()
        if exc is None and self.status is not None and self._delimited_by_close:
            self.complete = True  # httptools has no end-of-input call: such a body ends here
        if not self.complete:
            self._break(f"connection closed: {exc}" if exc else "connection closed by the sandbox")
        self._wake()

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > PAUSE_READING_BYTES and self._transport is not None and not self._paused:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._keep_alive = self._parser.should_keep_alive()  # the parser forgets it once past the message
        self._wake()

    # used by SandboxClient and SandboxAnswer

    @property
    def _delimited_by_close(self) -> bool:
        return "content-length" not in self.headers and "chunked" not in self.headers.get("transfer-encoding", "")

    @property
    def answer_started(self) -> bool:
        """Whether any byte came since the last request was sent."""
        return self._answered

    @property
    def open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing() and self._error is None

    def send(self, request: bytes) -> None:
        assert self._transport is not None
        self._chunks, self._buffered, self._head_bytes, self.status, self.headers = [], 0, 0, None, {}
        self.complete = self._keep_alive = self._answered = False
        self._transport.write(request)

    async def headers_received(self) -> None:
        while self.status is None:
            self._raise_if_broken()
            await self._wait()

    async def read_any(self) -> bytes:
        """The body bytes that have arrived (waiting for some); ``b""`` at its end."""
        while not self._chunks:
            if self.complete:
                return b""
            self._raise_if_broken()
            await self._wait()
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks, self._buffered = [], 0
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return data

    @property
    def keep_alive(self) -> bool:
        return self.complete and self._keep_alive

    def close(self, reason: str = "closed by the gateway") -> None:
        if self._transport is not None:
            self._transport.close()
        self._break(reason)

    def _raise_if_broken(self) -> None:
        if self._error is not None:
            raise ConnectionBroken(self._error)

    def _break(self, error: str) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class SandboxAnswer:
    """A sandbox's answer, open: status and headers read, body not yet. Close it
    (:meth:`release`) so its connection is reused, or dropped if it cannot be."""

    def __init__(self, client: SandboxClient, address: str, connection: SandboxConnection) -> None:
        self._client, self._address, self._connection = client, address, connection
        assert connection.status is not None
        self.status: int = connection.status
        self.headers = connection.headers
        self._released = False

    async def read_any(self) -> bytes:
        return await self._connection.read_any()

    async def read(self) -> bytes:
        """The whole body; :class:`ConnectionBroken` past :data:`MAX_ANSWER_BYTES`."""
        chunks, size = [], 0
        while chunk := await self._connection.read_any():
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                reason = f"answer larger than {MAX_ANSWER_BYTES} bytes"
                self._connection.close(reason)
                raise ConnectionBroken(reason)
            chunks.append(chunk)
        return b"".join(chunks)

    def release(self) -> None:
        """Back to the pool if the whole answer was read and the sandbox keeps the
        connection open; closed otherwise. Idempotent."""
        if self._released:
            return
        self._released = True
        self._client.give_back(self._address, self._connection)


class SandboxClient:
    """Keep-alive connections to sandboxes, by address. One per gateway event loop."""

    def __init__(self, tls: ssl.SSLContext, connect_timeout: float) -> None:
        self._tls = tls
        self._connect_timeout = connect_timeout
        self._idle: dict[str, list[SandboxConnection]] = {}

    async def request(self, address: str, method: str, path: str, headers: dict[str, str],
                      body: bytes | None = None) -> SandboxAnswer:
        """Send one request; return once the answer's status and headers are in.
        :class:`ConnectFailed` if no connection could be made, :class:`ConnectionBroken` if
        it broke after the request was written (the sandbox may have acted on it)."""
        origin = origin_of(address)
        request = _request_bytes(origin, method, path, headers, body)
        pooled = self._pooled(address)
        try:
            connection = await self._exchange(pooled or await self._connect(origin), request)
        except ConnectionBroken:
            # A reused connection that broke before one byte of answer: the sandbox had closed
            # it (or died) before the close was seen here, so it never took the request. Once
            # more on a new connection, which fails to connect if the sandbox is gone.
            if pooled is None or pooled.answer_started:
                raise
            connection = await self._exchange(await self._connect(origin), request)
        return SandboxAnswer(self, address, connection)

    @staticmethod
    async def _exchange(connection: SandboxConnection, request: bytes) -> SandboxConnection:
        connection.send(request)
        try:
            await connection.headers_received()
        except BaseException:
            connection.close()
            raise
        return connection

    def _pooled(self, address: str) -> SandboxConnection | None:
        idle = self._idle.get(address)
        now = time.monotonic()
        while idle:
            connection = idle[-1]
            self._drop(address, connection)
            if connection.open and now - connection.idle_since < KEEP_IDLE_SECONDS:
                return connection
            connection.close()
        return None

    def _drop(self, address: str, connection: SandboxConnection) -> None:
        """Out of the pool (sandboxes come and go: nothing is kept for one that went)."""
        connection.on_lost_while_idle = None
        idle = self._idle[address]
        idle.remove(connection)
        if not idle:
            del self._idle[address]

    async def _connect(self, origin: Origin) -> SandboxConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, connection = await loop.create_connection(
                    SandboxConnection, origin.host, origin.port,
                    ssl=self._tls if origin.tls else None, server_hostname=origin.host if origin.tls else None)
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(f"cannot connect to {origin.host}:{origin.port}: {exc or type(exc).__name__}") from None
        return connection

    def give_back(self, address: str, connection: SandboxConnection) -> None:
        if not (connection.keep_alive and connection.open):
            connection.close()
            return
        connection.idle_since = time.monotonic()
        connection.on_lost_while_idle = functools.partial(self._drop, address, connection)
        self._idle.setdefault(address, []).append(connection)

    def close(self) -> None:
        for address, idle in list(self._idle.items()):
            for connection in list(idle):
                self._drop(address, connection)
                connection.close()


def _request_bytes(origin: Origin, method: str, path: str, headers: dict[str, str], body: bytes | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1\r\n".encode("ascii"), b"host: ", origin.host_header, b"\r\n"]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} has a line break")
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    if body is not None:
        lines.append(b"content-length: %d\r\n" % len(body))
    lines.append(b"\r\n")
    if body:
        lines.append(body)
    return b"".join(lines)
