"""Passing requests to a sandbox and its SSE bytes back, unchanged.

The relay never parses or re-encodes a turn: bytes go out as their events
complete (heartbeat comments included), so the gateway adds no buffering beyond
the event in progress. It watches the lines go by to know the last event id and
whether ``done`` was seen, so that a sandbox dying mid-stream ends the client's
stream properly: an ``error`` event (``sandbox_lost``, retryable) and ``done``,
with ids that continue the sandbox's, and never half an event before them. An
event without end (past :data:`MAX_EVENT_BYTES` with no blank line) ends the
stream the same way, rather than growing the gateway's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any

import anyio
import httpx
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from hosting.contract import EPOCH_HEADER, NAMESPACE_HEADER
from hosting.errors import ErrorCode
from hosting.gateway.routing.protocols import Routes, RoutingStoreUnavailable
from hosting.gateway.routing.records import Route
from hosting.gateway.sandbox_http import ConnectFailed, ConnectionBroken, SandboxAnswer, SandboxClient
from hosting.telemetry.tracing import inject_trace_context
from hosting.wire import WireEvent, encode, error_event

logger = logging.getLogger("hosting.gateway.relay")

FORWARDED_REQUEST_HEADERS = ("content-type", "accept", "last-event-id")
RELAYED_RESPONSE_HEADERS = ("content-type", "cache-control", "retry-after", "x-accel-buffering")

PROBE_AFTER_SECONDS = 5.0
"""A request a sandbox has not answered for this long (its response headers; a turn's
come at once, or after a short wait for room) makes the relay ask the sandbox's ``/health``."""
PROBE_TIMEOUT_SECONDS = 2.0
END_AFTER_DONE_SECONDS = 2.0
"""How long the end of a sandbox's body may follow its ``done`` (it follows at once) before
the connection is closed rather than reused."""
CONNECT_TIMEOUT_SECONDS = 5.0
"""The only timeout of a relayed request: a turn may think for minutes; heartbeats keep proxies happy."""
MAX_EVENT_BYTES = 16 * 2**20
"""Most bytes of one SSE event from a sandbox. Events are JSON of a model's output or a
tool's result (an image read whole is a few MiB in base64); past this the sandbox is
treated as lost."""


class SandboxUnreachable(Exception):
    """No connection could be made: the request never reached the sandbox, so it is
    safe to provision another and send it again."""


class SandboxUnresponsive(SandboxUnreachable):
    """Connected, but neither the request nor ``/health`` got an answer (a stopped or
    partitioned sandbox). Replaced like an unreachable one; if it wakes up it may still
    run the request, but its writes to the session store are fenced off (see
    :data:`hosting.contract.EPOCH_HEADER`) once the new sandbox took over."""


class SandboxLost(Exception):
    """The connection broke after the request was sent: it may have run."""


class SandboxResponse:
    """A sandbox's answer, open for streaming: its status, headers and bytes, as relayed.
    Its body reads whatever has arrived, so events that came together are relayed in one
    write."""

    def __init__(self, answer: SandboxAnswer) -> None:
        self._answer = answer
        self.status_code = answer.status
        self.headers: Mapping[str, str] = answer.headers

    async def aread(self) -> bytes:
        try:
            return await self._answer.read()
        except ConnectionBroken as exc:
            raise SandboxLost(str(exc)) from None
        finally:
            self._answer.release()

    async def read_any(self) -> bytes:
        """Whatever has arrived (waiting for something); ``b""`` at the end of the body."""
        try:
            return await self._answer.read_any()
        except ConnectionBroken as exc:
            raise SandboxLost(str(exc)) from None

    async def aclose(self) -> None:
        """Let the connection go: reused if the body was read to its end, else closed."""
        self._answer.release()

    def relayed_headers(self) -> dict[str, str]:
        """The headers a client gets from the sandbox's answer (:data:`RELAYED_RESPONSE_HEADERS`)."""
        return {name: self.headers[name] for name in RELAYED_RESPONSE_HEADERS if name in self.headers}


def next_event_id(last: str | None) -> str:
    """The id after ``last``: ``1764-7`` → ``1764-8``; none → ``0-1`` (turn 0: before
    any of the sandbox's, so a re-attach after it replays the sandbox's latest turn)."""
    if last is None:
        return "0-1"
    head, sep, tail = last.rpartition("-")
    if tail.isdigit():
        return f"{head}{sep}{int(tail) + 1}"
    return f"{last}-1"


def lost_stream(last_id: str | None, message: str) -> bytes:
    """``error`` (``sandbox_lost``, retryable) then ``done``, continuing after ``last_id``."""
    error_id = next_event_id(last_id)
    return (encode(error_event(ErrorCode.SANDBOX_LOST, message), error_id)
            + encode(WireEvent("done"), next_event_id(error_id)))


_cleanups: set[asyncio.Task[Any]] = set()


async def shielded(awaitable: Awaitable[Any]) -> None:
    """Run a clean-up step to its end even while the caller is being cancelled (a client
    that left: Starlette cancels the response's task, and would cancel every await in a
    ``finally`` too). If the caller is cancelled anyway, the step still completes."""
    task = asyncio.ensure_future(awaitable)
    _cleanups.add(task)
    task.add_done_callback(_cleanups.discard)
    with anyio.CancelScope(shield=True):
        await asyncio.shield(task)


RelayedChunks = AsyncIterator[tuple[bytes, bool]]
"""A relayed stream's chunks, each with whether it is the last the client gets."""


class RelayedStream(Response):
    """A relayed SSE response that knows when it is over: ``on_close`` runs once, however
    the response ends (every byte relayed, the sandbox lost, cancelled), after the stream
    it relays is closed; ``while_open`` runs beside it until then.

    A client that leaves does not end it: the sandbox's turn runs on (the client may
    re-attach), so the rest of the stream is read and dropped until the turn ends there.
    What the turn holds (its tenant's concurrent-turn slot) is held until then, and what
    it spent is counted, however the client behaves.

    The last chunk goes out with the end of the body, so a client that stops reading at
    ``done`` finds its response complete and keeps its connection; proxies are asked not to
    buffer it (``x-accel-buffering: no``) unless the sandbox said otherwise.

    It streams in the request's own task, with one task beside it that notices the
    client leaving (then nothing more is sent to it): Starlette's own streaming runs a task group
    of two anyio tasks per response, a cost every relayed turn would pay on the gateway's
    one event loop (bench/README.md, the relay's CPU per turn)."""

    def __init__(self, content: RelayedChunks, headers: Mapping[str, str],
                 on_close: Callable[[], Awaitable[None]] | None = None,
                 while_open: Callable[[], Coroutine[Any, Any, None]] | None = None) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({"x-accel-buffering": "no", **headers})  # no body yet: no content-length
        self._content = content
        self._on_close = on_close
        self._while_open = while_open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming, client_gone = True, False

        async def until_client_leaves() -> None:
            nonlocal client_gone
            while (await receive())["type"] != "http.disconnect":
                pass
            client_gone = True

        listener = asyncio.create_task(until_client_leaves())
        beside = asyncio.create_task(self._while_open()) if self._while_open is not None else None
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk, last in self._content:  # after the last, the stream only finishes
                if streaming and not client_gone:
                    streaming = not last
                    try:
                        await send({"type": "http.response.body", "body": chunk, "more_body": streaming})
                    except OSError:  # ASGI 2.4: sending to a client that left
                        client_gone = True
            if streaming and not client_gone:
                streaming = False
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass
        finally:
            streaming = False
            listener.cancel()
            await shielded(self._close(beside))

    async def _close(self, beside: asyncio.Task[None] | None) -> None:
        try:
            if beside is not None:
                beside.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beside
            aclose = getattr(self._content, "aclose", None)
            if aclose is not None:  # runs the relay's own clean-up if the stream stopped mid-way
                with contextlib.suppress(SandboxLost, RuntimeError):
                    await aclose()
        finally:
            if self._on_close is not None:
                await self._on_close()


EventObserver = Callable[[str, bytes], None]
"""Told of each whole event relayed: its type and its ``data`` (raw JSON bytes)."""


class StreamWatcher:
    """Follows SSE lines across chunk boundaries: the last ``id:``, whether ``done`` came whole,
    and (for an ``observer``) each event as it completes. The one SSE reader of the gateway.

    :meth:`feed` hands back only bytes that end whole events and holds the event in progress,
    so a stream cut short (a sandbox lost, an event past :data:`MAX_EVENT_BYTES`) never
    leaves a client half an event before the ``sandbox_lost`` ending."""

    def __init__(self, observer: EventObserver | None = None) -> None:
        self._held: list[bytes] = []  # the event in progress, in the pieces it came in
        self._held_bytes = 0
        self._line: list[bytes] = []  # its unfinished line
        self._line_bytes = 0
        self._observer = observer
        self._kind = b""
        self._data: list[bytes] = []
        self.last_id: str | None = None
        self.done = False

    @property
    def unfinished(self) -> int:
        """Bytes of the event in progress, held back."""
        return self._held_bytes

    def drop_unfinished(self) -> None:
        """Forget the event in progress (the stream that was sending it is cut)."""
        self._held, self._held_bytes, self._line, self._line_bytes = [], 0, [], 0
        self._kind, self._data = b"", []

    def feed(self, chunk: bytes) -> bytes:
        """Take the next chunk; the bytes to relay now (the whole events it completes)."""
        self._held.append(chunk)
        self._held_bytes += len(chunk)
        if b"\n" not in chunk:  # the line goes on: not copied again with each piece
            self._line.append(chunk)
            self._line_bytes += len(chunk)
            return b""
        before = self._line_bytes
        lines = b"".join([*self._line, chunk]).split(b"\n")
        last = lines.pop()
        self._line, self._line_bytes = ([last], len(last)) if last else ([], 0)
        offset, boundary = 0, 0
        for raw in lines:
            offset += len(raw) + 1
            line = raw.rstrip(b"\r")
            if not line:  # an event is whole at its blank line, ``done`` too
                boundary = offset
                self.done = self.done or self._kind == b"done"
                if self._observer is not None and self._kind and self._data:
                    self._observer(self._kind.decode(errors="replace"), b"\n".join(self._data))
                self._kind, self._data = b"", []
            elif line.startswith(b"id:"):
                self.last_id = line[3:].strip().decode(errors="replace")
            elif line.startswith(b"event:"):
                self._kind = line[6:].strip()
            elif self._observer is not None and line.startswith(b"data:"):
                self._data.append(line[5:].strip())
        if not boundary:
            return b""
        cut = boundary - before  # the blank line's end, in this chunk
        whole = b"".join([*self._held[:-1], chunk[:cut]])
        self._held = [chunk[cut:]] if cut < len(chunk) else []
        self._held_bytes = len(chunk) - cut
        return whole


class Relay:
    """One HTTP client to every sandbox; requests carry the sandbox's own token.

    It also counts the turns in flight (admitted, provisioning or streaming: see
    :meth:`begin_turn`), so a draining gateway (SIGTERM) can refuse new turns and
    wait for the running ones (:class:`hosting.draining.Drainable`)."""

    def __init__(self, store: Routes, installation: str, stamp_interval_seconds: float) -> None:
        self._store = store
        self._installation = installation
        self._stamp_interval = stamp_interval_seconds
        self.accepting = True
        self._streams = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Trust as every other client of the product (httpx's: certifi, or SSL_CERT_FILE/SSL_CERT_DIR),
        # not the system store the image may lack: Modal sandboxes are reached over TLS.
        self._client = SandboxClient(httpx.create_ssl_context(), CONNECT_TIMEOUT_SECONDS)

    async def send(self, route: Route, method: str, path: str, headers: Mapping[str, str],
                   body: bytes | None = None) -> SandboxResponse:
        """Send to the route's sandbox; the response is open for streaming (close it)."""
        assert route.address is not None and route.token is not None
        forwarded = {name: headers[name] for name in FORWARDED_REQUEST_HEADERS if name in headers}
        forwarded["authorization"] = f"Bearer {route.token}"
        inject_trace_context(forwarded)
        if route.epoch:
            forwarded[EPOCH_HEADER] = str(route.epoch)
        forwarded[NAMESPACE_HEADER] = f"{self._installation}/{route.tenant}"
        address, requesting = route.address, asyncio.current_task()
        assert requesting is not None
        unresponsive = False
        probing: list[asyncio.Task[None]] = []

        async def probe_until_silent() -> None:
            nonlocal unresponsive
            while await self._answers(address):
                await asyncio.sleep(PROBE_AFTER_SECONDS)
            unresponsive = True
            requesting.cancel()

        # A timer, not a task racing the request: most requests are answered within
        # milliseconds, and a timer is all they then cost.
        timer = asyncio.get_running_loop().call_later(
            PROBE_AFTER_SECONDS, lambda: probing.append(asyncio.create_task(probe_until_silent())))
        try:
            return SandboxResponse(await self._client.request(address, method, path, forwarded, body))
        except asyncio.CancelledError:
            if unresponsive and requesting.uncancel() == 0:
                raise SandboxUnresponsive(f"sandbox {route.sandbox_id} answers neither the request nor /health") from None
            raise
        except ConnectFailed as exc:
            raise SandboxUnreachable(str(exc)) from None
        except ConnectionBroken as exc:
            raise SandboxLost(str(exc)) from None
        finally:
            timer.cancel()
            for probe in probing:
                probe.cancel()

    async def _answers(self, address: str) -> bool:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
                answer = await self._client.request(address, "GET", "/health", {})
                answer.release()
                return True
        except (ConnectFailed, ConnectionBroken, TimeoutError):
            return False

    async def stream(self, route: Route, response: SandboxResponse,
                     on_end: Callable[[], Awaitable[None]] | None = None,
                     observer: EventObserver | None = None) -> RelayedChunks:
        """The response's bytes as they arrive, activity stamped meanwhile, and a
        ``sandbox_lost`` ending if the sandbox goes away before ``done``. The chunk with
        ``done`` is the last (the wire format's last event); the sandbox's end of the body
        is then read, so its connection is reused.

        ``on_end`` runs once the turn is over, *before* its last event goes out, so a
        client that sends its next turn as soon as it reads ``done`` finds what the
        turn held (its concurrent-turn slot) released already. ``observer`` is told of
        each event (the gateway's turn metrics), read by the same pass over the bytes."""
        watcher = StreamWatcher(observer)
        moved = asyncio.Event()
        stamper = asyncio.create_task(self._stamp_while_streaming(route, response, moved))
        try:
            while chunk := await response.read_any():
                if moved.is_set():  # not one more byte from a sandbox the session left
                    break
                whole = watcher.feed(chunk)
                if watcher.unfinished > MAX_EVENT_BYTES:
                    logger.warning("session %s: sandbox %s sent an event over %d bytes; its stream is cut",
                                   route.session_id, route.sandbox_id, MAX_EVENT_BYTES)
                    break
                if watcher.done and on_end is not None:
                    end, on_end = on_end, None
                    await end()
                if whole:
                    yield whole, watcher.done
                if watcher.done:
                    with contextlib.suppress(SandboxLost, TimeoutError):
                        async with asyncio.timeout(END_AFTER_DONE_SECONDS):
                            while await response.read_any():
                                pass  # nothing follows done; the body's end is what is read
                    break
        except SandboxLost as exc:
            if not moved.is_set():
                logger.warning("session %s: sandbox %s lost mid-stream: %s", route.session_id, route.sandbox_id,
                               type(exc).__name__)
        finally:
            stamper.cancel()
            await response.aclose()  # never suspends: nothing for a cancellation to interrupt
        await self.touch(route.key)
        if not watcher.done or moved.is_set():
            if on_end is not None:
                await on_end()
            if moved.is_set():
                logger.warning("session %s: moved off sandbox %s mid-stream; its stream is cut", route.session_id,
                               route.sandbox_id)
            ending = lost_stream(watcher.last_id, "the sandbox serving this session stopped mid-turn; send the turn again")
            watcher.drop_unfinished()  # held back: the client never sees half an event
            watcher.feed(ending)  # the observer sees the ending too
            yield ending, True

    async def touch(self, key: str) -> None:
        try:
            await self._store.touch(key)
        except RoutingStoreUnavailable:
            logger.warning("could not stamp a session's activity (routing store down)")

    async def _stamp_while_streaming(self, route: Route, response: SandboxResponse, moved: asyncio.Event) -> None:
        """Stamp activity every interval, and cut the stream if the route no longer names
        its sandbox (another request, maybe on another replica, replaced it)."""
        while True:
            try:
                current = await self._store.touch(route.key)
            except RoutingStoreUnavailable:
                logger.warning("session %s: could not stamp activity (routing store down)", route.session_id)
            else:
                if current != route.sandbox_id:
                    moved.set()
                    await response.aclose()
                    return
            await asyncio.sleep(self._stamp_interval)

    def begin_turn(self) -> None:
        """A turn was admitted: the drain waits for it from now on (it may still be
        provisioning) until :meth:`end_turn`."""
        self._streams += 1
        self._idle.clear()

    def end_turn(self) -> None:
        self._streams -= 1
        if self._streams == 0:
            self._idle.set()

    @property
    def running_streams(self) -> int:
        """Turns in flight through this replica."""
        return self._streams

    def stop_accepting(self) -> None:
        self.accepting = False

    async def wait_for_running_turns(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        self._client.close()
