"""Per-sandbox store credentials (hosting/stores/access.py) against real Redis and PostgreSQL.

A sandbox's URL must carry the adapter through everything it does for the sessions
granted to it, and nothing else: not through the adapter, not with the raw driver.
Each engine runs once per module, set up the way a deployment should be (an admin
with a password and no superuser powers, no password-less way in), so the
credentials are what stands between one sandbox and another session.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import psycopg
import pytest
import redis
import redis.asyncio as aioredis
from claude_agent_sdk.types import SessionKey
from psycopg import errors as pg_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoPermissionError, ResponseError

from harness.processes import free_port
from hosting.errors import StoreUnavailable
from hosting.server.durable import STORE_PROJECT_KEY
from hosting.stores import Fenced, open_session_store
from hosting.stores.access import (
    PROJECT_KEY,
    SandboxStoreAccess,
    StoreAccessError,
    UnknownSandbox,
    _sandbox_url,
    open_sandbox_access,
    sandbox_user,
)
from hosting.stores.postgres_store import PostgresSessionStore
from hosting.stores.protocol import DurableSessionStore
from tests.support.stores import running_postgres, running_redis

pytestmark = pytest.mark.stores

ADMIN_PASSWORD = "Adm1n-S3cret/do:not@leak"
ADMIN_QUOTED = quote(ADMIN_PASSWORD, safe="")
INSTALLATION = "it-access"
TABLE = "agent_session_entries"
INDEX = "agent:research-agent:sessions"


def _entries(tag: str, n: int) -> list[Any]:
    return [{"type": "user", "uuid": f"{tag}-{uuid.uuid4().hex[:8]}-{i}", "n": i} for i in range(n)]


def _key(session_id: str, subpath: str | None = None) -> SessionKey:
    key: SessionKey = {"project_key": STORE_PROJECT_KEY, "session_id": session_id}
    if subpath is not None:
        key["subpath"] = subpath
    return key


def _sid() -> str:
    return str(uuid.uuid4())


def _sandbox() -> str:
    return f"sb-{uuid.uuid4().hex[:10]}"


# -- servers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_admin_url() -> Iterator[str]:
    """Redis with an admin ACL user and the default user switched off (no way in without a password)."""
    with running_redis() as url:
        port = urlsplit(url).port
        with redis.Redis(port=port) as client:
            client.execute_command("ACL", "SETUSER", "gwadmin", "on", f">{ADMIN_PASSWORD}", "~*", "&*", "+@all")
            client.execute_command("ACL", "SETUSER", "default", "off")
        yield f"redis://gwadmin:{ADMIN_QUOTED}@127.0.0.1:{port}/0"


@pytest.fixture(scope="module")
def postgres_admin_url() -> Iterator[str]:
    """PostgreSQL with passwords required over TCP and a CREATEROLE admin that owns its database."""
    with running_postgres() as url:
        port = urlsplit(url).port
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE gwadmin LOGIN CREATEROLE PASSWORD '{ADMIN_PASSWORD}'")
            conn.execute("CREATE DATABASE agentstore OWNER gwadmin")
            row = conn.execute("SHOW hba_file").fetchone()
            assert row is not None
            Path(row[0]).write_text("local all all trust\n"
                                    "host all all 127.0.0.1/32 scram-sha-256\n"
                                    "host all all ::1/128 scram-sha-256\n")
            conn.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while True:  # the reload is asynchronous: wait until trust is gone
            try:
                psycopg.connect(url, connect_timeout=2).close()
            except psycopg.OperationalError:
                break
            assert time.monotonic() < deadline, "pg_hba.conf reload did not take"
            time.sleep(0.05)
        yield f"postgresql://gwadmin:{ADMIN_QUOTED}@127.0.0.1:{port}/agentstore"


class Engine:
    """One engine's admin side, plus the stores and connections a test opens (closed after it)."""

    def __init__(self, name: str, admin_url: str, access: SandboxStoreAccess) -> None:
        self.name = name
        self.admin_url = admin_url
        self.access = access
        self._closers: list[Any] = []

    def store(self, url: str, ttl_seconds: int | None = None) -> DurableSessionStore:
        store = open_session_store(url, ttl_seconds=ttl_seconds)
        self._closers.append(store.aclose)
        return store

    def admin(self) -> DurableSessionStore:
        return self.store(self.admin_url)

    async def raw(self, url: str) -> Any:
        """A driver connection (a single socket, no reconnects) with ``url``'s credentials."""
        if self.name == "redis":
            client = aioredis.Redis.from_url(url, decode_responses=True, single_connection_client=True,
                                             retry=Retry(NoBackoff(), 0))
            await client.ping()
            self._closers.append(client.aclose)
            return client
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        self._closers.append(conn.close)
        return conn

    async def sandbox(self, sessions: list[str] | None = None) -> tuple[str, str]:
        """A sandbox id and its URL, granted ``sessions`` if given."""
        sandbox_id = _sandbox()
        url = await self.access.create(sandbox_id)
        if sessions is not None:
            await self.access.grant(sandbox_id, sessions)
        return sandbox_id, url

    async def close(self) -> None:
        for close in reversed(self._closers):
            with suppress(Exception):
                await close()


@pytest.fixture(scope="module")
async def prepared(redis_admin_url: str, postgres_admin_url: str) -> AsyncIterator[dict[str, SandboxStoreAccess]]:
    made = {"redis": open_sandbox_access(redis_admin_url, INSTALLATION),
            "postgres": open_sandbox_access(postgres_admin_url, INSTALLATION)}
    for access in made.values():
        await access.prepare()
    yield made
    for access in made.values():
        await access.aclose()


@pytest.fixture(params=["redis", "postgres"])
async def engine(request: pytest.FixtureRequest, prepared: dict[str, SandboxStoreAccess]) -> AsyncIterator[Engine]:
    name: str = request.param
    made = Engine(name, request.getfixturevalue(f"{name}_admin_url"), prepared[name])
    yield made
    await made.close()


only = {name: pytest.mark.parametrize("engine", [name], indirect=True) for name in ("redis", "postgres")}


async def refused(call: Awaitable[Any]) -> Exception:
    """Await ``call`` and return the refusal it raised (a test failure if it went through)."""
    try:
        result = await call
    except (NoPermissionError, ResponseError, psycopg.Error, Fenced) as exc:
        return exc
    pytest.fail(f"went through: {result!r}")


def redis_refusal(exc: Exception) -> bool:
    """NOPERM, or its in-script form."""
    text = str(exc)
    return isinstance(exc, NoPermissionError) or "no permissions" in text or "can't access" in text


# -- names and inputs (no server needed) ------------------------------------------


def test_the_project_key_is_the_servers() -> None:
    assert PROJECT_KEY == STORE_PROJECT_KEY


def test_user_names_fit_postgres_and_keep_installations_apart() -> None:
    longest = "a" * 40
    assert len(sandbox_user("a-rather-long-installation-name", longest).encode()) <= 63
    assert sandbox_user("one", "sb-1") != sandbox_user("two", "sb-1")
    assert sandbox_user("one", "sb-1").startswith("agent_sbx_")


BAD_SANDBOX_IDS = ["", "A", "sb_1", "a" * 41, "a/b", "a b", "sb-1\n", "é"]


@pytest.mark.parametrize("scheme", ["redis", "postgresql"])
@pytest.mark.parametrize("sandbox_id", BAD_SANDBOX_IDS)
async def test_bad_sandbox_ids_are_refused_before_the_server_is_asked(scheme: str, sandbox_id: str) -> None:
    # Nothing listens on this port: a ValueError (not StoreUnavailable) proves no call was made.
    access = open_sandbox_access(f"{scheme}://admin:pw@127.0.0.1:{free_port()}/0", "inst")
    try:
        for call in (access.create(sandbox_id), access.grant(sandbox_id, []), access.delete(sandbox_id)):
            with pytest.raises(ValueError, match="sandbox id"):
                await call
    finally:
        await access.aclose()


@pytest.mark.parametrize("scheme", ["redis", "postgresql"])
@pytest.mark.parametrize("sessions", [["not-a-uuid"], [str(uuid.uuid4()).upper()], ["*"],
                                      [str(uuid.uuid4()) + "*"], str(uuid.uuid4())],
                         ids=["not-a-uuid", "upper-case", "glob", "uuid-then-glob", "not-a-list"])  # xdist workers must agree
async def test_bad_session_ids_are_refused_before_the_server_is_asked(scheme: str, sessions: Any) -> None:
    access = open_sandbox_access(f"{scheme}://admin:pw@127.0.0.1:{free_port()}/0", "inst")
    try:
        with pytest.raises(ValueError, match="session"):
            await access.grant("sb-1", sessions)
    finally:
        await access.aclose()


@pytest.mark.parametrize("installation", ["", "Inst", "a_b", "x" * 64])
def test_bad_installations_are_refused(installation: str) -> None:
    with pytest.raises(ValueError, match="installation"):
        open_sandbox_access("redis://localhost", installation)


def test_other_schemes_are_refused_without_echoing_the_url() -> None:
    with pytest.raises(ValueError, match="scheme") as caught:
        open_sandbox_access(f"mysql://admin:{ADMIN_QUOTED}@db/x", "inst")
    assert ADMIN_PASSWORD not in str(caught.value) and ADMIN_QUOTED not in str(caught.value)


def test_the_sandbox_url_keeps_the_options_and_drops_the_admins_credentials() -> None:
    admin = ("postgresql://admin:adminpw@db.example:6543/store?sslmode=verify-full&sslrootcert=/ca.pem"
             "&password=other&sslkey=/admin.key&sslpassword=keypw&options=-c%20search_path%3Dagent")
    url = _sandbox_url(admin, "agent_sbx_x_sb-1", "s3cr/et")
    parts = urlsplit(url)
    assert (parts.scheme, parts.hostname, parts.port, parts.path) == ("postgresql", "db.example", 6543, "/store")
    assert parts.username == "agent_sbx_x_sb-1" and parts.password == "s3cr%2Fet"
    assert "sslmode=verify-full" in parts.query and "sslrootcert=%2Fca.pem" in parts.query
    assert "options=-c%20search_path%3Dagent" in parts.query  # libpq decodes %20, not +
    for secret in ("adminpw", "other", "admin.key", "keypw"):
        assert secret not in url
    redis_url = _sandbox_url("rediss://:pw@[::1]:6380/2?ssl_cert_reqs=required", "u", "p")
    assert redis_url == "rediss://u:p@[::1]:6380/2?ssl_cert_reqs=required"


# -- the granted session ----------------------------------------------------------


@pytest.mark.parametrize("ttl", [None, 3600], ids=["no-ttl", "ttl"])
async def test_the_adapter_works_on_the_granted_session(engine: Engine, ttl: int | None) -> None:
    mine = _sid()
    _, url = await engine.sandbox([mine])
    store = engine.store(url, ttl_seconds=ttl)
    await store.ping()
    assert await store.fence(_key(mine), 2)
    first, second = _entries("m", 2), _entries("m", 1)
    await store.append(_key(mine), first, epoch=2)
    await store.append(_key(mine), first, epoch=2)  # a retried batch: deduplicated
    await store.append(_key(mine, "subagents/agent-1"), _entries("s", 1), epoch=2)
    assert await store.load(_key(mine)) == first
    assert await store.list_subkeys({"project_key": STORE_PROJECT_KEY, "session_id": mine}) == ["subagents/agent-1"]

    # Fencing still holds: a newer epoch seen, the older writer is refused.
    assert await store.fence(_key(mine), 3)
    assert not await store.fence(_key(mine), 2)
    with pytest.raises(Fenced):
        await store.append(_key(mine), second, epoch=2)
    await store.append(_key(mine), second, epoch=3)
    assert await store.load(_key(mine)) == first + second

    # The admin sees what the sandbox wrote, listed too (the sandbox may add to the index).
    admin = engine.admin()
    assert await admin.load(_key(mine)) == first + second
    assert mine in [s["session_id"] for s in await admin.list_sessions(STORE_PROJECT_KEY)]

    await store.delete(_key(mine))
    assert await store.load(_key(mine)) is None
    assert await admin.load(_key(mine)) is None
    assert await admin.load(_key(mine, "subagents/agent-1")) is None
    assert mine not in [s["session_id"] for s in await admin.list_sessions(STORE_PROJECT_KEY)]


@only["postgres"]
async def test_postgres_purge_by_a_sandbox_reaches_only_its_own_rows(engine: Engine) -> None:
    mine, other = _sid(), _sid()
    admin = engine.admin()
    await admin.append(_key(other), _entries("o", 1))
    _, url = await engine.sandbox([mine])
    sandbox = PostgresSessionStore(url, ttl_seconds=1, purge_interval_seconds=3600)
    try:
        await sandbox.append(_key(mine), _entries("m", 1))
        async with await psycopg.AsyncConnection.connect(engine.admin_url, autocommit=True) as conn:
            await conn.execute(f"UPDATE {TABLE}_transcripts SET mtime = 0 WHERE session_id = ANY(%s)", ([mine, other],))
        assert await sandbox.purge_expired() == 1
        assert await admin.load(_key(mine)) is None
        assert await admin.load(_key(other)) is not None
    finally:
        await sandbox.aclose()


# -- other sessions -----------------------------------------------------------------


async def test_other_sessions_are_out_of_the_adapters_reach(engine: Engine) -> None:
    mine, other = _sid(), _sid()
    admin = engine.admin()
    other_main, other_sub = _entries("o", 2), _entries("os", 1)
    assert await admin.fence(_key(other), 5)
    await admin.append(_key(other), other_main, epoch=5)
    await admin.append(_key(other, "subagents/a"), other_sub, epoch=5)
    _, url = await engine.sandbox([mine])
    store = engine.store(url)
    await store.append(_key(mine), _entries("m", 1))

    if engine.name == "redis":  # refused outright
        assert redis_refusal(await refused(store.load(_key(other))))
        assert redis_refusal(await refused(store.list_subkeys({"project_key": STORE_PROJECT_KEY,
                                                                "session_id": other})))
        assert redis_refusal(await refused(store.list_sessions(STORE_PROJECT_KEY)))
    else:  # row-level security: there is nothing to see
        assert await store.load(_key(other)) is None
        assert await store.list_subkeys({"project_key": STORE_PROJECT_KEY, "session_id": other}) == []
        assert [s["session_id"] for s in await store.list_sessions(STORE_PROJECT_KEY)] == [mine]
    await refused(store.append(_key(other), _entries("x", 1)))
    await refused(store.append(_key(other), _entries("x", 1), epoch=99))
    await refused(store.append(_key(other, "subagents/a"), _entries("x", 1)))
    with suppress(Exception):  # refused (Redis) or finds nothing to delete (Postgres)
        await store.delete(_key(other))
    with suppress(Exception):
        await store.delete(_key(other, "subagents/a"))
    try:
        raised = await store.fence(_key(other), 99)
    except (NoPermissionError, psycopg.Error):
        pass  # refused, as it should be
    else:
        assert not raised

    assert await admin.load(_key(other)) == other_main
    assert await admin.load(_key(other, "subagents/a")) == other_sub
    assert other in [s["session_id"] for s in await admin.list_sessions(STORE_PROJECT_KEY)]
    assert await admin.fence(_key(other), 5), "the other session's epoch was raised"
    await admin.append(_key(other), _entries("o", 1), epoch=5)


@only["redis"]
async def test_redis_raw_commands_beyond_the_grant_are_refused(engine: Engine) -> None:
    mine, other = _sid(), _sid()
    await engine.admin().append(_key(other), _entries("o", 1))
    _, url = await engine.sandbox([mine])
    raw = await engine.raw(url)
    theirs = f"agent:research-agent:{other}"
    script = "return redis.call('GET', KEYS[1])"
    sha = await raw.script_load(script)  # allowed (redis-py's fallback), but runs with the caller's rights
    hidden = await raw.script_load(f"return redis.call('LRANGE', '{theirs}:main', 0, -1)")
    attacks: list[tuple[str, ...]] = [
        ("KEYS", "*"), ("SCAN", "0"), ("GET", f"{theirs}:summary"), ("LRANGE", f"{theirs}:main", "0", "-1"),
        ("SMEMBERS", f"{theirs}:main:uuids"), ("DEL", f"{theirs}:main"), ("RPUSH", f"{theirs}:main", "x"),
        ("SET", f"{theirs}:epoch", "0"), ("EXPIRE", f"{theirs}:main", "1"), ("DUMP", f"{theirs}:main"),
        ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("ACL", "LIST"), ("ACL", "USERS"),
        ("ACL", "SETUSER", sandbox_user(INSTALLATION, "sb-x"), "on", "~*", "+@all"),
        ("SMEMBERS", INDEX), ("SSCAN", INDEX, "0"), ("SISMEMBER", INDEX, other), ("SREM", INDEX, other),
        ("EXPIRE", INDEX, "0"), ("DEL", INDEX), ("SPOP", INDEX), ("RENAME", INDEX, f"agent:research-agent:{mine}:x"),
        ("SELECT", "1"), ("EVAL", script, "1", f"{theirs}:summary"), ("SCRIPT", "FLUSH"),
        ("EVALSHA", sha, "1", f"{theirs}:summary"), ("EVALSHA", hidden, "0"),
        ("CLIENT", "LIST"), ("CLIENT", "KILL", "USER", "gwadmin"), ("INFO",), ("MONITOR",),
        ("OBJECT", "ENCODING", f"{theirs}:main"),
        ("SUBSCRIBE", "x"), ("PUBLISH", "x", "y"), ("SHUTDOWN",), ("FUNCTION", "LIST"),
    ]
    for command in attacks:
        exc = await refused(raw.execute_command(*command))
        assert redis_refusal(exc), (command, exc)
    # Its own keys, through the same script: fine.
    await raw.set(f"agent:research-agent:{mine}:epoch", "1")
    assert await raw.evalsha(sha, 1, f"agent:research-agent:{mine}:epoch") == "1"
    # The residual right: adding to the index (it tells whether the member was there).
    assert await raw.sadd(INDEX, mine) in (0, 1)


@only["redis"]
async def test_redis_a_database_other_than_0_is_selected_and_kept(engine: Engine) -> None:
    admin_url = engine.admin_url.replace("/0", "/3")
    access = open_sandbox_access(admin_url, "it-access-db3")
    try:
        await access.prepare()
        mine = _sid()
        url = await access.create("sb-db3")
        await access.grant("sb-db3", [mine])
        assert urlsplit(url).path == "/3"
        await engine.store(url).append(_key(mine), _entries("m", 1))
        assert await engine.store(admin_url).load(_key(mine)) is not None
        assert await engine.admin().load(_key(mine)) is None  # not in database 0
        await access.delete("sb-db3")
    finally:
        await access.aclose()


@only["postgres"]
async def test_postgres_raw_statements_beyond_the_grant_are_refused(engine: Engine) -> None:
    mine, other = _sid(), _sid()
    await engine.admin().append(_key(other), _entries("o", 2))
    sandbox_id, url = await engine.sandbox([mine])
    store = engine.store(url)
    await store.append(_key(mine), _entries("m", 1))
    conn = await engine.raw(url)
    me = sandbox_user(INSTALLATION, sandbox_id)

    async def rows(query: str, *params: Any) -> list[tuple[Any, ...]]:
        cur = await conn.execute(query, params or None)
        return await cur.fetchall() if cur.description else []

    for table in (TABLE, f"{TABLE}_transcripts", f"{TABLE}_epochs"):
        assert {r[0] for r in await rows(f"SELECT session_id FROM {table}")} <= {mine}
    assert await rows(f"SELECT role, session_ids FROM {TABLE}_grants") == [(me, [mine])]

    # Writes for another session: refused by the policy, or nothing to touch.
    pk = f"'{STORE_PROJECT_KEY}'"
    for query in (
        f"INSERT INTO {TABLE}_transcripts (project_key, session_id, mtime) VALUES ({pk}, %s, 0)",
        f"INSERT INTO {TABLE}_transcripts (project_key, session_id, mtime) VALUES ({pk}, %s, 0) "
        "ON CONFLICT (project_key, session_id, subpath) DO UPDATE SET mtime = 0",
        f"INSERT INTO {TABLE}_epochs (project_key, session_id, epoch, mtime) VALUES ({pk}, %s, 99, 0) "
        "ON CONFLICT (project_key, session_id) DO UPDATE SET epoch = 99",
        f"INSERT INTO {TABLE} (project_key, session_id, subpath, entry) VALUES ({pk}, %s, '', '{{}}')",
    ):
        with pytest.raises(pg_errors.InsufficientPrivilege):
            await rows(query, other)
    for table in (TABLE, f"{TABLE}_transcripts", f"{TABLE}_epochs"):
        cur = await conn.execute(f"DELETE FROM {table} WHERE session_id = %s", (other,))
        assert cur.rowcount == 0
    cur = await conn.execute(f"UPDATE {TABLE}_transcripts SET mtime = 0 WHERE session_id = %s", (other,))
    assert cur.rowcount == 0
    cur = await conn.execute(f"UPDATE {TABLE}_epochs SET epoch = 0 WHERE session_id = %s", (other,))
    assert cur.rowcount == 0

    refused_statements = [
        f"INSERT INTO {TABLE}_grants (role, project_key, session_ids) VALUES ('{me}x', 'research-agent', '{{}}')",
        f"UPDATE {TABLE}_grants SET session_ids = array_append(session_ids, '{other}')",
        f"DELETE FROM {TABLE}_grants", f"TRUNCATE {TABLE}_transcripts CASCADE", f"TRUNCATE {TABLE}_epochs",
        f"UPDATE {TABLE} SET entry = '{{}}'",
        f"UPDATE {TABLE}_transcripts SET session_id = '{other}' WHERE session_id = '{mine}'",
        "CREATE TABLE stolen (x int)", "CREATE SCHEMA gwadmin", f"CREATE SCHEMA \"{me}\"",
        "CREATE FUNCTION public.unnest(text[]) RETURNS int LANGUAGE sql AS 'SELECT 1'",
        f"ALTER TABLE {TABLE}_transcripts DISABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {TABLE}_grants DISABLE ROW LEVEL SECURITY",
        f"DROP POLICY agent_sandbox_sessions ON {TABLE}", f"DROP TABLE {TABLE}_epochs",
        f"CREATE TRIGGER t BEFORE INSERT ON {TABLE} FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger()",
        "SET ROLE gwadmin", "SET ROLE postgres", "SET SESSION AUTHORIZATION gwadmin",
        f"ALTER ROLE \"{me}\" CREATEROLE", f"ALTER ROLE \"{me}\" BYPASSRLS", "CREATE ROLE evil LOGIN",
        f"GRANT \"{me}\" TO gwadmin", "CREATE DATABASE evil",
    ]
    for statement in refused_statements:
        with pytest.raises(pg_errors.InsufficientPrivilege):
            await rows(statement)

    # Turning row security off does not bypass it: the query fails instead.
    await rows("SET row_security = off")
    with pytest.raises(pg_errors.InsufficientPrivilege):
        await rows(f"SELECT * FROM {TABLE}_transcripts")
    await rows("RESET row_security")
    # Its group role is the one role it may become, and that sees nothing at all.
    group = me[: -len(sandbox_id) - 1]
    await rows(f"SET ROLE \"{group}\"")
    assert await rows(f"SELECT * FROM {TABLE}_transcripts") == []
    assert await rows(f"SELECT * FROM {TABLE}_grants") == []
    await rows("RESET ROLE")

    admin = engine.admin()
    assert len(await admin.load(_key(other)) or []) == 2
    assert other in [s["session_id"] for s in await admin.list_sessions(STORE_PROJECT_KEY)]


# -- lifecycle ---------------------------------------------------------------------


async def test_a_user_without_grants_connects_but_reaches_nothing(engine: Engine) -> None:
    somebody = _sid()
    await engine.admin().append(_key(somebody), _entries("o", 1))
    _, url = await engine.sandbox()
    store = engine.store(url)
    await store.ping()
    if engine.name == "redis":
        assert redis_refusal(await refused(store.load(_key(somebody))))
        raw = await engine.raw(url)
        assert redis_refusal(await refused(raw.get(f"agent:research-agent:{somebody}:summary")))
        assert redis_refusal(await refused(raw.sadd(INDEX, somebody)))  # not even the index before a grant
    else:
        assert await store.load(_key(somebody)) is None
        assert await store.list_sessions(STORE_PROJECT_KEY) == []
        conn = await engine.raw(url)
        for table in (TABLE, f"{TABLE}_transcripts", f"{TABLE}_epochs"):
            assert (await (await conn.execute(f"SELECT count(*) FROM {table}")).fetchone()) == (0,)
    await refused(store.append(_key(somebody), _entries("x", 1)))
    assert await engine.admin().load(_key(somebody)) is not None


async def test_grant_replaces_the_earlier_grant_at_once(engine: Engine) -> None:
    first, second = _sid(), _sid()
    sandbox_id, url = await engine.sandbox([first])
    store = engine.store(url)
    await store.append(_key(first), _entries("a", 1))

    await engine.access.grant(sandbox_id, [second])  # the open connections see it on their next call
    await store.append(_key(second), _entries("b", 1))
    assert await store.load(_key(second)) is not None
    if engine.name == "redis":
        assert redis_refusal(await refused(store.load(_key(first))))
    else:
        assert await store.load(_key(first)) is None
    await refused(store.append(_key(first), _entries("a", 1)))

    await engine.access.grant(sandbox_id, [first, second])
    assert await store.load(_key(first)) is not None and await store.load(_key(second)) is not None
    await engine.access.grant(sandbox_id, [])
    if engine.name == "postgres":
        assert await store.load(_key(first)) is None
    else:
        await refused(store.load(_key(first)))


async def _is_cut(engine: Engine, raw: Any) -> bool:
    try:
        if engine.name == "redis":
            await raw.ping()
        else:
            await raw.execute("SELECT 1")
    except (redis.ConnectionError, psycopg.OperationalError):
        return True
    return False


async def _connects(engine: Engine, url: str) -> bool:
    try:
        await engine.raw(url)
    except (redis.ConnectionError, psycopg.OperationalError):  # redis-py's AuthenticationError is one
        return False
    return True


async def test_delete_cuts_the_open_connections_and_the_url(engine: Engine) -> None:
    mine = _sid()
    sandbox_id, url = await engine.sandbox([mine])
    await engine.store(url).append(_key(mine), _entries("m", 1))
    raw = await engine.raw(url)
    assert sandbox_id in await engine.access.sandboxes()

    await engine.access.delete(sandbox_id)

    assert await _is_cut(engine, raw)
    assert not await _connects(engine, url)
    assert sandbox_id not in await engine.access.sandboxes()
    await engine.access.delete(sandbox_id)  # idempotent
    with pytest.raises(UnknownSandbox):
        await engine.access.grant(sandbox_id, [mine])
    assert await engine.admin().load(_key(mine)) is not None  # the session itself stays


async def test_create_again_resets_the_password_and_the_grants(engine: Engine) -> None:
    mine = _sid()
    sandbox_id, old_url = await engine.sandbox([mine])
    old = await engine.raw(old_url)
    new_url = await engine.access.create(sandbox_id)
    assert new_url != old_url
    assert await _is_cut(engine, old)
    assert not await _connects(engine, old_url)
    store = engine.store(new_url)
    await store.ping()
    await refused(store.append(_key(mine), _entries("m", 1)))  # no grant survives a reset
    await engine.access.grant(sandbox_id, [mine])
    await store.append(_key(mine), _entries("m", 1))


async def test_sandboxes_lists_this_installations_users_only(engine: Engine) -> None:
    other_installation = open_sandbox_access(engine.admin_url, "it-access-other")
    try:
        await other_installation.prepare()
        mine, _ = await engine.sandbox()
        theirs = _sandbox()
        await other_installation.create(theirs)
        await other_installation.create(mine)  # the same sandbox id, another installation: another user
        assert mine in await engine.access.sandboxes() and theirs not in await engine.access.sandboxes()
        assert {mine, theirs} <= set(await other_installation.sandboxes())
        await other_installation.delete(mine)
        assert mine in await engine.access.sandboxes()
        await other_installation.delete(theirs)
    finally:
        await other_installation.aclose()


async def test_prepare_again_changes_nothing(engine: Engine) -> None:
    mine = _sid()
    _, url = await engine.sandbox([mine])
    await engine.access.prepare()
    store = engine.store(url)
    await store.append(_key(mine), _entries("m", 1))
    assert await store.load(_key(mine)) is not None


@only["postgres"]
async def test_postgres_prepare_refuses_when_sandboxes_could_create_objects(engine: Engine) -> None:
    async with await psycopg.AsyncConnection.connect(engine.admin_url, autocommit=True) as conn:
        await conn.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
        try:
            with pytest.raises(StoreAccessError, match="create objects in public"):
                await engine.access.prepare()
        finally:
            await conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        await conn.execute(f"GRANT TRUNCATE ON {TABLE}_transcripts TO PUBLIC")
        try:
            with pytest.raises(StoreAccessError, match="TRUNCATE"):
                await engine.access.prepare()
        finally:
            await conn.execute(f"REVOKE TRUNCATE ON {TABLE}_transcripts FROM PUBLIC")
    await engine.access.prepare()


@only["postgres"]
async def test_postgres_a_normal_url_still_creates_the_schema(engine: Engine) -> None:
    store = PostgresSessionStore(engine.admin_url, table="fresh_tables")
    try:
        await store.append(_key(_sid()), _entries("m", 1))  # creates the tables as before
    finally:
        await store.aclose()


@only["redis"]
async def test_redis_prepare_warns_when_the_default_user_is_open(engine: Engine,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    client = aioredis.Redis.from_url(engine.admin_url)
    try:
        await client.execute_command("ACL", "SETUSER", "default", "on", "nopass")
        await engine.access.prepare()
        assert "default user needs no password" in caplog.text
    finally:
        await client.execute_command("ACL", "SETUSER", "default", "off")
        await client.aclose()


def test_redis_users_survive_a_restart_with_an_aclfile() -> None:
    binary = shutil.which("redis-server")
    assert binary is not None
    tmp = Path(tempfile.mkdtemp(prefix="redis-aclfile-"))
    aclfile = tmp / "users.acl"
    aclfile.write_text(f"user default off\nuser gwadmin on >{ADMIN_PASSWORD} ~* &* +@all\n")
    port = free_port()
    admin_url = f"redis://gwadmin:{ADMIN_QUOTED}@127.0.0.1:{port}/0"

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(tmp), "--aclfile", str(aclfile)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with suppress(redis.ConnectionError), redis.Redis.from_url(admin_url) as c:
                c.ping()
                return proc
            time.sleep(0.05)
        proc.kill()
        pytest.fail("redis-server with an aclfile did not start")

    async def make() -> str:
        access = open_sandbox_access(admin_url, INSTALLATION)
        try:
            await access.prepare()
            url = await access.create("sb-kept")
            await access.grant("sb-kept", [_sid()])
            return url
        finally:
            await access.aclose()

    proc = start()
    try:
        url = asyncio.run(make())
        proc.terminate()
        proc.wait(timeout=10)
        assert f"user {sandbox_user(INSTALLATION, 'sb-kept')} " in aclfile.read_text()
        proc = start()
        with redis.Redis.from_url(url) as client:
            assert client.ping()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


# -- secrets in errors ---------------------------------------------------------------


def _no_secret(exc: BaseException) -> None:
    """Neither the message, nor the traceback, nor a chained driver exception holds the password."""
    assert exc.__cause__ is None and exc.__context__ is None, repr(exc.__context__)
    text = "".join(traceback.format_exception(exc)) + repr(exc.args)
    for secret in (ADMIN_PASSWORD, ADMIN_QUOTED, "Adm1n-S3cret"):
        assert secret not in text, text


async def test_errors_never_carry_the_admins_password(engine: Engine) -> None:
    parts = urlsplit(engine.admin_url)
    wrong = engine.admin_url.replace(ADMIN_QUOTED, quote("Adm1n-S3cret-wrong/pw", safe=""))
    down = engine.admin_url.replace(f":{parts.port}/", f":{free_port()}/")
    for url, expected in ((wrong, (StoreAccessError, StoreUnavailable)), (down, StoreUnavailable)):
        access = open_sandbox_access(url, INSTALLATION)
        try:
            for call in (access.prepare(), access.create("sb-1"), access.grant("sb-1", []), access.delete("sb-1"),
                         access.sandboxes()):
                with pytest.raises(expected) as caught:
                    await call
                _no_secret(caught.value)
        finally:
            await access.aclose()
    # A malformed URL: whatever the driver says about it is scrubbed too.
    malformed = engine.admin_url.replace(f":{parts.port}/", ":no-port/")
    with pytest.raises((ValueError, StoreAccessError, StoreUnavailable)) as caught:
        access = open_sandbox_access(malformed, INSTALLATION)
        try:
            await access.prepare()
        finally:
            await access.aclose()
    _no_secret(caught.value)
    with pytest.raises(UnknownSandbox) as unknown:
        await engine.access.grant("sb-never-made", [_sid()])
    _no_secret(unknown.value)
    with pytest.raises(ValueError) as bad:
        await engine.access.create("Bad_Id")
    _no_secret(bad.value)
    # And the URL handed to a sandbox has the sandbox's credentials only.
    _, url = await engine.sandbox()
    assert ADMIN_PASSWORD not in url and ADMIN_QUOTED not in url and "gwadmin" not in url
