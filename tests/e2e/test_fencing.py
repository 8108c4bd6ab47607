"""Fencing: a sandbox the gateway replaced cannot write to the session any more.

First the stores themselves (real Redis and PostgreSQL): an append carrying an epoch
older than the session's is refused and changes nothing, checked and written in one
step even under concurrent writers. Then end to end: a gateway (local backend, the
session store in Redis or Postgres) whose sandbox is stopped (SIGSTOP) mid-turn moves
the session to a new sandbox; when the old one is let go on (SIGCONT) its writes are
refused, the store holds no line of it from after the move, the gateway relays
nothing more of it, and recall works on the new sandbox.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from httpx_sse import connect_sse

from harness.processes import descendants
from hosting.contract import durable_session_id
from hosting.server.durable import store_key
from hosting.stores import Fenced, open_session_store
from hosting.stores.protocol import DurableSessionStore
from tests.support.gateways import ALICE, Gateways, auth
from tests.support.polling import wait_for
from tests.support.turns import post_turn

pytestmark = pytest.mark.stores

RECALL = "What value did I ask you to remember?"


def entry(text: str) -> dict[str, Any]:
    return {"type": "user", "uuid": str(uuid.uuid4()), "message": {"role": "user", "content": text}}


@pytest.fixture(params=["redis", "postgres"])
def store_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


async def with_store(url: str, body: Any) -> Any:
    store = open_session_store(url, ttl_seconds=None)
    try:
        return await body(store)
    finally:
        await store.aclose()


def test_a_stale_epoch_is_refused_and_changes_nothing(store_url: str) -> None:
    key = {"project_key": "fencing", "session_id": f"s-{uuid.uuid4().hex[:8]}"}

    async def body(store: DurableSessionStore) -> None:
        await store.append(key, [entry("one")], epoch=100)
        assert await store.fence(key, 200) is True  # a new sandbox takes over
        with pytest.raises(Fenced):
            await store.append(key, [entry("from the old sandbox")], epoch=100)
        assert await store.fence(key, 150) is False  # an older one cannot take it back
        await store.append(key, [entry("two")], epoch=200)
        await store.append(key, [entry("three")], epoch=300)  # a newer writer raises the epoch itself
        with pytest.raises(Fenced):
            await store.append(key, [entry("late")], epoch=200)
        await store.append(key, [entry("unfenced")])  # no epoch: a server without a gateway
        texts = [e["message"]["content"] for e in await store.load(key) or []]
        assert texts == ["one", "two", "three", "unfenced"]
        await store.delete(key)
        await store.append(key, [entry("after delete")], epoch=1)  # a deleted session starts over
        assert [e["message"]["content"] for e in await store.load(key) or []] == ["after delete"]
        await store.delete(key)

    asyncio.run(with_store(store_url, body))


def test_concurrent_old_writers_never_land_after_the_fence(store_url: str) -> None:
    key = {"project_key": "fencing", "session_id": f"c-{uuid.uuid4().hex[:8]}"}

    async def body(store: DurableSessionStore) -> None:
        await store.fence(key, 10)

        async def old_writer(n: int) -> str:
            try:
                await store.append(key, [entry(f"old-{n}")], epoch=10)
            except Fenced:
                return "refused"
            return "landed"

        async def takeover() -> None:
            await asyncio.sleep(0.01)
            assert await store.fence(key, 20)
            await store.append(key, [entry("new")], epoch=20)

        outcomes = await asyncio.gather(*(old_writer(n) for n in range(30)), takeover())
        stored = [e["message"]["content"] for e in await store.load(key) or []]
        # Whatever landed landed before the takeover's first write; nothing old after it.
        assert stored[-1] == "new" and stored.count("new") == 1
        assert len(stored) - 1 == outcomes.count("landed")
        await store.delete(key)

    asyncio.run(with_store(store_url, body))


@pytest.fixture
def stopped_processes() -> Iterator[list[int]]:
    """Pids the test stops; each is continued and killed with its children at the end."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        for victim in [pid, *descendants(pid)]:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(victim, sig)
                except ProcessLookupError:
                    pass


def stored_texts(url: str, session_id: str, namespace: str) -> list[str]:
    async def body(store: DurableSessionStore) -> list[str]:
        entries = await store.load(store_key(durable_session_id(session_id, namespace))) or []
        return [json.dumps(e) for e in entries]

    return list(asyncio.run(with_store(url, body)))


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_a_replaced_sandbox_that_wakes_up_is_fenced_off(local_gateways: Gateways, store_url: str, redis_url: str,
                                                        stopped_processes: list[int]) -> None:
    gateway = local_gateways.start(AGENT_SESSION_STORE=store_url, GATEWAY_REDIS_URL=redis_url, GATEWAY_WARM_POOL="0",
                                   GATEWAY_IDLE_TIMEOUT_SECONDS="8")  # stamps (and move checks) every 2 s
    url, session = gateway.base_url, f"fence-{uuid.uuid4().hex[:6]}"
    assert "error" not in post_turn(url, session, "Remember this value: F7", headers=auth(ALICE)).types
    old = gateway.route(session)
    assert old is not None and old["pid"]

    # A long turn on the old sandbox; stop it after two text events.
    events: list[tuple[str, dict[str, Any]]] = []
    stopped = threading.Event()

    def first_client() -> None:
        with httpx.Client(timeout=120) as client, connect_sse(
                client, "POST", f"{url}/sessions/{session}/messages", headers=auth(ALICE),
                json={"prompt": "Tell me a long story [[slow:0.5]]"}) as source:
            for sse in source.iter_sse():
                if sse.data:
                    events.append((sse.event, json.loads(sse.data)))
                    if [kind for kind, _ in events].count("text") == 2 and not stopped.is_set():
                        for pid in [old["pid"], *descendants(old["pid"])]:  # the server and its CLI: frozen
                            os.kill(pid, signal.SIGSTOP)
                            stopped_processes.append(pid)
                        stopped.set()

    reader = threading.Thread(target=first_client)
    reader.start()
    assert stopped.wait(60)
    # As on a node cut off from the cluster: the engine cannot remove the old sandbox (its
    # record is hidden from the backend), and the new one cannot see its disk (the route
    # names another volume, as with Kubernetes, where a session lives in the store only).
    data = gateway.data_dir
    (data / "sandboxes" / f"{old['sandbox_id']}.json").rename(data / f"{old['sandbox_id']}.hidden")
    routing = redis.Redis.from_url(redis_url)
    routing.hset(f"gw:{local_gateways.installation}:route:alice/{session}", "volume", f"{old['volume']}-elsewhere")
    routing.close()
    before_move = stored_texts(store_url, session, f"{local_gateways.installation}/alice")

    recall = post_turn(url, session, RECALL, headers=auth(ALICE))  # detects the stopped sandbox, moves on
    new = gateway.route(session)
    assert new is not None and new["sandbox_id"] != old["sandbox_id"]
    assert recall.of("session")[0]["resumed"] is True and "You asked me to remember F7." in recall.text

    reader.join(60)  # the old stream was cut when the session moved, before the old sandbox woke up
    assert not reader.is_alive()
    kinds = [kind for kind, _ in events]
    assert kinds.count("text") == 2 and kinds[-2:] == ["error", "done"], kinds
    assert events[-2][1]["code"] == "sandbox_lost"

    for pid in stopped_processes:  # the old sandbox goes on with its turn
        os.kill(pid, signal.SIGCONT)
    sandbox_log = data / "sandboxes" / f"{old['sandbox_id']}.log"
    # Its write is refused: fenced ("replaced by"), or its own store credential, removed with
    # it when it was replaced, no longer logs in (a mirror failure), whichever it meets first.
    wait_for(lambda: any(sign in sandbox_log.read_text() for sign in ("replaced by", "session store mirror failed")),
             timeout=60)
    time.sleep(1)
    after = stored_texts(store_url, session, f"{local_gateways.installation}/alice")
    assert not any("Tell me a long story" in line and '"assistant"' in line for line in after)
    assert [line for line in after if line not in before_move and "long story" in line] == []

    again = post_turn(url, session, RECALL, headers=auth(ALICE))
    assert "You asked me to remember F7." in again.text
