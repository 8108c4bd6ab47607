"""The idle reaper: a session's sandbox goes when it has been idle too long.

Idle means no request and no stream: the relay stamps activity while a stream
runs, and before reaping the sandbox is asked whether a turn is running (one a
client left may still be going). Reaping removes the sandbox, not the
conversation: the volume stays and the next turn resumes on a new sandbox. The
session's provisioning lock is held while reaping, so across replicas each
sandbox is reaped once and never while it is being handed out.
"""

from __future__ import annotations

import asyncio
import logging
import time

from hosting.gateway.routes import Route, RouteStore, RouteStoreUnavailable
from hosting.sandboxes.base import SandboxBackend, SandboxError

logger = logging.getLogger("hosting.gateway.reaper")


class Reaper:
    """Removes sandboxes idle for longer than ``idle_timeout_seconds``."""

    def __init__(self, backend: SandboxBackend, store: RouteStore, idle_timeout_seconds: float) -> None:
        self._backend = backend
        self._store = store
        self.idle_timeout = idle_timeout_seconds
        self.interval = max(0.5, min(idle_timeout_seconds / 4, 30.0))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep()
            except RouteStoreUnavailable as exc:
                logger.warning("reaper: %s", exc)

    async def sweep(self) -> list[str]:
        """Reap every idle sandbox; the ids reaped by this call."""
        reaped = []
        for route in await self._store.routes():
            if route.sandbox_id is not None and self._idle(route) and await self._reap(route):
                reaped.append(route.sandbox_id)
        return reaped

    async def _turn_running(self, route: Route) -> bool:
        """Whether the sandbox says a turn is running (a client may have left it)."""
        if route.address is None or route.token is None:
            return False
        response = await self._backend.ask_ready(route.address, route.token)
        try:
            return response is not None and bool(response.json().get("running_turns", 0))
        except (ValueError, AttributeError):
            return False

    def _idle(self, route: Route) -> bool:
        return time.time() - route.last_activity > self.idle_timeout

    async def _reap(self, route: Route) -> bool:
        lock_name = f"provision:{route.session_id}"
        lock = await self._store.acquire(lock_name, 60)
        if lock is None:
            return False
        try:
            current = await self._store.get(route.session_id)
            if current is None or current.sandbox_id != route.sandbox_id or not self._idle(current):
                return False
            if await self._turn_running(current):
                await self._store.touch(current.session_id)
                return False
            assert current.sandbox_id is not None
            if not await self._store.release(current.session_id, current.sandbox_id):
                return False
            try:
                await self._backend.delete(current.sandbox_id)
            except SandboxError as exc:
                logger.warning("reaper: could not remove sandbox %s: %s", current.sandbox_id, exc)
            logger.info("session %s: reaped idle sandbox %s", current.session_id, current.sandbox_id)
            return True
        finally:
            await self._store.release_lock(lock_name, lock)


