"""What goes away at the gateway: idle sandboxes (the reaper) and unused sessions (retention).

The idle reaper: a session's sandbox goes when it has been idle too long.

Idle means no request and no stream: the relay stamps activity while a stream
runs, and before reaping the sandbox is asked whether a turn is running (one a
client left may still be going). Reaping removes the sandbox, not the
conversation: the volume stays and the next turn resumes on a new sandbox. The
session's provisioning lock is held while reaping, so across replicas each
sandbox is reaped once and never while it is being handed out.

Retention: a session unused for ``GATEWAY_SESSION_TTL_SECONDS`` is deleted whole
(route, sandbox, volume, stored conversation), as a client's ``DELETE`` would.
A sweep takes a lock, so one replica sweeps at a time, handles at most
:data:`RETENTION_BATCH` sessions, and never one whose sandbox says a turn is running.

In tenant scope (:mod:`hosting.gateway.tenant_scope`) a sandbox serves several sessions:
it is reaped once all of them are idle and none runs a turn, and deleting a session
removes that session from its shared volume, not its neighbours' sandbox or volume.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from hosting.gateway.conversations import StoredConversations
from hosting.gateway.provisioning import provisioning_lock
from hosting.gateway.routing.protocols import Locking, Routes, RoutingStoreUnavailable
from hosting.gateway.routing.records import Route
from hosting.gateway.tenant_scope import PlacementBusy, SharedSandboxes
from hosting.locks import holding
from hosting.sandboxes.base import SandboxBackend, SandboxError

logger = logging.getLogger("hosting.gateway.reaper")

RETENTION_BATCH = 100
"""Sessions one retention sweep deletes at most (the rest wait for the next sweep)."""


class SweepStore(Routes, Locking, Protocol):
    """What the reaper and retention need of the routing store: the routes, and locks."""


async def turn_running(backend: SandboxBackend, route: Route) -> bool:
    """Whether the route's sandbox says a turn is running (a client may have left it)."""
    if route.address is None or route.token is None:
        return False
    return await running_turns(backend, route.address, route.token)


async def running_turns(backend: SandboxBackend, address: str, token: str) -> bool:
    """Whether the sandbox at ``address`` says a turn is running, of any of its sessions."""
    response = await backend.ask_ready(address, token)
    try:
        return response is not None and bool(response.json().get("running_turns", 0))
    except (ValueError, AttributeError):
        return False


async def forget_session(backend: SandboxBackend, store: Routes, conversations: StoredConversations | None,
                         route: Route, shared: SharedSandboxes | None = None) -> None:
    """Delete a session whole: its sandbox, its volume, its stored conversation, its route.
    The route goes last, so a failure part-way leaves something to retry from. In tenant
    scope (``shared``), the session only: its sandbox's server has deleted its files."""
    if shared is not None:
        await shared.forget(route, erased=True)
        return
    if route.sandbox_id is not None:
        await store.release(route.key, route.sandbox_id)
        await backend.delete(route.sandbox_id)
    await backend.delete_volume(route.volume)
    if conversations is not None:
        await conversations.delete(route.tenant, route.session_id)
    await store.delete(route.key)


class Reaper:
    """Removes sandboxes idle for longer than ``idle_timeout_seconds`` (in tenant scope,
    ``shared``: those all of whose sessions are)."""

    def __init__(self, backend: SandboxBackend, store: SweepStore, idle_timeout_seconds: float,
                 shared: SharedSandboxes | None = None) -> None:
        self._backend = backend
        self._store = store
        self._shared = shared
        self.idle_timeout = idle_timeout_seconds
        self.interval = max(0.5, min(idle_timeout_seconds / 4, 30.0))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep()
            except RoutingStoreUnavailable as exc:
                logger.warning("reaper: %s", exc)

    async def sweep(self) -> list[str]:
        """Reap every idle sandbox; the ids reaped by this call."""
        if self._shared is not None:
            return await self._shared.reap_idle(self.idle_timeout, self._running_turns)
        reaped = []
        for route in await self._store.routes():
            if route.sandbox_id is not None and self._idle(route) and await self._reap(route):
                reaped.append(route.sandbox_id)
        return reaped

    def _idle(self, route: Route) -> bool:
        return time.time() - route.last_activity > self.idle_timeout

    async def _running_turns(self, address: str, token: str) -> bool:
        return await running_turns(self._backend, address, token)

    async def _reap(self, route: Route) -> bool:
        async with holding(self._store.locks, provisioning_lock(route.tenant, route.session_id), 60) as held:
            if not held:
                return False
            current = await self._store.get(route.key)
            if current is None or current.sandbox_id != route.sandbox_id or not self._idle(current):
                return False
            if await turn_running(self._backend, current):
                await self._store.touch(current.key)
                return False
            assert current.sandbox_id is not None
            if not await self._store.release(current.key, current.sandbox_id):
                return False
            try:
                await self._backend.delete(current.sandbox_id)
            except SandboxError as exc:
                logger.warning("reaper: could not remove sandbox %s: %s", current.sandbox_id, exc)
            logger.info("session %s: reaped idle sandbox %s", current.session_id, current.sandbox_id)
            return True


class SessionRetention:
    """Deletes sessions unused for longer than ``ttl_seconds`` (0: never)."""

    def __init__(self, backend: SandboxBackend, store: SweepStore, conversations: StoredConversations | None,
                 ttl_seconds: float, shared: SharedSandboxes | None = None) -> None:
        self._backend = backend
        self._store = store
        self._conversations = conversations
        self._shared = shared
        self.ttl = ttl_seconds
        self.interval = max(0.5, min(ttl_seconds / 4, 600.0))

    async def run(self) -> None:
        while self.ttl:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep()
            except (RoutingStoreUnavailable, PlacementBusy, SandboxError, ConnectionError) as exc:
                logger.warning("retention: %s", exc)

    def _expired(self, route: Route) -> bool:
        return time.time() - route.last_activity > self.ttl

    async def sweep(self) -> list[str]:
        """Delete up to :data:`RETENTION_BATCH` expired sessions; their route keys."""
        if not self.ttl:
            return []
        async with holding(self._store.locks, "retention-sweep", 600) as held:
            if not held:  # another replica is sweeping
                return []
            deleted = []
            expired = [route for route in await self._store.routes() if self._expired(route)]
            for route in expired[:RETENTION_BATCH]:
                if await self._delete_if_unused(route):
                    deleted.append(route.key)
            return deleted

    async def _delete_if_unused(self, route: Route) -> bool:
        async with holding(self._store.locks, provisioning_lock(route.tenant, route.session_id), 60) as held:
            if not held:  # being provisioned or reaped right now: in use
                return False
            current = await self._store.get(route.key)
            if current is None or not self._expired(current):
                return False
            if self._shared is not None:  # its sandbox, if one runs, says whether a turn runs on this session
                if not await self._shared.forget(current, erased=False):
                    await self._store.touch(current.key)
                    return False
            elif await turn_running(self._backend, current):
                await self._store.touch(current.key)
                return False
            else:
                await forget_session(self._backend, self._store, self._conversations, current)
            logger.info("session of tenant %s unused for %.0f s: deleted", current.tenant, self.ttl)
            return True
