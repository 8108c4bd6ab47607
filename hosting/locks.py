"""Named locks with an expiry: one holder at a time, in one process or across every
process that shares a Redis.

A lock is taken with a random token and an expiry, and released only by that token:
in Redis a key set with ``SET NX PX`` and deleted by compare-and-delete in one Lua
script, so a holder whose lock lapsed (it stalled past the expiry and someone else took
the lock since) cannot release the next holder's. The expiry is what frees the lock of
a holder that crashed.

The gateway's routing store holds its locks here (provisioning, pool refill, reaping,
retention, reconciliation), and so does the Managed Agents orchestrator (one per
session). :func:`holding` is the one way they take one.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from typing import Protocol

import redis.asyncio as aioredis

_COMPARE_AND_DELETE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

FIRST_POLL_SECONDS = 0.05
"""How long :func:`holding` waits before asking again for a held lock; doubled after each
try, up to :data:`LAST_POLL_SECONDS`."""
LAST_POLL_SECONDS = 1.0


class Locks(Protocol):
    """Named locks, each held by a token until released or until its ttl lapses."""

    async def acquire(self, name: str, ttl_seconds: float) -> str | None:
        """Take lock ``name`` for at most ``ttl_seconds``: its token, or ``None`` if it is held."""

    async def release(self, name: str, token: str) -> bool:
        """Release the lock if ``token`` still holds it (never someone else's); whether it did."""


class MemoryLocks:
    """Locks of this process only."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[str, float]] = {}
        """name → (token, when it lapses: monotonic)."""

    async def acquire(self, name: str, ttl_seconds: float) -> str | None:
        held = self._held.get(name)
        if held is not None and held[1] > time.monotonic():
            return None
        token = secrets.token_hex(16)
        self._held[name] = (token, time.monotonic() + ttl_seconds)
        return token

    async def release(self, name: str, token: str) -> bool:
        held = self._held.get(name)
        if held is None or held[0] != token:
            return False
        del self._held[name]
        return True


class RedisLocks:
    """Locks shared by every process on the same Redis: the key of lock ``name`` is
    ``prefix + name``. It uses the caller's connection (the caller closes it) and lets
    Redis's errors through: what an outage means is the caller's business."""

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix
        self._compare_and_delete = redis.register_script(_COMPARE_AND_DELETE)

    async def acquire(self, name: str, ttl_seconds: float) -> str | None:
        token = secrets.token_hex(16)
        taken = await self._redis.set(self._prefix + name, token, nx=True, px=max(1, int(ttl_seconds * 1000)))
        return token if taken else None

    async def release(self, name: str, token: str) -> bool:
        return bool(await self._compare_and_delete(keys=[self._prefix + name], args=[token]))


@contextlib.asynccontextmanager
async def holding(locks: Locks, name: str, ttl_seconds: float, wait_seconds: float = 0.0) -> AsyncIterator[bool]:
    """Hold lock ``name`` (for at most ``ttl_seconds``) inside the block, which is told
    whether it holds it: ``False`` if the lock was not free within ``wait_seconds`` (0:
    one try; otherwise it is asked again, less and less often). On the way out, however
    the block ends (an exception, a cancellation), the lock is released if this token
    still holds it. The store's errors, taking or releasing, are raised."""
    deadline = time.monotonic() + wait_seconds
    delay = FIRST_POLL_SECONDS
    while (token := await locks.acquire(name, ttl_seconds)) is None:
        if time.monotonic() + delay > deadline:
            yield False
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, LAST_POLL_SECONDS)
    try:
        yield True
    finally:
        await locks.release(name, token)
