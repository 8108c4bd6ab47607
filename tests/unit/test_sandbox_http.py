"""The relay's HTTP client (hosting.gateway.sandbox_http) against real sockets on 127.0.0.1:
servers written byte by byte, so each test says exactly what the sandbox sent."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from hosting.gateway import sandbox_http
from hosting.gateway.relay import Relay
from hosting.gateway.relayed_stream import RelayedStream
from hosting.gateway.routing.memory import MemoryRoutingStore
from hosting.gateway.routing.records import Route
from hosting.gateway.sandbox_http import ConnectFailed, ConnectionBroken, SandboxClient

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[tuple[str, list[asyncio.StreamWriter]]]:
    """A server on a free loopback port: its address and the connections it accepted."""
    accepted: list[asyncio.StreamWriter] = []

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", accepted
    finally:
        server.close()
        for writer in accepted:
            writer.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


def client() -> SandboxClient:
    return SandboxClient(ssl.create_default_context(), connect_timeout=2.0)


async def test_a_chunked_stream_arrives_as_sent_and_the_connection_is_reused() -> None:
    requests: list[tuple[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            requests.append(await read_request(reader))
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nX-Two: a\r\nx-two: b\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
            for event in (b"event: text\ndata: 1\n\n", b"event: done\ndata: {}\n\n"):
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")

    async with serving(handler) as (address, accepted):
        sandboxes = client()
        for prompt in (b'{"prompt": "one"}', b'{"prompt": "two"}'):
            answer = await sandboxes.request(address, "POST", "/sessions/s/messages",
                                             {"authorization": "Bearer t", "content-type": "application/json"}, prompt)
            assert (answer.status, answer.headers["content-type"], answer.headers["x-two"]) == (200, "text/event-stream",
                                                                                              "a, b")
            chunks = []
            while chunk := await answer.read_any():
                chunks.append(chunk)
            assert b"".join(chunks) == b"event: text\ndata: 1\n\nevent: done\ndata: {}\n\n"
            answer.release()
        sandboxes.close()
    assert len(accepted) == 1, "the second request reused the first one's connection"
    head, body = requests[1]
    assert head.startswith(b"POST /sessions/s/messages HTTP/1.1\r\nhost: 127.0.0.1:")
    assert b"authorization: Bearer t\r\n" in head and b"content-length: 17\r\n" in head
    assert body == b'{"prompt": "two"}'


async def test_an_answer_not_read_to_its_end_closes_its_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")

    async with serving(handler) as (address, accepted):
        sandboxes = client()
        for _ in range(2):
            answer = await sandboxes.request(address, "GET", "/events", {})
            assert await answer.read_any() == b"hello"
            answer.release()
        sandboxes.close()
    assert len(accepted) == 2


async def test_a_body_that_ends_with_the_connection_is_whole() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async with serving(handler) as (address, _):
        answer = await client().request(address, "GET", "/health", {})
        assert await answer.read() == b"all of it"


async def test_nothing_listening_is_a_connect_failure() -> None:
    async with serving(read_request) as (address, _):
        pass  # closed: the port is free again
    with pytest.raises(ConnectFailed, match="cannot connect"):
        await client().request(address, "GET", "/health", {})


async def test_a_connection_cut_mid_body_is_broken_not_an_end() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        writer.transport.abort()

    async with serving(handler) as (address, _):
        answer = await client().request(address, "POST", "/sessions/s/messages", {}, b"{}")
        assert await answer.read_any() == b"hello"
        with pytest.raises(ConnectionBroken):
            await answer.read_any()


async def test_a_connection_closed_before_any_answer_is_broken() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with serving(handler) as (address, _):
        with pytest.raises(ConnectionBroken):
            await client().request(address, "POST", "/sessions/s/messages", {}, b"{}")


async def test_garbage_is_broken() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await asyncio.sleep(1)

    async with serving(handler) as (address, _):
        with pytest.raises(ConnectionBroken, match="unreadable"):
            await client().request(address, "GET", "/health", {})


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent() -> None:
    async with serving(read_request) as (address, accepted):
        with pytest.raises(ValueError, match="line break"):
            await client().request(address, "GET", "/health", {"last-event-id": "1\r\nx-injected: 1"})
    assert accepted == []


async def test_a_slow_reader_stops_the_reading_of_its_sandbox() -> None:
    """Unread bytes past the limit pause the socket: the sandbox's writes back up rather
    than the gateway's memory filling."""
    chunk = b"x" * 65536
    sent = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while sent < 64 * 1024 * 1024:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            sent += len(chunk)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with serving(handler) as (address, _):
        answer = await client().request(address, "GET", "/events", {})
        await asyncio.sleep(0.5)
        stalled_at = sent
        assert stalled_at < 16 * 1024 * 1024, "the sandbox's writes never backed up"
        received = 0
        while data := await answer.read_any():
            received += len(data)
        assert received == sent == 64 * 1024 * 1024


async def test_idle_connections_are_reused_only_while_fresh_and_dropped_when_the_sandbox_closes_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    closing = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()
            if closing.is_set():
                return

    async with serving(handler) as (address, accepted):
        sandboxes = client()
        (await sandboxes.request(address, "GET", "/health", {})).release()
        monkeypatch.setattr(sandbox_http, "KEEP_IDLE_SECONDS", 0.0)
        (await sandboxes.request(address, "GET", "/health", {})).release()
        assert len(accepted) == 2, "a connection idle past the limit was not reused"
        monkeypatch.undo()
        closing.set()
        (await sandboxes.request(address, "GET", "/health", {})).release()
        for _ in range(100):
            if not sandboxes._idle:
                break
            await asyncio.sleep(0.01)
        assert sandboxes._idle == {}, "a connection the sandbox closed stayed pooled"


async def test_a_reused_connection_that_breaks_before_any_answer_is_tried_once_more_on_a_new_one() -> None:
    """A sandbox that closed (or died) while its connection sat in the pool, before the
    close was seen here: the request goes on a new connection, not to the client as lost.
    One that broke after answering something is not sent again."""
    answers = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answers
        await read_request(reader)
        answers += 1
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        await read_request(reader)  # the next request on this connection is never answered
        writer.transport.abort()

    async with serving(handler) as (address, accepted):
        sandboxes = client()
        (await sandboxes.request(address, "GET", "/health", {})).release()
        assert (await sandboxes.request(address, "POST", "/sessions/s/messages", {}, b"{}")).status == 204
        assert len(accepted) == 2 and answers == 2

    async def half_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 O")
        await writer.drain()
        writer.transport.abort()

    async with serving(half_answer) as (address, accepted):
        sandboxes = client()
        (await sandboxes.request(address, "GET", "/health", {})).release()
        with pytest.raises(ConnectionBroken):
            await sandboxes.request(address, "POST", "/sessions/s/messages", {}, b"{}")
        assert len(accepted) == 1


async def test_the_relay_ends_the_clients_body_with_done_and_reuses_the_sandbox_connection() -> None:
    """``done`` goes out with the end of the client's body (one that stops reading at done
    finds its response complete); the sandbox's own end of body, which follows, is read,
    so its connection serves the next turn."""
    events = [b"id: 1-1\nevent: text\ndata: {}\n\n", b"id: 1-2\nevent: do", b"ne\ndata: {}\n", b"\n"]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for event in events:
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
                await asyncio.sleep(0.02)  # each its own read
            await asyncio.sleep(0.1)
            writer.write(b"0\r\n\r\n")

    store = MemoryRoutingStore()
    async with serving(handler) as (address, accepted):
        route = Route("s", "alice", "vol", sandbox_id="sb", address=address, token="t")
        await store.put(route)
        relay = Relay(store, "default", stamp_interval_seconds=60)
        sent: list[dict[str, object]] = []

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        async def receive() -> dict[str, object]:
            await asyncio.Event().wait()  # the client never leaves
            raise AssertionError

        for _ in range(2):
            sent.clear()
            response = await relay.send(route, "POST", "/sessions/s/messages", {}, b"{}")
            await RelayedStream(relay.stream(route, response), {})({"type": "http"}, receive, send)
            bodies = [(m["body"], m["more_body"]) for m in sent if m["type"] == "http.response.body"]
            # done's pieces go out together, once it is whole (the relay holds an event in progress)
            assert bodies == [(events[0], True), (b"".join(events[1:]), False)]
        await relay.aclose()
    assert len(accepted) == 1
