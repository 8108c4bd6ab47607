"""Tenant scope: one sandbox serves up to ``GATEWAY_SESSIONS_PER_SANDBOX`` sessions of one tenant.

With ``GATEWAY_SANDBOX_SCOPE=tenant`` the unit of placement is a volume (a sandbox's data
dir, where its sessions' transcripts live): a
:class:`~hosting.gateway.routing.records.SharedVolume` seats at most that many sessions of
one tenant, and runs at most one sandbox at a time. A new session takes a seat on one of
its tenant's volumes with room (one whose sandbox runs first, then the fullest), else on a
new volume: a warm-pool sandbox's (it comes with a fresh volume and no tenant yet) or a
new one. A session keeps its seat for life: once its sandbox is reaped or lost it comes
back to its volume, joining the sandbox running there or starting one. Never two tenants
on one volume: a volume is made for one tenant and seats only its sessions (and a
sandbox's server serves, for good, the one namespace it was first sent).

What is per session stays so: the session's route with its own epoch, its provisioning
lock (held by the caller), its turn slots, quotas and budgets, re-attach, delete and
retention. What is shared is the sandbox: it is reaped only once every session on it is
idle and none runs a turn, and one that is lost releases every session on it (each starts
or joins the volume's next sandbox on its next turn). With a session store, the sandbox's
store credential covers exactly its volume's seats: the sessions whose files it holds.

Locks: every change to a tenant's volumes, and every assignment of a session to a shared
sandbox, happens under the tenant's placement lock, held for store reads and writes (and a
pool claim), never while a sandbox starts. Starting a volume's sandbox takes the volume's
lock, so that the sessions of one volume arriving together start it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import replace
from typing import Protocol

from hosting.errors import ErrorCode, HostingError
from hosting.gateway.cleanup import shielded
from hosting.gateway.conversations import CredentialedBackend, StoredConversations
from hosting.gateway.provisioning import Provisioner, ProvisioningFailed, new_spec, remove_sandbox
from hosting.gateway.routing.protocols import Locking, Routes, RoutingStoreUnavailable, SharedVolumes
from hosting.gateway.routing.records import Route, SharedVolume, route_key
from hosting.locks import holding
from hosting.sandboxes.base import Sandbox, SandboxBackend, SandboxError

logger = logging.getLogger("hosting.gateway.tenant_scope")

PLACEMENT_LOCK_SECONDS = 30.0
"""Longest a placement lock is held (store reads and writes, a pool claim) before it lapses."""


def placement_lock(tenant: str) -> str:
    """The lock under which a tenant's shared volumes change and its sessions join them."""
    return f"placement:{tenant}"


def volume_lock(tenant: str, volume: str) -> str:
    """The lock held while a shared volume's sandbox starts."""
    return f"volume:{tenant}/{volume}"


def new_volume_name() -> str:
    return f"vol-{secrets.token_hex(8)}"


class PlacementBusy(HostingError):
    """The tenant's placement lock stayed held past the provisioning timeout (HTTP 503)."""

    code = ErrorCode.UNAVAILABLE


class SharedStore(Routes, SharedVolumes, Locking, Protocol):
    """What tenant scope needs of the routing store: the routes, the shared volumes, the locks."""


class SandboxSessions(Protocol):
    """Asking a sandbox's server to delete one session (:meth:`hosting.gateway.relay.Relay.delete_session`)."""

    async def delete_session(self, route: Route) -> int | None:
        """The server's status for ``DELETE /sessions/{id}`` of the route's session at its
        sandbox; ``None`` if the sandbox could not be reached."""


RunningTurns = Callable[[str, str], Awaitable[bool]]
"""Whether the sandbox at an address (with its token) says a turn is running."""


class SharedSandboxes:
    """Seats sessions on their tenant's shared volumes and keeps one sandbox per volume (see the module doc)."""

    def __init__(self, backend: SandboxBackend, store: SharedStore, sessions: SandboxSessions,
                 sandbox_env: Mapping[str, str], sessions_per_sandbox: int, timeout_seconds: float,
                 conversations: StoredConversations | None = None) -> None:
        self._backend = backend
        self._store = store
        self._sessions = sessions
        self._env = sandbox_env
        self.capacity = sessions_per_sandbox
        self._timeout = timeout_seconds
        self._conversations = conversations

    # -- placement -------------------------------------------------------

    async def seat(self, provisioner: Provisioner, session_id: str, tenant: str, route: Route | None) -> Route:
        """The session's route, assigned to its volume's sandbox: a seat is taken first if it
        has none, and the sandbox started if none runs. Called under the session's
        provisioning lock with its sandbox quota reserved; raises as :meth:`Provisioner.ensure`."""
        deadline = time.monotonic() + self._timeout
        volume = await self._take_seat(provisioner, session_id, tenant, route)
        try:
            return await self._assign(provisioner, session_id, tenant, volume, deadline)
        except BaseException:
            if route is None:  # a new session that got no sandbox leaves nothing, as in session scope
                await shielded(self._abandon(session_id, tenant, volume))
            raise

    async def _assign(self, provisioner: Provisioner, session_id: str, tenant: str, volume: str,
                      deadline: float) -> Route:
        """Join the volume's sandbox, starting it first if none runs (or wait for the session
        of the volume that is starting it)."""
        delay = 0.01
        while True:
            assigned = await self._join(session_id, tenant, volume)
            if assigned is not None:
                return assigned
            async with holding(self._store.locks, volume_lock(tenant, volume), self._timeout + 10) as held:
                if held:
                    await self._start_on(provisioner, tenant, volume)
                    continue
            if time.monotonic() + delay > deadline:
                raise ProvisioningFailed(f"timed out waiting for volume {volume!r} to get a sandbox")
            # Another session of the volume (maybe on another replica) is starting its sandbox.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    async def _take_seat(self, provisioner: Provisioner, session_id: str, tenant: str, route: Route | None) -> str:
        """The session's volume, its seat taken: the route's (a session keeps its volume), else
        one of the tenant's with room, else a new one (a warm-pool sandbox's, or a fresh name)."""
        async with self._placement(tenant) as volumes:
            claimed = None
            if route is not None:
                record = volumes.get(route.volume) or SharedVolume(tenant, route.volume)
            elif (found := self._with_room(session_id, volumes)) is not None:
                record = found
            elif (claimed := await provisioner.claim_from_pool(session_id, tenant)) is not None:
                record = SharedVolume(tenant, claimed.sandbox.volume).with_sandbox(claimed.sandbox, claimed.token)
            else:
                record = SharedVolume(tenant, new_volume_name())
            try:
                if route is None:  # the route before the seat: a seat never exists without its route
                    await self._store.put(Route(session_id, tenant, record.volume))
                if session_id not in record.seats:
                    await self._put(record.seated(session_id))
            except BaseException:
                if claimed is not None:  # neither pooled nor recorded any more: nobody would find it
                    await remove_sandbox(self._backend, claimed.sandbox, with_volume=True)
                raise
            if claimed is not None:
                logger.info("session %s: claimed pooled sandbox %s for a new volume", session_id,
                            claimed.sandbox.sandbox_id)
            return record.volume

    def _with_room(self, session_id: str, volumes: Mapping[str, SharedVolume]) -> SharedVolume | None:
        """The volume seating the session already (a placement cut short), else the one with
        room to prefer: with a running sandbox (its pre-started CLIs make the first turn
        fast), then the fullest (fewer sandboxes). Never one that still holds the files of a
        deleted session of the same id (:attr:`SharedVolume.purge`)."""
        if (seated := next((v for v in volumes.values() if session_id in v.seats), None)) is not None:
            return seated
        room = [v for v in volumes.values() if len(v.seats) < self.capacity and session_id not in v.purge]
        return max(room, key=lambda v: (v.sandbox is not None, len(v.seats)), default=None)

    async def _join(self, session_id: str, tenant: str, volume: str) -> Route | None:
        """Assign the session to its volume's running sandbox (under the placement lock, so a
        reaper never removes it meanwhile); ``None`` if none runs."""
        async with self._placement(tenant) as volumes:
            record = volumes.get(volume) or SharedVolume(tenant, volume)
            if session_id not in record.seats:  # its record was lost, or its route predates tenant scope
                record = record.seated(session_id)
                await self._put(record)
            if record.sandbox is None or record.token is None:
                return None
            route = await self._store.get(route_key(tenant, session_id)) or Route(session_id, tenant, volume)
            assigned = route.with_sandbox(record.sandbox, record.token)
            await self._store.put(assigned)
            return assigned

    async def _abandon(self, session_id: str, tenant: str, volume: str) -> None:
        """Undo a new session's seat and route: it answers like an unknown id again. A
        failure is logged only (what is left is a released route, which the session's next
        request provisions again)."""
        try:
            async with self._placement(tenant) as volumes:
                record = volumes.get(volume)
                emptied = record is not None and not set(record.seats) - {session_id}
                if record is not None and emptied:
                    await self._store.remove_shared_volume(tenant, volume)
                elif record is not None:
                    await self._store.put_shared_volume(record.unseated(session_id, purge=False))
                await self._store.delete(route_key(tenant, session_id))
            if record is not None and emptied:
                if record.sandbox is not None:
                    await remove_sandbox(self._backend, record.sandbox)
                await self._backend.delete_volume(volume)
        except (RoutingStoreUnavailable, PlacementBusy, SandboxError) as exc:
            logger.warning("session %s: could not undo its seat on volume %s: %s", session_id, volume, exc)

    async def _start_on(self, provisioner: Provisioner, tenant: str, volume: str) -> None:
        """Start the volume's sandbox (the caller holds the volume's lock), have it delete the
        sessions waiting to be purged, and record it; nothing if one runs already or the
        volume is gone."""
        record = await self._record(tenant, volume)
        if record is None or record.sandbox is not None:
            return
        spec = new_spec(self._env, None, tenant, volume, session_capacity=self.capacity)
        sandbox = await provisioner.start(spec)
        installed = False
        try:
            if record.purge:
                await self._grant(sandbox.sandbox_id, tenant, (*record.seats, *record.purge))
            purged = {s for s in record.purge if await self._erase(sandbox, spec.token, tenant, s) in (204, 404)}
            async with self._placement(tenant) as volumes:
                current = volumes.get(volume)
                if current is not None and current.sandbox is None:
                    kept = tuple(s for s in current.purge if s not in purged)
                    await self._put(replace(current, purge=kept).with_sandbox(sandbox, spec.token))
                    installed = True
        finally:
            if not installed:  # the volume went (its last session deleted), or this failed
                await remove_sandbox(self._backend, sandbox)
        if installed:
            logger.info("volume %s of tenant %s: started sandbox %s", volume, tenant, sandbox.sandbox_id)

    async def _erase(self, sandbox: Sandbox, token: str, tenant: str, session_id: str) -> int | None:
        """Have the sandbox's server delete one session (its workspace and transcript): its
        status if that is done (204, or 404: nothing there), 409 if a turn runs on it, else ``None``."""
        status = await self._sessions.delete_session(Route(session_id, tenant, sandbox.volume).with_sandbox(sandbox, token))
        return status if status in (204, 404, 409) else None

    # -- losing, reaping, deleting ----------------------------------------

    async def lost(self, route: Route, at_once: bool = False) -> None:
        """The route's sandbox is gone: take it off its volume and release every session on
        it, so that each starts or joins the volume's next sandbox on its next turn. Another
        caller may have done so already; then nothing happens. ``at_once``: it answers
        nothing, so it is killed without a grace (see :meth:`Provisioner.replace`)."""
        assert route.sandbox_id is not None
        detached = False
        async with self._placement(route.tenant) as volumes:
            record = volumes.get(route.volume)
            if record is not None and record.sandbox_id == route.sandbox_id:
                await self._store.put_shared_volume(record.without_sandbox())
                detached = True
            for session_id in record.seats if record is not None else (route.session_id,):
                detached = await self._store.release(route_key(route.tenant, session_id), route.sandbox_id) or detached
        if detached:
            logger.warning("volume %s: sandbox %s lost, its sessions released", route.volume, route.sandbox_id)
            await self._backend.delete(route.sandbox_id, at_once=at_once)

    async def reap_idle(self, idle_seconds: float, running_turns: RunningTurns) -> list[str]:
        """Remove every shared sandbox all of whose sessions have been idle for ``idle_seconds``
        and that runs no turn; the ids reaped by this call."""
        reaped = []
        for record in await self.volumes():
            if record.sandbox is None or not await self._idle(record, idle_seconds):  # no lock for a busy one
                continue
            if await self._reap(record, idle_seconds, running_turns):
                reaped.append(record.sandbox.sandbox_id)
        return reaped

    async def _on(self, record: SharedVolume) -> list[Route]:
        """The routes of the record's sessions assigned to its sandbox."""
        return [route for session_id in record.seats
                if (route := await self._store.get(route_key(record.tenant, session_id))) is not None
                and route.sandbox_id is not None and route.sandbox_id == record.sandbox_id]

    async def _idle(self, record: SharedVolume, idle_seconds: float, routes: list[Route] | None = None) -> bool:
        """Whether every session on the record's sandbox has been idle for ``idle_seconds``; one
        that no session has joined yet (one is about to) counts from its start."""
        assert record.sandbox is not None
        routes = await self._on(record) if routes is None else routes
        last_used = max(r.last_activity for r in routes) if routes else record.sandbox.created_at
        return time.time() - last_used > idle_seconds

    async def _reap(self, seen: SharedVolume, idle_seconds: float, running_turns: RunningTurns) -> bool:
        async with holding(self._store.locks, placement_lock(seen.tenant), PLACEMENT_LOCK_SECONDS) as held:
            if not held:  # a session is being placed: in use
                return False
            record = await self._record(seen.tenant, seen.volume)
            if record is None or record.sandbox is None or record.token is None or record.sandbox_id != seen.sandbox_id:
                return False
            sandbox = record.sandbox
            routes = await self._on(record)
            if not await self._idle(record, idle_seconds, routes):
                return False
            if await running_turns(sandbox.address, record.token):  # one a client left may still be going
                for route in routes:
                    await self._store.touch(route.key)
                return False
            await self._store.put_shared_volume(record.without_sandbox())
            for route in routes:
                await self._store.release(route.key, sandbox.sandbox_id)
        await remove_sandbox(self._backend, sandbox)
        logger.info("volume %s: reaped idle sandbox %s (%d sessions)", record.volume, sandbox.sandbox_id, len(routes))
        return True

    async def forget(self, route: Route, *, erased: bool) -> bool:
        """Delete one session: its files on the volume (``erased``: its sandbox's server did
        already; else the running sandbox is asked to, or the next one started on the volume
        will), its stored conversation, its seat and its route. The last session of a volume
        takes the volume and its sandbox with it; its neighbours' are left alone. ``False``,
        and nothing changed, if the sandbox says a turn runs on the session."""
        if not erased:
            record = await self._record(route.tenant, route.volume)
            if record is not None and record.sandbox is not None and record.token is not None:
                status = await self._erase(record.sandbox, record.token, route.tenant, route.session_id)
                if status == 409:
                    return False
                erased = status is not None
        if self._conversations is not None:
            await self._conversations.delete(route.tenant, route.session_id)
        async with self._placement(route.tenant) as volumes:
            record = volumes.get(route.volume)
            last = record is None or not set(record.seats) - {route.session_id}
            if record is not None and last:
                await self._store.remove_shared_volume(route.tenant, route.volume)
            elif record is not None:
                left = record.unseated(route.session_id, purge=not erased)
                await self._store.put_shared_volume(left)
                if left.sandbox is not None:
                    with contextlib.suppress(ProvisioningFailed):  # logged: its neighbours go on
                        await self._grant(left.sandbox.sandbox_id, left.tenant, left.seats)
            await self._store.delete(route.key)
        if last:  # a route without a record predates tenant scope: its volume was its own
            sandbox_id = record.sandbox_id if record is not None else route.sandbox_id
            if sandbox_id is not None:
                await self._backend.delete(sandbox_id)
            await self._backend.delete_volume(route.volume)
        return True

    # -- start-up and shutdown -------------------------------------------

    async def volumes(self) -> list[SharedVolume]:
        """Every tenant's shared volumes."""
        return [record for tenant in await self._store.shared_tenants()
                for record in await self._store.shared_volumes(tenant)]

    async def release_lost(self, existing: Collection[str]) -> list[str]:
        """Take off their volumes the sandboxes that no longer exist (start-up); their ids."""
        released = []
        for seen in await self.volumes():
            if seen.sandbox_id is None or seen.sandbox_id in existing:
                continue
            async with self._placement(seen.tenant) as volumes:
                record = volumes.get(seen.volume)
                if record is not None and record.sandbox_id == seen.sandbox_id:
                    await self._store.put_shared_volume(record.without_sandbox())
                    released.append(seen.sandbox_id)
        return released

    # -- helpers -----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _placement(self, tenant: str) -> AsyncIterator[dict[str, SharedVolume]]:
        """Hold the tenant's placement lock; its volumes, read under it."""
        async with holding(self._store.locks, placement_lock(tenant), PLACEMENT_LOCK_SECONDS,
                           wait_seconds=self._timeout) as held:
            if not held:
                raise PlacementBusy(f"tenant {tenant!r}'s sandboxes are busy being placed; retry")
            yield {record.volume: record for record in await self._store.shared_volumes(tenant)}

    async def _record(self, tenant: str, volume: str) -> SharedVolume | None:
        return next((r for r in await self._store.shared_volumes(tenant) if r.volume == volume), None)

    async def _put(self, record: SharedVolume) -> None:
        """Write the record (under the placement lock), its sandbox's store credential granted
        exactly its seats first, so that a session never runs on a sandbox that cannot reach
        its stored conversation."""
        if record.sandbox is not None:
            await self._grant(record.sandbox.sandbox_id, record.tenant, record.seats)
        await self._store.put_shared_volume(record)

    async def _grant(self, sandbox_id: str, tenant: str, session_ids: Collection[str]) -> None:
        if isinstance(self._backend, CredentialedBackend):
            try:
                await self._backend.grant_sessions(sandbox_id, tenant, session_ids)
            except SandboxError as exc:
                logger.warning("%s", exc)
                raise ProvisioningFailed(str(exc)) from None
