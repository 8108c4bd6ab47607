"""Redis-backed :class:`~claude_agent_sdk.SessionStore`.

Key layout (``P`` = prefix, default ``agent:``; every component is
percent-encoded so a ``:`` inside a project key, session id or subpath can
never make two different sessions share a key)::

    P<project>:sessions                  ZSET  session_id -> mtime (epoch ms)
    P<project>:<session>:main            LIST  main transcript, one JSON entry each
    P<project>:<session>:main:uuids      SET   entry uuids already stored (dedup)
    P<project>:<session>:sub:<subpath>   LIST  one subagent transcript
    P<project>:<session>:sub:<subpath>:uuids
    P<project>:<session>:subpaths        SET   subpaths of this session
    P<project>:<session>:summary         STRING  {"mtime": ms, "data": {...}}

Redis has no modification times of its own, so ``mtime`` is the server's
``TIME`` at append, kept in the project's ``sessions`` index and stamped on
the summary in the same transaction (the SDK requires both to share a clock).

Retention: with ``ttl_seconds`` every append re-``EXPIRE``s every key of the
session (and the project index), so a session expires as a whole once it has
been idle for the TTL. Index members whose session has expired are dropped
lazily when listed.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import redis.asyncio as redis
from claude_agent_sdk import SessionStore
from claude_agent_sdk.types import (
    SessionKey,
    SessionListSubkeysKey,
    SessionStoreEntry,
    SessionStoreListEntry,
    SessionSummaryEntry,
)
from claude_agent_sdk._internal.session_summary import fold_session_summary
from redis.exceptions import RedisError, WatchError

from . import StoreUnavailableError, validate_ttl

__all__ = ["RedisSessionStore"]


def _q(part: str) -> str:
    """Percent-encode one key component (``/`` kept for readable subpaths)."""
    return quote(part, safe="/")


class RedisSessionStore(SessionStore):
    """Session transcripts in Redis lists, one per (sub)transcript.

    Appends are optimistic transactions (``WATCH``/``MULTI``/``EXEC``): the
    entries, the uuid dedup set, the folded summary, the index and the TTLs
    land together or not at all, and a concurrent writer of the same session
    makes the loser retry instead of clobbering the summary. Single-node (or
    replicated) Redis only: a transaction spans keys in different cluster slots.
    """

    def __init__(
        self, url: str, *, ttl_seconds: int | None = None, prefix: str = "agent:"
    ) -> None:
        self._ttl = validate_ttl(ttl_seconds)
        self._prefix = prefix
        self._client = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=5
        )

    # -- key layout -------------------------------------------------------

    def _index(self, project_key: str) -> str:
        return f"{self._prefix}{_q(project_key)}:sessions"

    def _session(self, project_key: str, session_id: str) -> str:
        return f"{self._prefix}{_q(project_key)}:{_q(session_id)}"

    def _transcript(self, session: str, subpath: str | None) -> str:
        return f"{session}:main" if subpath is None else f"{session}:sub:{_q(subpath)}"

    # -- protocol ---------------------------------------------------------

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        if not entries:
            return
        project_key, session_id = key["project_key"], key["session_id"]
        subpath = key.get("subpath")
        session = self._session(project_key, session_id)
        transcript = self._transcript(session, subpath)
        uuids_key = f"{transcript}:uuids"
        subpaths_key, summary_key = f"{session}:subpaths", f"{session}:summary"
        index = self._index(project_key)

        async with self._client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(uuids_key, summary_key, subpaths_key)
                    fresh = await self._unseen(pipe, uuids_key, entries)
                    prev_raw = None if subpath is not None else await pipe.get(summary_key)
                    known_subpaths = await pipe.smembers(subpaths_key) if self._ttl else set()
                    seconds, micros = await pipe.time()
                    mtime = seconds * 1000 + micros // 1000

                    pipe.multi()
                    if fresh:
                        pipe.rpush(transcript, *(json.dumps(e) for e in fresh))
                        new_uuids = [u for u in map(_uuid_of, fresh) if u is not None]
                        if new_uuids:
                            pipe.sadd(uuids_key, *new_uuids)
                    if subpath is not None:
                        pipe.sadd(subpaths_key, subpath)
                    else:
                        prev = _summary_from_raw(session_id, prev_raw)
                        folded = fold_session_summary(prev, key, entries)
                        pipe.set(summary_key, json.dumps({"mtime": mtime, "data": folded["data"]}))
                        pipe.zadd(index, {session_id: mtime})
                    if self._ttl:
                        subs = known_subpaths | ({subpath} if subpath is not None else set())
                        for k in self._session_keys(session, subs):
                            pipe.expire(k, self._ttl)
                        pipe.expire(index, self._ttl)
                    await pipe.execute()
                    return
                except WatchError:
                    continue  # another writer touched this session: redo the fold

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        session = self._session(key["project_key"], key["session_id"])
        raw = await self._client.lrange(self._transcript(session, key.get("subpath")), 0, -1)
        # An empty list and a missing key are the same thing in Redis.
        return [json.loads(r) for r in raw] or None

    async def list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        live = await self._live_index(project_key, "main")
        return [{"session_id": sid, "mtime": mtime} for sid, mtime, _ in live]

    async def list_session_summaries(self, project_key: str) -> list[SessionSummaryEntry]:
        live = await self._live_index(project_key, "summary")
        out: list[SessionSummaryEntry] = []
        for sid, _, raw in live:
            stored = json.loads(raw)
            out.append({"session_id": sid, "mtime": stored["mtime"], "data": stored["data"]})
        return out

    async def delete(self, key: SessionKey) -> None:
        project_key, session_id = key["project_key"], key["session_id"]
        session = self._session(project_key, session_id)
        subpaths_key = f"{session}:subpaths"
        subpath = key.get("subpath")
        if subpath is not None:
            transcript = self._transcript(session, subpath)
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(transcript, f"{transcript}:uuids")
                pipe.srem(subpaths_key, subpath)
                await pipe.execute()
            return
        # Cascade: WATCH the subpath set so a subagent transcript created
        # while we delete cannot be orphaned.
        async with self._client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(subpaths_key)
                    subs = await pipe.smembers(subpaths_key)
                    pipe.multi()
                    pipe.delete(*self._session_keys(session, subs))
                    pipe.zrem(self._index(project_key), session_id)
                    await pipe.execute()
                    return
                except WatchError:
                    continue

    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        session = self._session(key["project_key"], key["session_id"])
        return sorted(await self._client.smembers(f"{session}:subpaths"))

    # -- lifecycle --------------------------------------------------------

    async def ping(self) -> None:
        """Round-trip a ``PING``; :class:`StoreUnavailableError` if Redis is down."""
        try:
            await self._client.ping()
        except RedisError as exc:
            raise StoreUnavailableError(f"Redis session store unreachable: {exc}") from exc

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    # -- helpers ----------------------------------------------------------

    def _session_keys(self, session: str, subpaths: set[str]) -> list[str]:
        """Every key belonging to one session (index membership excluded)."""
        keys = [f"{session}:main", f"{session}:main:uuids", f"{session}:subpaths", f"{session}:summary"]
        for sub in subpaths:
            transcript = self._transcript(session, sub)
            keys += [transcript, f"{transcript}:uuids"]
        return keys

    @staticmethod
    async def _unseen(
        pipe: Any, uuids_key: str, entries: list[SessionStoreEntry]
    ) -> list[SessionStoreEntry]:
        """Drop entries whose uuid is already stored (or repeated in the batch).

        The SDK retries a failed batch, and a batch whose ``EXEC`` landed but
        whose reply was lost must not be stored twice.
        """
        uuids = [_uuid_of(e) for e in entries]
        candidates = [u for u in uuids if u is not None]
        stored = await pipe.smismember(uuids_key, candidates) if candidates else []
        seen = {u for u, hit in zip(candidates, stored, strict=True) if hit}
        fresh: list[SessionStoreEntry] = []
        for entry, uuid in zip(entries, uuids, strict=True):
            if uuid is None:
                fresh.append(entry)
            elif uuid not in seen:
                seen.add(uuid)
                fresh.append(entry)
        return fresh

    async def _live_index(
        self, project_key: str, suffix: str
    ) -> list[tuple[str, int, str]]:
        """Index members whose ``<session>:<suffix>`` key still exists.

        Returns ``(session_id, mtime, value-or-type)``; members whose keys
        have expired are removed from the index on the way.
        """
        index = self._index(project_key)
        members = await self._client.zrange(index, 0, -1, withscores=True)
        if not members:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for sid, _ in members:
                key = f"{self._session(project_key, sid)}:{suffix}"
                pipe.get(key) if suffix == "summary" else pipe.type(key)
            probes = await pipe.execute()
        live, gone = [], []
        for (sid, score), probe in zip(members, probes, strict=True):
            if probe is None or probe == "none":
                gone.append(sid)
            else:
                live.append((sid, int(score), probe))
        if gone:
            await self._client.zrem(index, *gone)
        return live


def _uuid_of(entry: SessionStoreEntry) -> str | None:
    uuid = entry.get("uuid")
    return uuid if isinstance(uuid, str) and uuid else None


def _summary_from_raw(session_id: str, raw: str | None) -> SessionSummaryEntry | None:
    if raw is None:
        return None
    stored: dict[str, Any] = json.loads(raw)
    return {"session_id": session_id, "mtime": stored["mtime"], "data": stored["data"]}
