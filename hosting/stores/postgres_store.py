"""PostgreSQL-backed :class:`~claude_agent_sdk.SessionStore`.

Two tables (``T`` = ``table``, default ``agent_session_entries``)::

    T_transcripts  one row per (project_key, session_id, subpath); subpath ''
                   is the main transcript. Holds mtime (epoch ms, the
                   server's clock at the last append) and, for main rows,
                   the folded summary.
    T              one row per entry, ordered by an identity column, deleted
                   by cascade with its transcript row.
    T_epochs       one row per (project_key, session_id): the newest writer
                   epoch seen (fencing, see ``DurableSessionStore``).

Entries are stored as ``json``, not ``jsonb``: ``jsonb`` rejects ``\\u0000``
and unpaired surrogates, both of which tool output can contain, while
``json`` keeps the text verbatim.

Retention: with ``ttl_seconds``, :meth:`PostgresSessionStore.purge_expired`
deletes every session whose newest append (main or subagent) is older than
the TTL. ``append`` calls it at most once per ``purge_interval_seconds``, so
an active deployment needs nothing else; expired sessions stay readable
until the next purge, so run ``purge_expired`` from a scheduler too if the
retention window must be exact even while no session is being written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any

import psycopg
from claude_agent_sdk import SessionStore, fold_session_summary
from claude_agent_sdk.types import (
    SessionKey,
    SessionListSubkeysKey,
    SessionStoreEntry,
    SessionStoreListEntry,
    SessionSummaryEntry,
)
from psycopg import sql
from psycopg.types.json import Json
from psycopg_pool import AsyncConnectionPool

from hosting.errors import StoreUnavailable

from . import Fenced, validate_ttl

__all__ = ["PostgresSessionStore"]

log = logging.getLogger(__name__)

# Unquoted-safe identifier, short enough that the derived names (+ "_transcripts",
# index suffixes) stay under Postgres's 63-byte limit.
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,39}")
_NOW_MS = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {transcripts} (
    project_key text NOT NULL,
    session_id  text NOT NULL,
    subpath     text NOT NULL DEFAULT '',
    mtime       bigint NOT NULL,
    summary     json,
    PRIMARY KEY (project_key, session_id, subpath)
);
CREATE INDEX IF NOT EXISTS {mtime_idx} ON {transcripts} (mtime);
CREATE TABLE IF NOT EXISTS {entries} (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_key text NOT NULL,
    session_id  text NOT NULL,
    subpath     text NOT NULL,
    uuid        text,
    entry       json NOT NULL,
    FOREIGN KEY (project_key, session_id, subpath)
        REFERENCES {transcripts} ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS {order_idx} ON {entries} (project_key, session_id, subpath, seq);
CREATE UNIQUE INDEX IF NOT EXISTS {uuid_idx} ON {entries} (project_key, session_id, subpath, uuid)
    WHERE uuid IS NOT NULL;
CREATE TABLE IF NOT EXISTS {epochs} (
    project_key text NOT NULL,
    session_id  text NOT NULL,
    epoch       bigint NOT NULL,
    mtime       bigint NOT NULL,
    PRIMARY KEY (project_key, session_id)
);
"""

# Every relation _SCHEMA creates, as suffixes of the table name (keep the two in step).
_SCHEMA_SUFFIXES = ("_transcripts", "_mtime_idx", "", "_order_idx", "_uuid_idx", "_epochs")

# Raise a session's epoch unless a newer one is stored; the row is returned only if raised
# (or equal), and stays locked until the transaction ends. One conditional write: fencing.
_RAISE_EPOCH = (
    "INSERT INTO {p} (project_key, session_id, epoch, mtime) "
    f"VALUES (%s, %s, %s, {_NOW_MS}) "
    "ON CONFLICT (project_key, session_id) "
    f"DO UPDATE SET epoch = EXCLUDED.epoch, mtime = {_NOW_MS} WHERE {{p}}.epoch <= EXCLUDED.epoch "
    "RETURNING epoch"
)


class PostgresSessionStore(SessionStore):
    """Session transcripts in two Postgres tables behind a connection pool.

    The pool opens on first use (or :meth:`open`); the schema is created
    then if any of it is missing, under an advisory lock so replicas starting
    together don't race on ``CREATE TABLE``. An existing schema is left alone
    without DDL, so a role that may use the tables but not create them (a
    sandbox's own role, :mod:`hosting.stores.access`) opens the store too.
    Each append is one transaction that locks its transcript row, so
    concurrent writers of one session are serialized and the
    read-fold-write of the summary cannot lose updates.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl_seconds: int | None = None,
        table: str = "agent_session_entries",
        purge_interval_seconds: float = 60.0,
        max_connections: int = 10,
    ) -> None:
        if not _IDENTIFIER.fullmatch(table):
            raise ValueError(
                f"table must match {_IDENTIFIER.pattern} (lowercase, unquoted), got {table!r}"
            )
        self._url = url
        self._ttl = validate_ttl(ttl_seconds)
        self._table = table
        self._entries = sql.Identifier(table)
        self._transcripts = sql.Identifier(f"{table}_transcripts")
        self._epochs = sql.Identifier(f"{table}_epochs")
        self._purge_interval = purge_interval_seconds
        self._next_purge = 0.0  # monotonic; 0 = purge on the first append
        self._pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            open=False,
            kwargs={"autocommit": True, "connect_timeout": 5},
            check=AsyncConnectionPool.check_connection,
            timeout=5.0,  # a down store is reported within seconds, not psycopg_pool's default 30
        )
        self._ready = False
        self._ready_lock = asyncio.Lock()

    async def open(self) -> None:
        """Open the pool and create what is missing of the schema (idempotent; also done lazily).

        The schema is looked up first: ``CREATE ... IF NOT EXISTS`` still needs the right
        to create (Postgres checks it before it looks), which a sandbox's role lacks.
        """
        if self._ready:
            return
        async with self._ready_lock:
            if self._ready:
                return
            await self._pool.open()
            names = [f"{self._table}{suffix}" for suffix in _SCHEMA_SUFFIXES]
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT bool_and(to_regclass(n) IS NOT NULL) FROM unnest(%s::text[]) AS n", (names,)
                )
                row = await cur.fetchone()
                if not (row and row[0]):
                    schema = sql.SQL(_SCHEMA).format(
                        entries=self._entries,
                        transcripts=self._transcripts,
                        epochs=self._epochs,
                        mtime_idx=sql.Identifier(f"{self._table}_mtime_idx"),
                        order_idx=sql.Identifier(f"{self._table}_order_idx"),
                        uuid_idx=sql.Identifier(f"{self._table}_uuid_idx"),
                    )
                    async with conn.transaction():
                        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self._table,))
                        await conn.execute(schema)
            self._ready = True

    # -- protocol ---------------------------------------------------------

    async def fence(self, key: SessionKey, epoch: int) -> bool:
        return bool(await self._rows(_RAISE_EPOCH, (key["project_key"], key["session_id"], epoch)))

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry], *, epoch: int | None = None) -> None:
        """Append (see the class); with ``epoch``, the transaction first raises the session's
        epoch by a conditional write, and rolls back (:class:`Fenced`) if a newer one is there."""
        if not entries:
            return
        await self.open()
        pk, sid, sub = key["project_key"], key["session_id"], key.get("subpath") or ""
        uuids = [_uuid_of(e) for e in entries]
        q = self._sql
        async with self._pool.connection() as conn, conn.transaction():
            if epoch is not None:
                cur = await conn.execute(q(_RAISE_EPOCH), (pk, sid, epoch))
                if await cur.fetchone() is None:
                    raise Fenced(f"epoch {epoch} of session {sid} was replaced by a newer one")
            # Upsert-and-lock the transcript row: concurrent appends to this
            # transcript queue here until we commit. The UPDATE's clock is
            # read after the lock is granted, so mtimes follow commit order.
            cur = await conn.execute(
                q(
                    "INSERT INTO {t} (project_key, session_id, subpath, mtime) "
                    f"VALUES (%s, %s, %s, {_NOW_MS}) "
                    "ON CONFLICT (project_key, session_id, subpath) "
                    f"DO UPDATE SET mtime = {_NOW_MS} RETURNING summary"
                ),
                (pk, sid, sub),
            )
            row = await cur.fetchone()
            prev_data = row[0] if row else None
            cur = await conn.execute(
                q(
                    "INSERT INTO {e} (project_key, session_id, subpath, uuid, entry) "
                    "SELECT %s, %s, %s, x.uuid, x.entry::json "
                    "FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS x(uuid, entry, n) "
                    "ORDER BY x.n ON CONFLICT DO NOTHING RETURNING uuid"
                ),
                (pk, sid, sub, uuids, [json.dumps(e) for e in entries]),
            )
            inserted = [u for (u,) in await cur.fetchall()]
            if not sub:
                fresh = _fresh(entries, uuids, inserted)
                prev: SessionSummaryEntry | None = (
                    None
                    if prev_data is None
                    else {"session_id": sid, "mtime": 0, "data": prev_data}
                )
                data = fold_session_summary(prev, key, fresh)["data"]
                await conn.execute(
                    q(
                        "UPDATE {t} SET summary = %s "
                        "WHERE project_key = %s AND session_id = %s AND subpath = ''"
                    ),
                    (Json(data), pk, sid),
                )
        await self._maybe_purge()

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        rows = await self._rows(
            "SELECT entry FROM {e} WHERE project_key = %s AND session_id = %s AND subpath = %s ORDER BY seq",
            (key["project_key"], key["session_id"], key.get("subpath") or ""),
        )
        return [entry for (entry,) in rows] or None

    async def list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        rows = await self._rows(
            "SELECT session_id, mtime FROM {t} WHERE project_key = %s AND subpath = ''", (project_key,)
        )
        return [{"session_id": s, "mtime": m} for s, m in rows]

    async def list_session_summaries(self, project_key: str) -> list[SessionSummaryEntry]:
        rows = await self._rows(
            "SELECT session_id, mtime, summary FROM {t} "
            "WHERE project_key = %s AND subpath = '' AND summary IS NOT NULL",
            (project_key,),
        )
        return [{"session_id": s, "mtime": m, "data": d} for s, m, d in rows]

    async def delete(self, key: SessionKey) -> None:
        await self.open()
        where = "project_key = %s AND session_id = %s"
        params: tuple[str, ...] = (key["project_key"], key["session_id"])
        subpath = key.get("subpath")
        if subpath:  # a targeted delete; otherwise cascade to every subpath
            where += " AND subpath = %s"
            params += (subpath,)
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(self._sql(f"DELETE FROM {{t}} WHERE {where}"), params)
            if not subpath:
                await conn.execute(self._sql(f"DELETE FROM {{p}} WHERE {where}"), params)

    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        rows = await self._rows(
            "SELECT subpath FROM {t} WHERE project_key = %s AND session_id = %s "
            "AND subpath <> '' ORDER BY subpath",
            (key["project_key"], key["session_id"]),
        )
        return [s for (s,) in rows]

    # -- retention --------------------------------------------------------

    async def purge_expired(self) -> int:
        """Delete sessions idle for longer than the TTL; return how many.

        A session's age is its newest transcript row (main or subagent), so
        a session whose subagent is still writing is kept whole. No-op
        without a TTL.
        """
        if self._ttl is None:
            return 0
        # The outer mtime test is re-checked against the locked row, so a
        # session revived by a concurrent append is not deleted under it.
        rows = await self._rows(
            f"WITH cutoff AS (SELECT {_NOW_MS} - %s AS ms), "
            "idle AS (SELECT project_key, session_id FROM {t} GROUP BY 1, 2 "
            "HAVING max(mtime) < (SELECT ms FROM cutoff)) "
            "DELETE FROM {t} WHERE mtime < (SELECT ms FROM cutoff) "
            "AND (project_key, session_id) IN (SELECT * FROM idle) "
            "RETURNING project_key, session_id",
            (self._ttl * 1000,),
        )
        await self._rows(  # epochs of sessions gone (or never written) for as long
            f"DELETE FROM {{p}} WHERE mtime < {_NOW_MS} - %s AND NOT EXISTS (SELECT 1 FROM {{t}} "
            "WHERE {t}.project_key = {p}.project_key AND {t}.session_id = {p}.session_id) RETURNING 1",
            (self._ttl * 1000,),
        )
        return len(set(rows))

    # -- lifecycle --------------------------------------------------------

    async def ping(self) -> None:
        """Connect and ``SELECT 1``; :class:`~hosting.errors.StoreUnavailable` if Postgres is down.

        Uses a fresh connection rather than the pool so the error is the
        driver's own (e.g. "connection refused") instead of a pool timeout.
        """
        try:
            conn = await psycopg.AsyncConnection.connect(self._url, connect_timeout=5)
            async with conn:
                await conn.execute("SELECT 1")
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"Postgres session store unreachable: {exc}") from exc

    async def aclose(self) -> None:
        """Close the pool; the store cannot be reopened."""
        await self._pool.close()

    # -- helpers ----------------------------------------------------------

    def _sql(self, template: str) -> sql.Composed:
        return sql.SQL(template).format(e=self._entries, t=self._transcripts, p=self._epochs)

    async def _rows(self, template: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Run one statement on a pooled connection and return every row it yields."""
        await self.open()
        async with self._pool.connection() as conn:
            cur = await conn.execute(self._sql(template), params)
            return await cur.fetchall()

    async def _maybe_purge(self) -> None:
        """Opportunistic retention: at most one purge per interval, never failing an append."""
        if self._ttl is None or time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + self._purge_interval
        try:
            purged = await self.purge_expired()
        except psycopg.Error:
            log.exception("purging expired sessions failed; retrying in %ss", self._purge_interval)
            return
        if purged:
            log.info("purged %d expired session(s) from %s", purged, self._table)


def _uuid_of(entry: SessionStoreEntry) -> str | None:
    uuid = entry.get("uuid")
    return uuid if isinstance(uuid, str) and uuid else None


def _fresh(
    entries: list[SessionStoreEntry], uuids: list[str | None], inserted: list[str | None]
) -> list[SessionStoreEntry]:
    """The entries the insert actually stored (duplicates by uuid were skipped)."""
    remaining = set(inserted)
    fresh: list[SessionStoreEntry] = []
    for entry, uuid in zip(entries, uuids, strict=True):
        if uuid is None:
            fresh.append(entry)
        elif uuid in remaining:
            remaining.discard(uuid)
            fresh.append(entry)
    return fresh
