"""Per-session locks: two orchestrator processes never start two runners for one session.

With Redis (``ENVIRONMENT_REDIS_URL``) they are :class:`hosting.locks.RedisLocks` under
``agent-environments:<environment id>:lock:<session id>``, shared by every orchestrator
of the environment; without Redis they live in the process: one orchestrator only.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

import redis.asyncio as aioredis

from hosting.locks import Locks, MemoryLocks, RedisLocks, holding


class SessionLocks:
    """Mutual exclusion per session id, each lock held for at most ``ttl_seconds`` so that
    a crashed holder's lapses."""

    def __init__(self, locks: Locks, ttl_seconds: float, connection: aioredis.Redis | None = None) -> None:
        self._locks = locks
        self.ttl_seconds = ttl_seconds
        self._connection = connection

    def holding(self, session_id: str, wait_seconds: float) -> AbstractAsyncContextManager[bool]:
        """Hold the session's lock inside; ``False`` if it was not free within ``wait_seconds``
        (see :func:`hosting.locks.holding`)."""
        return holding(self._locks, session_id, self.ttl_seconds, wait_seconds)

    async def aclose(self) -> None:
        """Release connections (not locks)."""
        if self._connection is not None:
            await self._connection.aclose()


def open_session_locks(redis_url: str | None, environment_id: str, ttl_seconds: float) -> SessionLocks:
    """The environment's locks: in Redis when ``redis_url`` is set, else in this process."""
    if not redis_url:
        return SessionLocks(MemoryLocks(), ttl_seconds)
    connection = aioredis.Redis.from_url(redis_url)
    return SessionLocks(RedisLocks(connection, f"agent-environments:{environment_id}:lock:"), ttl_seconds, connection)
