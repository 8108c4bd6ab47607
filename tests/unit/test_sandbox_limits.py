"""The gateway caps what it buffers from a sandbox. The sandbox here is the attacker: a
server on 127.0.0.1 written byte by byte that never ends what it started (an SSE line,
an answer, a header), in front of the gateway's own relay and client.

What the tests prove: an SSE event without end ends the client's turn with ``sandbox_lost``
(error, then done, as events of their own) once it passes the relay's cap; an answer or a
header without end breaks the connection (``SandboxLost``, which the gateway answers with
503 or ``sandbox_lost``); in each case the gateway stops reading there, so the sandbox
could not send more than the cap and what the sockets hold.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest

from hosting.gateway.relay import MAX_EVENT_BYTES, Relay
from hosting.gateway.relayed_stream import RelayedStream
from hosting.gateway.routing.memory import MemoryRoutingStore
from hosting.gateway.routing.records import Route
from hosting.gateway.sandbox_http import MAX_ANSWER_BYTES, MAX_HEAD_BYTES
from hosting.gateway.sandbox_response import SandboxLost
from tests.unit.test_sandbox_http import read_request, serving

PIECE = b"x" * 2**20
SOCKET_BUFFERS = 16 * 2**20
"""More than loopback's socket buffers hold (a few MiB each way): what the sandbox may
have written past the point where the gateway stopped reading."""


class Endless:
    """A sandbox that writes ``head`` then ``piece`` again and again until the gateway
    closes the connection (or far past any cap: then the gateway never stopped reading)."""

    def __init__(self, head: bytes, piece: Callable[[bytes], bytes] = lambda data: data) -> None:
        self.head, self.piece, self.sent = head, piece, 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(self.head)
        piece = self.piece(PIECE)
        while self.sent < 4 * MAX_EVENT_BYTES + SOCKET_BUFFERS:
            writer.write(piece)
            await writer.drain()  # ConnectionError once the gateway closed
            self.sent += len(PIECE)


async def relayed(relay: Relay, route: Route) -> list[bytes]:
    """The client's side of a relayed turn: each body write (the endless part only counted)."""
    writes: list[bytes] = []
    relayed_bytes = 0

    async def send(message: dict[str, object]) -> None:
        nonlocal relayed_bytes
        if message["type"] == "http.response.body":
            body = message["body"]
            assert isinstance(body, bytes)
            relayed_bytes += len(body)
            writes.append(body if len(writes) < 1 or not message["more_body"] else b"...")

    async def receive() -> dict[str, object]:
        await asyncio.Event().wait()  # the client stays
        raise AssertionError

    response = await relay.send(route, "POST", "/sessions/s/messages", {}, b"{}")
    await RelayedStream(relay.stream(route, response), {})({"type": "http"}, receive, send)
    assert relayed_bytes < MAX_EVENT_BYTES + SOCKET_BUFFERS
    return writes


async def with_relay(handler: Endless, use: Callable[[Relay, Route], Awaitable[object]]) -> object:
    async with serving(handler) as (address, _):
        store = MemoryRoutingStore()
        route = Route("s", "alice", "vol", sandbox_id="sb", address=address, token="t")
        await store.put(route)
        relay = Relay(store, "default", stamp_interval_seconds=60)
        try:
            return await use(relay, route)
        finally:
            await relay.aclose()


def events(raw: bytes) -> list[tuple[str, dict[str, object]]]:
    """``(event, data)`` of each whole event in ``raw`` (not of one it ends with unfinished)."""
    found = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n")[:-1]:
        fields = dict(line.split(b": ", 1) for line in block.split(b"\n") if b": " in line)
        if b"event" in fields:
            found.append((fields[b"event"].decode(), json.loads(fields[b"data"])))
    return found


SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
            b"id: 3-1\r\nevent: session\r\ndata: {\"v\": 1}\r\n\r\n")


@pytest.mark.parametrize("piece", [
    pytest.param(lambda data: data, id="one-endless-line"),
    pytest.param(lambda data: data.replace(b"x" * 1024, b"x" * 1017 + b"\r\ndata:"), id="lines-without-a-blank-one"),
])
async def test_an_sse_event_without_end_ends_the_turn_with_sandbox_lost(piece: Callable[[bytes], bytes]) -> None:
    sandbox = Endless(SSE_HEAD + b"id: 3-2\r\nevent: text\r\ndata: ", piece)
    writes = await with_relay(sandbox, relayed)
    assert isinstance(writes, list)
    assert events(writes[0]) == [("session", {"v": 1})]
    assert b"id: 3-2" not in b"".join(writes), "not one byte of the event cut short goes out"
    ending = writes[-1]
    assert [(kind, data.get("code")) for kind, data in events(ending)] == [("error", "sandbox_lost"), ("done", None)]
    assert b"id: 3-3\r\n" in ending, "the ending's ids continue the sandbox's"
    assert sandbox.sent < MAX_EVENT_BYTES + SOCKET_BUFFERS, "the gateway read on past its cap"


async def test_an_answer_without_end_is_a_lost_sandbox() -> None:
    sandbox = Endless(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % 2**40)

    async def read_whole(relay: Relay, route: Route) -> None:
        response = await relay.send(route, "GET", "/sessions/s", {})
        with pytest.raises(SandboxLost, match=f"answer larger than {MAX_ANSWER_BYTES} bytes"):
            await response.aread()

    await with_relay(sandbox, read_whole)
    assert sandbox.sent < MAX_ANSWER_BYTES + SOCKET_BUFFERS


async def test_a_header_without_end_is_a_lost_sandbox() -> None:
    sandbox = Endless(b"HTTP/1.1 200 OK\r\nx-endless: ")

    async def send(relay: Relay, route: Route) -> None:
        with pytest.raises(SandboxLost, match=f"answer headers larger than {MAX_HEAD_BYTES} bytes"):
            await relay.send(route, "GET", "/sessions/s", {})

    await with_relay(sandbox, send)
    assert sandbox.sent < SOCKET_BUFFERS
