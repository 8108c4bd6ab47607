"""Passing requests to a sandbox and its SSE bytes back, unchanged.

The relay never parses or re-encodes a turn: bytes go out as their events
complete (heartbeat comments included), so the gateway adds no buffering beyond
the event in progress (:mod:`hosting.gateway.event_stream` finds where events end).
A sandbox dying mid-stream, or moved off while streaming, ends the client's stream
properly: an ``error`` event (``sandbox_lost``, retryable) and ``done``; a gateway that
shuts down cuts its streams the same way by its deadline (``shutting_down``: the turn runs
on in its sandbox, so the client re-attaches through another replica). An event
without end (past :data:`MAX_EVENT_BYTES` with no blank line) ends the stream the
same way, rather than growing the gateway's memory. While it streams, the relay
stamps the session's activity (the idle reaper reads it), and it counts the turns in
flight for a draining gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping

import httpx

from hosting.contract import EPOCH_HEADER, NAMESPACE_HEADER
from hosting.errors import ErrorCode
from hosting.gateway.event_stream import EventObserver, StreamWatcher, lost_stream
from hosting.gateway.relayed_stream import RelayedChunks
from hosting.gateway.routing.protocols import Routes, RoutingStoreUnavailable
from hosting.gateway.routing.records import Route
from hosting.gateway.sandbox_http import ConnectFailed, ConnectionBroken, SandboxClient
from hosting.gateway.sandbox_response import SandboxLost, SandboxResponse, SandboxUnreachable, SandboxUnresponsive
from hosting.telemetry.tracing import inject_trace_context

logger = logging.getLogger("hosting.gateway.relay")

FORWARDED_REQUEST_HEADERS = ("content-type", "accept", "last-event-id")

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
        self._responses: set[SandboxResponse] = set()  # the sandbox answers being streamed
        self.stop_by: float | None = None
        """The shutdown deadline (event-loop time), once :meth:`cut_streams` was called."""
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

    async def delete_session(self, route: Route) -> int | None:
        """Ask the route's sandbox to delete its session (``DELETE /sessions/{id}``, in the
        route's namespace): the status it answered, ``None`` if it could not be reached. In
        tenant scope, how a session deleted without its client (retention) leaves the
        volume it shares (:mod:`hosting.gateway.tenant_scope`)."""
        try:
            response = await self.send(route, "DELETE", f"/sessions/{route.session_id}", {})
            try:
                await response.aread()
            finally:
                await response.aclose()
        except (SandboxUnreachable, SandboxLost):
            return None
        return response.status_code

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
        self._responses.add(response)
        if self.stop_by is not None:  # began as the gateway stops: cut at once
            await response.aclose()
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
            self._responses.discard(response)
            await response.aclose()  # never suspends: nothing for a cancellation to interrupt
        await self.touch(route.key)
        if not watcher.done or moved.is_set():
            if on_end is not None:
                await on_end()
            if moved.is_set():
                logger.warning("session %s: moved off sandbox %s mid-stream; its stream is cut", route.session_id,
                               route.sandbox_id)
            if self.stop_by is not None and not moved.is_set():
                ending = lost_stream(watcher.last_id, "this gateway replica shut down during the turn, which runs on "
                                     "in its sandbox: re-attach (GET /sessions/{id}/events) or send it again once "
                                     "it ends", ErrorCode.SHUTTING_DOWN)
            else:
                ending = lost_stream(watcher.last_id,
                                     "the sandbox serving this session stopped mid-turn; send the turn again")
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

    async def cut_streams(self, stop_by: float) -> None:
        """Cut every stream still relayed, each ending with ``error`` (``shutting_down``) and
        ``done``, and wait until they have gone out, by ``stop_by`` (event-loop time): the
        gateway stops by its deadline (:class:`hosting.draining.DrainingServer`) and its
        clients re-attach elsewhere instead of waiting on a connection about to close."""
        self.stop_by = stop_by
        for response in list(self._responses):
            await response.aclose()
        await self.wait_for_running_turns(max(0.0, stop_by - asyncio.get_running_loop().time()))

    async def aclose(self) -> None:
        self._client.close()
