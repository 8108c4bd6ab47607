"""Per-session locks: two orchestrator processes never start two runners for one session.

With Redis (``ENVIRONMENT_REDIS_URL``) the lock is a key taken with ``SET NX PX`` and a
random token, and released by compare-and-delete in one Lua script, so a holder whose
lock lapsed (it stalled past the expiry) cannot release the next holder's. Without
Redis the locks live in the process: one orchestrator only.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

_COMPARE_AND_DELETE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class SessionLocks(abc.ABC):
    """Mutual exclusion per session id, with an expiry so a crashed holder's lock lapses."""

    def __init__(self, ttl_seconds: float) -> None:
        self.ttl_seconds = ttl_seconds

    @abc.abstractmethod
    async def acquire(self, session_id: str) -> str | None:
        """The lock's token, or ``None`` if someone holds it."""

    @abc.abstractmethod
    async def release(self, session_id: str, token: str) -> None:
        """Release the lock if ``token`` still holds it; never someone else's."""

    @contextlib.asynccontextmanager
    async def holding(self, session_id: str, wait_seconds: float) -> AsyncIterator[bool]:
        """Hold the session's lock inside; ``False`` if it was not free within ``wait_seconds``."""
        deadline = time.monotonic() + wait_seconds
        delay = 0.05
        while (token := await self.acquire(session_id)) is None:
            if time.monotonic() + delay > deadline:
                yield False
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        try:
            yield True
        finally:
            await self.release(session_id, token)

    async def aclose(self) -> None:
        """Release connections (not locks)."""


class MemoryLocks(SessionLocks):
    """Locks of this process only."""

    def __init__(self, ttl_seconds: float) -> None:
        super().__init__(ttl_seconds)
        self._held: dict[str, tuple[str, float]] = {}

    async def acquire(self, session_id: str) -> str | None:
        held = self._held.get(session_id)
        if held is not None and held[1] > time.monotonic():
            return None
        token = secrets.token_hex(16)
        self._held[session_id] = (token, time.monotonic() + self.ttl_seconds)
        return token

    async def release(self, session_id: str, token: str) -> None:
        held = self._held.get(session_id)
        if held is not None and held[0] == token:
            del self._held[session_id]


class RedisLocks(SessionLocks):
    """Locks shared by every orchestrator that uses the same Redis and environment."""

    def __init__(self, url: str, environment_id: str, ttl_seconds: float) -> None:
        super().__init__(ttl_seconds)
        self._redis = aioredis.Redis.from_url(url)
        self._prefix = f"agent-environments:{environment_id}:lock:"
        self._compare_and_delete = self._redis.register_script(_COMPARE_AND_DELETE)

    async def acquire(self, session_id: str) -> str | None:
        token = secrets.token_hex(16)
        taken = await self._redis.set(self._prefix + session_id, token, nx=True, px=int(self.ttl_seconds * 1000))
        return token if taken else None

    async def release(self, session_id: str, token: str) -> None:
        await self._compare_and_delete(keys=[self._prefix + session_id], args=[token])

    async def aclose(self) -> None:
        await self._redis.aclose()
