"""Sessions that ended and whose files are kept for a while: the archive's ledger.

When a session ends, its runner and sandbox go at once (they cost compute) but its
volume, the session's working directory, is kept for ``ENVIRONMENT_ARCHIVE_SECONDS``
so that what the agent left can still be inspected or copied out; the janitor removes
it after that. The backend cannot say when a volume's session ended (a volume has no
sandbox left to carry its labels), so this ledger records it, where every orchestrator
of the environment reads it and a restart keeps it: Redis when configured (a sorted set
scored by the end time), else a JSON file in the data dir (one orchestrator only).
"""

from __future__ import annotations

import abc
import asyncio
import json
import os
import tempfile
from pathlib import Path

import redis.asyncio as aioredis


class ArchivedSessions(abc.ABC):
    """Session ids with the time they ended."""

    @abc.abstractmethod
    async def add(self, session_id: str, ended_at: float) -> None:
        """Record that the session ended; a session recorded already keeps its first time."""

    @abc.abstractmethod
    async def ended_before(self, moment: float) -> list[str]:
        """Sessions that ended before ``moment``, oldest first."""

    @abc.abstractmethod
    async def discard(self, session_id: str) -> None:
        """Forget the session (its files are gone)."""

    async def aclose(self) -> None:
        """Release connections."""


class FileArchive(ArchivedSessions):
    """A JSON object ``{session id: end time}`` rewritten whole on each change (by a
    rename, so a crash leaves the old or the new file, never half of one)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()

    def _read(self) -> dict[str, float]:
        try:
            loaded = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return {str(k): float(v) for k, v in loaded.items()}

    def _write(self, ended: dict[str, float]) -> None:
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".archived-")
        with os.fdopen(handle, "w") as file:
            json.dump(ended, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)

    async def add(self, session_id: str, ended_at: float) -> None:
        async with self._lock:
            ended = self._read()
            if session_id not in ended:
                ended[session_id] = ended_at
                self._write(ended)

    async def ended_before(self, moment: float) -> list[str]:
        async with self._lock:
            ended = self._read()
        return sorted((s for s, at in ended.items() if at < moment), key=ended.__getitem__)

    async def discard(self, session_id: str) -> None:
        async with self._lock:
            ended = self._read()
            if ended.pop(session_id, None) is not None:
                self._write(ended)


class RedisArchive(ArchivedSessions):
    """One sorted set per environment, shared by its orchestrators."""

    def __init__(self, url: str, environment_id: str) -> None:
        self._redis = aioredis.Redis.from_url(url, decode_responses=True)
        self._key = f"agent-environments:{environment_id}:archived"

    async def add(self, session_id: str, ended_at: float) -> None:
        await self._redis.zadd(self._key, {session_id: ended_at}, nx=True)

    async def ended_before(self, moment: float) -> list[str]:
        members = await self._redis.zrangebyscore(self._key, "-inf", f"({moment}")
        return [str(member) for member in members]

    async def discard(self, session_id: str) -> None:
        await self._redis.zrem(self._key, session_id)

    async def aclose(self) -> None:
        await self._redis.aclose()
