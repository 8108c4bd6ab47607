"""The Redis and Postgres session stores against real servers.

Both adapters must pass the SDK's own conformance suite (every optional
method included), and beyond it what the suite cannot see: retention,
concurrent writers, uuid dedup, cascade deletes and a down server.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import redis.asyncio as aioredis
from claude_agent_sdk import SessionStore, list_sessions_from_store, project_key_for_directory
from claude_agent_sdk.testing import run_session_store_conformance
from claude_agent_sdk.types import SessionKey
from psycopg import sql

from hosting.errors import StoreUnavailable
from hosting.stores import open_session_store
from hosting.stores.postgres_store import PostgresSessionStore
from hosting.stores.redis_store import RedisSessionStore
from tests.support.stores import running_postgres, running_redis

pytestmark = pytest.mark.stores

Store = RedisSessionStore | PostgresSessionStore
OPTIONAL = ("list_sessions", "list_session_summaries", "delete", "list_subkeys")
MAIN: SessionKey = {"project_key": "proj", "session_id": "s1"}
SUB: SessionKey = {**MAIN, "subpath": "subagents/agent-1"}


def _entries(tag: str, n: int, start: int = 0) -> list[Any]:
    return [{"type": "user", "uuid": f"{tag}-{i}", "n": i} for i in range(start, start + n)]


@dataclass
class Backend:
    """One server plus a factory of stores that it closes afterwards."""

    name: str
    url: str
    made: list[Store] = field(default_factory=list)

    async def make(self, namespace: str | None = None, **kwargs: Any) -> Store:
        """A store in ``namespace`` (key prefix / table); a fresh one by default."""
        ns = namespace or self.namespace()
        store: Store
        if self.name == "redis":
            store = RedisSessionStore(self.url, prefix=ns, **kwargs)
        else:
            store = PostgresSessionStore(self.url, table=ns, **kwargs)
        self.made.append(store)
        return store

    def namespace(self) -> str:
        return f"t{uuid.uuid4().hex[:12]}" + (":" if self.name == "redis" else "")

    async def session_ids(self, namespace: str) -> set[str]:
        """Session ids owning anything in the backend, read behind the adapter."""
        if self.name == "redis":
            async with aioredis.Redis.from_url(self.url, decode_responses=True) as client:
                keys: list[str] = await client.keys(f"{namespace}*")  # type: ignore[assignment]
            # <prefix><project>:<session>:...; <prefix><project>:sessions is the index.
            rest = [k[len(namespace) :].split(":") for k in keys]
            return {parts[1] for parts in rest if len(parts) > 2}
        ids: set[str] = set()
        async with await psycopg.AsyncConnection.connect(self.url) as conn:
            for table in (namespace, f"{namespace}_transcripts"):
                query = sql.SQL("SELECT session_id FROM {}").format(sql.Identifier(table))
                ids |= {sid for (sid,) in await (await conn.execute(query)).fetchall()}
        return ids


@pytest.fixture(params=["redis", "postgres"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    name: str = request.param
    server = Backend(name, request.getfixturevalue(f"{name}_url"))
    yield server
    for store in server.made:
        await store.aclose()


only_redis = pytest.mark.parametrize("backend", ["redis"], indirect=True)
only_postgres = pytest.mark.parametrize("backend", ["postgres"], indirect=True)


async def test_sdk_conformance_including_optional_methods(backend: Backend) -> None:
    probe = await backend.make()
    for method in OPTIONAL:  # the suite silently skips what isn't overridden
        assert getattr(type(probe), method) is not getattr(SessionStore, method), method
    await run_session_store_conformance(backend.make)


async def test_sdk_lists_sessions_through_the_summaries(backend: Backend, tmp_path: Path) -> None:
    store = await backend.make()
    key: SessionKey = {"project_key": project_key_for_directory(tmp_path), "session_id": "abc"}
    prompt: Any = {
        "type": "user",
        "uuid": "u1",
        "message": {"role": "user", "content": "find me papers"},
    }
    await store.append(key, [prompt])
    await store.append({**key, "subpath": "subagents/agent-1"}, _entries("sub", 1))
    infos = await list_sessions_from_store(store, directory=str(tmp_path))
    assert [(i.session_id, i.first_prompt) for i in infos] == [("abc", "find me papers")]


async def test_concurrent_appends_to_two_sessions_do_not_mix(backend: Backend) -> None:
    store = await backend.make()
    a: SessionKey = {"project_key": "proj", "session_id": "a"}
    b: SessionKey = {"project_key": "proj", "session_id": "b"}

    async def write(key: SessionKey, tag: str) -> None:
        for batch in range(20):
            await store.append(key, _entries(tag, 5, start=batch * 5))

    await asyncio.gather(write(a, "a"), write(b, "b"))
    assert await store.load(a) == _entries("a", 100)
    assert await store.load(b) == _entries("b", 100)


async def test_concurrent_writers_of_one_session_lose_nothing(backend: Backend) -> None:
    ns = backend.namespace()
    first, second = await backend.make(ns), await backend.make(ns)  # two "replicas"

    async def write(store: Store, tag: str) -> None:
        for i in range(15):
            entry: Any = {"type": "x", "uuid": f"{tag}-{i}", "customTitle": tag}
            await store.append(MAIN, [entry])

    await asyncio.gather(write(first, "one"), write(second, "two"))
    loaded: list[Any] | None = await first.load(MAIN)
    assert loaded is not None and len(loaded) == 30
    for tag in ("one", "two"):  # each writer's own order survives
        mine = [e["uuid"] for e in loaded if e["customTitle"] == tag]
        assert mine == [f"{tag}-{i}" for i in range(15)]
    # The summary is the fold of every batch, the last committed one last.
    (summary,) = await first.list_session_summaries("proj")
    assert summary["data"]["custom_title"] == loaded[-1]["customTitle"]


async def test_entries_are_deduplicated_by_uuid(backend: Backend) -> None:
    store = await backend.make()
    untitled = {"type": "title", "title": "no uuid"}
    batch = [*_entries("u", 2), untitled]
    await store.append(MAIN, batch)
    await store.append(MAIN, batch)  # the SDK's retry of a batch that had landed
    await store.append(MAIN, [*_entries("u", 1, start=2), *_entries("u", 1, start=2)])
    expected = [*_entries("u", 2), untitled, untitled, *_entries("u", 1, start=2)]
    assert await store.load(MAIN) == expected


async def test_delete_removes_the_session_and_all_its_subkeys(backend: Backend) -> None:
    ns = backend.namespace()
    store = await backend.make(ns)
    subs: list[SessionKey] = [{**MAIN, "subpath": f"subagents/agent-{i}"} for i in range(2)]
    other: SessionKey = {"project_key": "proj", "session_id": "s2"}
    await store.append(MAIN, _entries("m", 2))
    for i, sub in enumerate(subs):
        await store.append(sub, _entries(f"sub{i}", 2))
    await store.append(other, _entries("o", 1))

    await store.delete(MAIN)

    assert await store.load(MAIN) is None
    for sub in subs:
        assert await store.load(sub) is None
    assert await store.list_subkeys(MAIN) == []
    assert [s["session_id"] for s in await store.list_sessions("proj")] == ["s2"]
    assert [s["session_id"] for s in await store.list_session_summaries("proj")] == ["s2"]
    assert await store.load(other) == _entries("o", 1)
    assert await backend.session_ids(ns) == {"s2"}
    # The deleted uuids are forgotten too: the session can be written afresh.
    await store.append(MAIN, _entries("m", 1))
    assert await store.load(MAIN) == _entries("m", 1)


@only_redis
async def test_redis_ttl_expires_idle_sessions_as_a_whole(backend: Backend) -> None:
    ns = backend.namespace()
    store = await backend.make(ns, ttl_seconds=2)
    await store.append(MAIN, _entries("m", 1))
    await store.append(SUB, _entries("s", 1))
    async with aioredis.Redis.from_url(backend.url, decode_responses=True) as client:
        ttls = [await client.ttl(k) for k in await client.keys(f"{ns}*")]
        assert len(ttls) == 7 and all(0 < t <= 2 for t in ttls)  # every key of the layout

        await asyncio.sleep(1.2)
        await store.append(SUB, _entries("s", 1, start=1))  # activity anywhere refreshes all
        await asyncio.sleep(1.2)  # past the first appends' deadline
        assert await store.load(MAIN) == _entries("m", 1)
        assert [s["session_id"] for s in await store.list_sessions("proj")] == ["s1"]

        await asyncio.sleep(2.3)
        assert await store.load(MAIN) is None
        assert await store.load(SUB) is None
        assert await store.list_sessions("proj") == []
        assert await client.keys(f"{ns}*") == []


@only_postgres
async def test_postgres_purge_removes_idle_sessions_and_keeps_fresh_ones(backend: Backend) -> None:
    ns = backend.namespace()
    store = await backend.make(ns, ttl_seconds=1, purge_interval_seconds=3600)
    assert isinstance(store, PostgresSessionStore)
    old: SessionKey = {"project_key": "proj", "session_id": "old"}
    busy: SessionKey = {"project_key": "proj", "session_id": "busy"}
    fresh: SessionKey = {"project_key": "proj", "session_id": "fresh"}
    await store.append(old, _entries("o", 1))
    await store.append({**old, "subpath": "subagents/agent-1"}, _entries("os", 1))
    await store.append(busy, _entries("b", 1))
    await asyncio.sleep(1.3)
    await store.append({**busy, "subpath": "subagents/agent-1"}, _entries("bs", 1))
    await store.append(fresh, _entries("f", 1))

    assert await store.purge_expired() == 1
    assert await store.load(old) is None
    assert sorted(s["session_id"] for s in await store.list_sessions("proj")) == ["busy", "fresh"]
    assert await store.load(busy) == _entries("b", 1)  # its subagent kept it alive
    assert await backend.session_ids(ns) == {"busy", "fresh"}
    assert await store.purge_expired() == 0

    # append() purges by itself, at most once per interval.
    eager = await backend.make(ns, ttl_seconds=1, purge_interval_seconds=0)
    await asyncio.sleep(1.3)
    await eager.append({"project_key": "proj", "session_id": "newest"}, _entries("n", 1))
    assert [s["session_id"] for s in await eager.list_sessions("proj")] == ["newest"]


async def test_without_ttl_nothing_expires(backend: Backend) -> None:
    ns = backend.namespace()
    store = await backend.make(ns, ttl_seconds=None)
    await store.append(MAIN, _entries("m", 1))
    await store.append(SUB, _entries("s", 1))
    if isinstance(store, PostgresSessionStore):
        assert await store.purge_expired() == 0
    else:
        async with aioredis.Redis.from_url(backend.url, decode_responses=True) as client:
            assert {await client.ttl(k) for k in await client.keys(f"{ns}*")} == {-1}
    assert await store.load(MAIN) == _entries("m", 1)


@pytest.mark.parametrize(
    ("url", "cls"),
    [
        ("redis://localhost:6379/0", RedisSessionStore),
        ("rediss://user:pw@cache.example:6380", RedisSessionStore),
        ("postgresql://app@db/agent", PostgresSessionStore),
        ("postgres://app@db/agent", PostgresSessionStore),
    ],
)
async def test_open_session_store_picks_the_adapter_by_scheme(url: str, cls: type) -> None:
    store = open_session_store(url, ttl_seconds=60)
    try:
        assert type(store) is cls
    finally:
        await store.aclose()


@pytest.mark.parametrize("url", ["mysql://u:secret@db/x", "sqlite:///tmp/x.db", "localhost:6379"])
def test_open_session_store_rejects_other_schemes(url: str) -> None:
    accepted = "accepted: postgres://, postgresql://, redis://, rediss://"
    with pytest.raises(ValueError, match=accepted) as err:
        open_session_store(url, ttl_seconds=None)
    assert "secret" not in str(err.value)


@pytest.mark.parametrize("ttl", [0, -5, 1.5, True])
def test_open_session_store_rejects_bad_ttl(ttl: Any) -> None:
    with pytest.raises(ValueError, match="ttl_seconds"):
        open_session_store("redis://localhost", ttl_seconds=ttl)


@pytest.mark.parametrize("server", [running_redis, running_postgres], ids=["redis", "postgres"])
async def test_ping_raises_a_connection_error_once_the_server_stops(
    server: Callable[[], AbstractContextManager[str]],
) -> None:
    with server() as url:
        store = open_session_store(url, ttl_seconds=None)
        await store.ping()
        await store.append(MAIN, _entries("m", 1))  # leaves pooled connections behind
    port = urlsplit(url).port
    try:
        started = time.monotonic()
        # The driver's own words name the address, e.g. "... 127.0.0.1, port
        # 5432 failed: Connection refused" / "Error 111 connecting to 127.0.0.1:6379".
        with pytest.raises(StoreUnavailable, match=rf"store unreachable: .*\b{port}\b"):
            await store.ping()
        assert time.monotonic() - started < 15
    finally:
        await store.aclose()
