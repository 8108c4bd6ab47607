"""Redis-backed :class:`~claude_agent_sdk.SessionStore`.

Key layout (``P`` = prefix, default ``agent:``; every component is
percent-encoded so a ``:`` inside a project key, session id or subpath can
never make two different sessions share a key)::

    P<project>:sessions                  SET   session ids with a main transcript
    P<project>:<session>:main            LIST  main transcript, one JSON entry each
    P<project>:<session>:main:uuids      SET   entry uuids already stored (dedup)
    P<project>:<session>:sub:<subpath>   LIST  one subagent transcript
    P<project>:<session>:sub:<subpath>:uuids
    P<project>:<session>:subpaths        SET   subpaths of this session
    P<project>:<session>:summary         STRING  {"mtime": ms, "data": {...}}
    P<project>:<session>:epoch           STRING  the newest writer epoch seen (fencing)

Redis has no modification times of its own, so ``mtime`` is the server's
``TIME`` at the last main-transcript append, kept in the summary; both
``list_sessions`` and ``list_session_summaries`` read it from there, so they
share one clock as the SDK requires.

Retention: with ``ttl_seconds`` every append re-``EXPIRE``s every key of the
session (and the project index), so a session expires as a whole once it has
been idle for the TTL. Index members whose session has expired are dropped
lazily when listed.

A sandbox's own Redis user (:mod:`hosting.stores.access`) may only *add* to the
shared project index: ``EXPIRE`` or ``SREM`` on it would let one session's
sandbox drop the others from it. When Redis refuses this client that upkeep
(``NOPERM``), the adapter drops it from its transactions from then on: the
index is still added to, it gets no TTL, and members of deleted or expired
sessions go when the index is listed (the summary key is the liveness test).
"""

from __future__ import annotations

import json
from contextlib import suppress
from typing import Any, cast
from urllib.parse import quote

import redis.asyncio as redis
from claude_agent_sdk import SessionStore, fold_session_summary
from claude_agent_sdk.types import (
    SessionKey,
    SessionListSubkeysKey,
    SessionStoreEntry,
    SessionStoreListEntry,
    SessionSummaryEntry,
)
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoPermissionError, RedisError, WatchError

from hosting.errors import StoreUnavailable

from . import Fenced, validate_ttl

__all__ = ["RedisSessionStore"]

# KEYS[1] epoch key; ARGV[1] epoch, ARGV[2] ttl seconds or "". Returns the epoch now stored.
_FENCE = (
    "local stored = tonumber(redis.call('GET', KEYS[1]) or '0') "
    "local mine = tonumber(ARGV[1]) "
    "if mine < stored then return tostring(stored) end "
    "redis.call('SET', KEYS[1], ARGV[1]) "
    "if ARGV[2] ~= '' then redis.call('EXPIRE', KEYS[1], ARGV[2]) end "
    "return ARGV[1]"
)


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

    def __init__(self, url: str, *, ttl_seconds: int | None = None, prefix: str = "agent:") -> None:
        self._ttl = validate_ttl(ttl_seconds)
        self._prefix = prefix
        # decode_responses: replies are str (redis-py types them bytes | str,
        # hence the casts below).
        self._client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=5,
            # Explicit, because with redis-py's default a pooled connection
            # left dead by a Redis restart fails its next PING instead of
            # being re-dialed.
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        )
        self._fence = self._client.register_script(_FENCE)
        self._index_upkeep = True
        """Whether transactions also ``EXPIRE``/``SREM`` the shared index; ``False`` once
        Redis refused that to this client's user (see the module docstring)."""

    # -- key layout -------------------------------------------------------

    def _index(self, project_key: str) -> str:
        return f"{self._prefix}{_q(project_key)}:sessions"

    def _session(self, project_key: str, session_id: str) -> str:
        return f"{self._prefix}{_q(project_key)}:{_q(session_id)}"

    def _transcript(self, session: str, subpath: str | None) -> str:
        return f"{session}:main" if subpath is None else f"{session}:sub:{_q(subpath)}"

    # -- protocol ---------------------------------------------------------

    async def fence(self, key: SessionKey, epoch: int) -> bool:
        """Raise the session's epoch (one Lua script: compare and set are one step)."""
        epoch_key = f"{self._session(key['project_key'], key['session_id'])}:epoch"
        stored = await self._fence(keys=[epoch_key], args=[epoch, self._ttl or ""])
        return int(stored) == epoch

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry], *, epoch: int | None = None) -> None:
        """Append (see the class); with ``epoch``, the session's epoch is read under the
        same ``WATCH`` as the rest, so the check and the write land together."""
        if not entries:
            return
        project_key, session_id = key["project_key"], key["session_id"]
        subpath = key.get("subpath")
        session = self._session(project_key, session_id)
        transcript = self._transcript(session, subpath)
        uuids_key = f"{transcript}:uuids"
        subpaths_key, summary_key = f"{session}:subpaths", f"{session}:summary"
        epoch_key = f"{session}:epoch"
        index = self._index(project_key)

        async with self._client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(uuids_key, summary_key, subpaths_key, epoch_key)
                    stored_epoch = 0
                    if epoch is not None:
                        stored_epoch = int(cast("str | None", await pipe.get(epoch_key)) or 0)
                        if epoch < stored_epoch:
                            raise Fenced(f"epoch {epoch} was replaced by {stored_epoch}")
                    fresh = await _unseen(pipe, uuids_key, entries)
                    if not fresh:
                        return  # a retried batch that had already landed
                    subs = (
                        cast("set[str]", await pipe.smembers(subpaths_key)) if self._ttl else set()
                    )
                    if subpath is None:
                        raw = cast("str | None", await pipe.get(summary_key))
                        prev = _summary_from_raw(session_id, raw) if raw else None
                        summary = fold_session_summary(prev, key, fresh)
                        seconds, micros = await pipe.time()  # the server's clock, not ours
                        summary["mtime"] = seconds * 1000 + micros // 1000

                    pipe.multi()  # type: ignore[no-untyped-call]  # untyped in redis-py
                    if epoch is not None and epoch > stored_epoch:
                        pipe.set(epoch_key, epoch)
                    pipe.rpush(transcript, *(json.dumps(e) for e in fresh))
                    new_uuids = [u for u in map(_uuid_of, fresh) if u is not None]
                    if new_uuids:
                        pipe.sadd(uuids_key, *new_uuids)
                    if subpath is None:
                        stored = {"mtime": summary["mtime"], "data": summary["data"]}
                        pipe.set(summary_key, json.dumps(stored))
                        pipe.sadd(index, session_id)
                    else:
                        pipe.sadd(subpaths_key, subpath)
                        subs.add(subpath)
                    if self._ttl:
                        upkept = [index] if self._index_upkeep else []
                        for k in [*self._session_keys(session, subs), *upkept]:
                            pipe.expire(k, self._ttl)
                    await pipe.execute()
                    return
                except WatchError:
                    continue  # another writer touched this session: redo the fold
                except NoPermissionError:
                    if not (self._ttl and self._index_upkeep):
                        raise
                    self._index_upkeep = False  # nothing landed (EXECABORT): redo without it

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        session = self._session(key["project_key"], key["session_id"])
        raw = await self._client.lrange(self._transcript(session, key.get("subpath")), 0, -1)
        # An empty list and a missing key are the same thing in Redis.
        return [json.loads(r) for r in raw] or None

    async def list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        summaries = await self._live_summaries(project_key)
        return [{"session_id": s["session_id"], "mtime": s["mtime"]} for s in summaries]

    async def list_session_summaries(self, project_key: str) -> list[SessionSummaryEntry]:
        return await self._live_summaries(project_key)

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
                    subs = cast("set[str]", await pipe.smembers(subpaths_key))
                    pipe.multi()  # type: ignore[no-untyped-call]  # untyped in redis-py
                    pipe.delete(*self._session_keys(session, subs))
                    if self._index_upkeep:
                        pipe.srem(self._index(project_key), session_id)
                    await pipe.execute()
                    return
                except WatchError:
                    continue
                except NoPermissionError:
                    if not self._index_upkeep:
                        raise
                    self._index_upkeep = False  # nothing landed (EXECABORT): redo without it

    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        session = self._session(key["project_key"], key["session_id"])
        return sorted(cast("set[str]", await self._client.smembers(f"{session}:subpaths")))

    # -- lifecycle --------------------------------------------------------

    async def ping(self) -> None:
        """Round-trip a ``PING``; :class:`~hosting.errors.StoreUnavailable` if Redis is down."""
        try:
            await self._client.ping()
        except RedisError as exc:
            raise StoreUnavailable(f"Redis session store unreachable: {exc}") from exc

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    # -- helpers ----------------------------------------------------------

    def _session_keys(self, session: str, subpaths: set[str]) -> list[str]:
        """Every key belonging to one session (index membership excluded)."""
        keys = [
            f"{session}:main",
            f"{session}:main:uuids",
            f"{session}:subpaths",
            f"{session}:summary",
            f"{session}:epoch",
        ]
        for sub in subpaths:
            transcript = self._transcript(session, sub)
            keys += [transcript, f"{transcript}:uuids"]
        return keys

    async def _live_summaries(self, project_key: str) -> list[SessionSummaryEntry]:
        """Summaries of the project's indexed sessions that still exist.

        Every main-transcript append writes the summary, and it expires or
        is deleted together with the transcript, so it doubles as the
        session's liveness marker and the holder of its ``mtime``.
        """
        index = self._index(project_key)
        session_ids = sorted(cast("set[str]", await self._client.smembers(index)))
        if not session_ids:
            return []
        keys = [f"{self._session(project_key, sid)}:summary" for sid in session_ids]
        raws = cast("list[str | None]", await self._client.mget(keys))
        live = [(sid, raw) for sid, raw in zip(session_ids, raws, strict=True) if raw]
        if len(live) < len(session_ids):
            gone = [
                (sid, k) for sid, k, raw in zip(session_ids, keys, raws, strict=True) if not raw
            ]
            await self._prune(index, gone)
        return [_summary_from_raw(sid, raw) for sid, raw in live]

    async def _prune(self, index: str, gone: list[tuple[str, str]]) -> None:
        """Drop expired sessions from the index, unless one is re-created meanwhile."""
        summary_keys = [k for _, k in gone]
        async with self._client.pipeline(transaction=True) as tx:
            await tx.watch(*summary_keys)
            if await tx.exists(*summary_keys):
                return  # re-created since we looked; prune on a later listing
            tx.multi()  # type: ignore[no-untyped-call]  # untyped in redis-py
            tx.srem(index, *(sid for sid, _ in gone))
            with suppress(WatchError):
                await tx.execute()


async def _unseen(
    pipe: Pipeline, uuids_key: str, entries: list[SessionStoreEntry]
) -> list[SessionStoreEntry]:
    """Drop entries whose uuid is already stored (or repeated in the batch).

    The SDK retries a failed batch, and one whose ``EXEC`` landed but whose
    reply was lost must not be stored twice.
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


def _uuid_of(entry: SessionStoreEntry) -> str | None:
    uuid = entry.get("uuid")
    return uuid if isinstance(uuid, str) and uuid else None


def _summary_from_raw(session_id: str, raw: str) -> SessionSummaryEntry:
    stored: dict[str, Any] = json.loads(raw)
    return {"session_id": session_id, "mtime": stored["mtime"], "data": stored["data"]}
