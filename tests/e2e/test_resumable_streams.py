"""Resumable streams, end to end: a client that loses its connection mid-turn re-attaches
(``GET /sessions/{id}/events``) and reads every event after the last one it saw, exactly
once, then ``done``; on the server, through the gateway, and by the Python client on its
own behind a proxy that cuts the connection mid-stream. Real servers, the real SDK and
CLI, the local model.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from hosting.client import AgentClient, DoneEvent, StreamLost, TextEvent
from tests.support.gateways import ALICE, BOB, auth
from tests.support.turns import event_order, post_turn

pytestmark = pytest.mark.e2e

SLOW = "Tell me a long story [[slow:0.3]]"
Event = tuple[str, str, dict[str, Any]]


def read_events(url: str, method: str, path: str, *, headers: dict[str, str] | None = None,
                body: dict[str, Any] | None = None, stop_after: int | None = None) -> list[Event]:
    """(type, id, data) of each event; with ``stop_after``, the connection is closed after that many."""
    events: list[Event] = []
    with httpx.Client(timeout=120) as client, connect_sse(client, method, f"{url}{path}", json=body,
                                                          headers=headers or {}) as source:
        assert source.response.status_code == 200, source.response.read()
        for sse in source.iter_sse():
            if sse.data:
                events.append((sse.event, sse.id, json.loads(sse.data)))
                if stop_after is not None and len(events) == stop_after:
                    break
    return events


def assert_one_whole_turn(events: list[Event]) -> None:
    ids = [event_order(event_id) for _, event_id, _ in events]
    assert len({turn for turn, _ in ids}) == 1, ids
    assert [seq for _, seq in ids] == list(range(1, len(ids) + 1)), ids  # none missing, none twice
    assert events[0][0] == "session" and events[-1][0] == "done" and events[-2][0] == "result"


def dropped_then_reattached(url: str, session: str, headers: dict[str, str] | None = None) -> list[Event]:
    before = read_events(url, "POST", f"/sessions/{session}/messages", headers=headers, body={"prompt": SLOW},
                         stop_after=3)
    assert [kind for kind, _, _ in before] == ["session", "text", "text"]
    after = read_events(url, "GET", f"/sessions/{session}/events",
                        headers={**(headers or {}), "Last-Event-ID": before[-1][1]})
    return before + after


def test_a_dropped_stream_reattaches_with_every_event_once_then_the_last_turn_replays(start_server):
    url = start_server().base_url
    assert post_turn(url, "resume-1", "Remember this value: R1").types[-1] == "done"
    events = dropped_then_reattached(url, "resume-1")
    assert_one_whole_turn(events)
    assert "Local model answer to: Tell me a long story" in "".join(d.get("text", "") for k, _, d in events if k == "text")

    # After the turn: the whole last turn with no id, its tail with ?after=, nothing after done.
    assert read_events(url, "GET", "/sessions/resume-1/events") == events
    assert read_events(url, "GET", f"/sessions/resume-1/events?after={events[4][1]}") == events[5:]
    assert read_events(url, "GET", f"/sessions/resume-1/events?after={events[-1][1]}") == []
    earlier_turn = f"{event_order(events[0][1])[0] - 1}-3"  # an id from before this turn: all of it
    assert read_events(url, "GET", "/sessions/resume-1/events", headers={"Last-Event-ID": earlier_turn}) == events


def test_reattach_refuses_what_it_cannot_serve(start_server):
    url = start_server().base_url
    assert httpx.get(f"{url}/sessions/never-ran/events").status_code == 404
    turn = post_turn(url, "resume-2", "hello")
    number, last_seq = event_order(turn.events[-1]["id"])
    for bad in ("12", "abc-1", f"{number + 1}-1", f"{number}-{last_seq + 1}"):
        response = httpx.get(f"{url}/sessions/resume-2/events", headers={"Last-Event-ID": bad})
        assert response.status_code == 400 and "event" in response.json()["detail"], (bad, response.text)
    assert httpx.get(f"{url}/sessions/bad.id/events").status_code == 400
    deleted = httpx.delete(f"{url}/sessions/resume-2")
    assert deleted.status_code == 204
    assert httpx.get(f"{url}/sessions/resume-2/events").status_code == 404


def test_reattach_through_the_gateway_keeps_auth_and_ownership(local_gateways):
    url = local_gateways.start().base_url
    events = dropped_then_reattached(url, "g-resume", auth(ALICE))
    assert_one_whole_turn(events)
    assert httpx.get(f"{url}/sessions/g-resume/events", headers=auth(BOB)).status_code == 404, "not bob's"
    assert httpx.get(f"{url}/sessions/g-resume/events").status_code == 401
    assert httpx.get(f"{url}/sessions/not-yet/events", headers=auth(ALICE)).status_code == 404
    tail = read_events(url, "GET", f"/sessions/g-resume/events?after={events[-3][1]}", headers=auth(ALICE))
    assert tail == events[-2:]


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 that cuts its first connection once ``cut_after`` bytes of
    response went through (mid-stream), and passes every later connection whole (or,
    with ``then_refuse``, closes each at once)."""

    def __init__(self, upstream_port: int, cut_after: int, then_refuse: bool = False) -> None:
        self._upstream = upstream_port
        self._cut_after = cut_after
        self._then_refuse = then_refuse
        self.connections = 0
        self.cut = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            if self._then_refuse and self.cut.is_set():
                client.close()
                continue
            limit = self._cut_after if self.connections == 1 else None
            upstream = socket.create_connection(("127.0.0.1", self._upstream))
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, limit), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
                sent += len(chunk)
                if limit is not None and sent >= limit:
                    self.cut.set()
                    break
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self._stopping = True
        self._listener.close()


@pytest.fixture
def proxy_to(request: pytest.FixtureRequest) -> Iterator[Any]:
    made: list[CuttingProxy] = []

    def make(port: int, cut_after: int, then_refuse: bool = False) -> CuttingProxy:
        made.append(CuttingProxy(port, cut_after, then_refuse))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


def test_the_python_client_survives_a_connection_cut_mid_stream(start_server, proxy_to):
    server = start_server()
    proxy = proxy_to(int(server.base_url.rsplit(":", 1)[1]), cut_after=900)

    async def run() -> list[Any]:
        async with AgentClient(f"http://127.0.0.1:{proxy.port}", session_id="client-resume") as agent:
            return [event async for event in agent.astream(SLOW)]

    events = asyncio.run(run())
    assert proxy.cut.is_set() and proxy.connections >= 2  # it was cut, and the client came back
    assert isinstance(events[-1], DoneEvent)
    whole = read_events(server.base_url, "GET", "/sessions/client-resume/events")
    assert [event.id for event in events] == [event_id for _, event_id, _ in whole]
    assert "".join(e.text for e in events if isinstance(e, TextEvent)) == \
        "".join(d.get("text", "") for k, _, d in whole if k == "text")


def test_the_python_client_says_so_when_it_cannot_reattach(start_server, proxy_to):
    server = start_server()
    proxy = proxy_to(int(server.base_url.rsplit(":", 1)[1]), cut_after=900, then_refuse=True)
    seen: list[Any] = []

    async def run() -> None:
        async with AgentClient(f"http://127.0.0.1:{proxy.port}", session_id="client-gone") as agent:
            async for event in agent.astream(SLOW):
                seen.append(event)

    with pytest.raises(StreamLost, match="re-attaches failed"):
        asyncio.run(run())
    assert seen and not isinstance(seen[-1], DoneEvent) and proxy.connections == 4  # the turn, then 3 tries


def test_the_python_client_keeps_its_connection_from_turn_to_turn(start_server, proxy_to):
    """After ``done`` the client reads the body's end, so the next turn goes on the same
    connection (over TLS to a remote gateway, that is a handshake saved per turn)."""
    server = start_server()
    proxy = proxy_to(int(server.base_url.rsplit(":", 1)[1]), cut_after=1 << 40)

    async def run() -> list[str]:
        async with AgentClient(f"http://127.0.0.1:{proxy.port}", session_id="client-keeps") as agent:
            return [await agent.arun("Say hello") for _ in range(3)]

    assert all(asyncio.run(run()))
    assert proxy.connections == 1
