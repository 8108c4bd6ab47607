"""Giving a session a sandbox: exactly one, even when requests race across replicas.

The first request for a session that has no sandbox takes the session's
provisioning lock, claims a warm sandbox from the pool (or starts one) and
writes the route; every other request for that session meanwhile waits for the
route to appear instead of starting a second sandbox. The lock has an expiry
so a replica that dies holding it cannot block the session for ever, and only
its holder releases it. Each claim is counted, found a sandbox or not: the pool's
target follows them (:mod:`hosting.gateway.pool_demand`).
In tenant scope, what happens under that lock is a seat on a sandbox shared
with the tenant's other sessions (:class:`SharedScope`).

Tenant quotas are checked here too, under that lock and before anything is
claimed or started: a tenant at its ``max_sandboxes`` gets
:class:`~hosting.gateway.quotas.QuotaExceeded` and nothing is provisioned. If the
routing store fails after a sandbox was claimed or started, that sandbox is removed
again, so a session never ends up with two when the store comes back.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Mapping
from typing import Protocol

from hosting.errors import ErrorCode, HostingError
from hosting.gateway.pool_demand import PoolDemand
from hosting.gateway.quotas import Quotas
from hosting.gateway.routing.protocols import Locking, Routes, WarmPoolLedger
from hosting.gateway.routing.records import PoolEntry, Route, route_key
from hosting.locks import holding
from hosting.sandboxes.base import Health, Sandbox, SandboxBackend, SandboxError, SandboxSpec

logger = logging.getLogger("hosting.gateway.provisioning")


class ProvisioningFailed(HostingError):
    """No sandbox could be made ready for the session (HTTP 503). Raised with the reason,
    which goes to the logs; the answer says only that none could be started."""

    code = ErrorCode.NO_SANDBOX

    @property
    def detail(self) -> str:
        return "no sandbox could be started for this session; retry later"


class ProvisioningStore(Routes, WarmPoolLedger, Locking, Protocol):
    """What provisioning needs of the routing store: the routes it writes, the pool it
    claims from, and the session's lock."""


def provisioning_lock(tenant: str, session_id: str) -> str:
    """The lock held while a session gets (or loses) its sandbox."""
    return f"provision:{route_key(tenant, session_id)}"


def new_sandbox_id() -> str:
    return f"sbx-{secrets.token_hex(8)}"


def new_spec(env: Mapping[str, str], session_id: str | None = None, tenant: str | None = None,
             volume: str | None = None, *, session_capacity: int = 1) -> SandboxSpec:
    """A fresh sandbox: new id and token; a new volume unless the session has one.
    ``session_capacity``: the sessions it will hold (more than one in tenant scope)."""
    sandbox_id = new_sandbox_id()
    return SandboxSpec(sandbox_id=sandbox_id, volume=volume or f"vol-{sandbox_id.removeprefix('sbx-')}",
                       token=secrets.token_urlsafe(32), env=env, session_id=session_id, tenant=tenant,
                       session_capacity=session_capacity)


class SharedScope(Protocol):
    """Tenant scope (:class:`hosting.gateway.tenant_scope.SharedSandboxes`): sessions of one
    tenant share sandboxes, each session seated on a volume for life."""

    async def seat(self, provisioner: Provisioner, session_id: str, tenant: str, route: Route | None) -> Route:
        """The session's route assigned to a shared sandbox (called under its provisioning lock)."""

    async def lost(self, route: Route, at_once: bool = False) -> None:
        """The route's shared sandbox is gone: release every session on it, and remove it."""


async def remove_sandbox(backend: SandboxBackend, sandbox: Sandbox, with_volume: bool = False) -> None:
    """Remove a sandbox nobody will use (and its volume, if asked); a failure is logged, not raised."""
    try:
        await backend.delete(sandbox.sandbox_id)
        if with_volume:
            await backend.delete_volume(sandbox.volume)
    except SandboxError as exc:
        logger.warning("could not remove sandbox %s: %s", sandbox.sandbox_id, exc)


class Provisioner:
    """Finds or makes the sandbox of a session; the only writer of new routes."""

    def __init__(self, backend: SandboxBackend, store: ProvisioningStore, sandbox_env: Mapping[str, str],
                 timeout_seconds: float, demand: PoolDemand | None = None, quotas: Quotas | None = None,
                 shared: SharedScope | None = None) -> None:
        self._backend = backend
        self._store = store
        self._env = sandbox_env
        self._timeout = timeout_seconds
        self._demand = demand
        """Where claims on the pool are counted (its target follows them); ``None``: nowhere."""
        self._quotas = quotas
        self._shared = shared
        """Tenant scope's shared sandboxes; ``None`` in session scope (a sandbox per session)."""

    async def route(self, session_id: str, tenant: str) -> Route | None:
        """The tenant's session's route; ``None`` if it has none. Another tenant's session
        of the same id is another route: nothing here can tell whether one exists."""
        return await self._store.get(route_key(tenant, session_id))

    async def ensure(self, session_id: str, tenant: str, known: Route | None = None) -> Route:
        """The session's route with a sandbox assigned, provisioning one if needed
        (``known``: the route just read, if the caller read it).

        Raises :class:`ProvisioningFailed`,
        :class:`~hosting.gateway.quotas.QuotaExceeded` or
        :class:`~hosting.gateway.routing.protocols.RoutingStoreUnavailable`.
        """
        if known is not None and known.sandbox_id is not None:
            return known
        deadline = time.monotonic() + self._timeout
        delay = 0.01
        lock_name = provisioning_lock(tenant, session_id)
        while True:
            route = await self.route(session_id, tenant)
            if route is not None and route.sandbox_id is not None:
                return route
            async with holding(self._store.locks, lock_name, self._timeout + 10) as held:
                if held:
                    return await self._provision_locked(session_id, tenant)
            if time.monotonic() + delay > deadline:
                raise ProvisioningFailed(f"timed out waiting for session {session_id!r} to get a sandbox")
            # Another request (maybe on another replica) is provisioning: wait for its route.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    async def _provision_locked(self, session_id: str, tenant: str) -> Route:
        route = await self.route(session_id, tenant)
        if route is not None and route.sandbox_id is not None:
            return route
        reserved = self._quotas is not None and await self._quotas.reserve_sandbox(tenant, session_id)
        try:
            return await self._provision_reserved(session_id, tenant, route)
        except BaseException:
            if reserved and self._quotas is not None:
                await self._quotas.cancel_sandbox(tenant, session_id)
            raise

    async def _provision_reserved(self, session_id: str, tenant: str, route: Route | None) -> Route:
        if self._shared is not None:
            return await self._shared.seat(self, session_id, tenant, route)
        if route is None:
            claimed = await self.claim_from_pool(session_id, tenant)
            if claimed is not None:
                route = Route(session_id, tenant, claimed.sandbox.volume).with_sandbox(claimed.sandbox, claimed.token)
                try:
                    await self._store.put(route)
                except BaseException:
                    # Nobody will ever find it: neither pooled nor routed any more.
                    await remove_sandbox(self._backend, claimed.sandbox, with_volume=True)
                    raise
                logger.info("session %s: claimed pooled sandbox %s", session_id, claimed.sandbox.sandbox_id)
                return route
        spec = new_spec(self._env, session_id, tenant, route.volume if route is not None else None)
        sandbox = await self.start(spec)
        try:
            assigned = (route or Route(session_id, tenant, spec.volume)).with_sandbox(sandbox, spec.token)
            await self._store.put(assigned)
        except BaseException:
            await self._backend.delete(sandbox.sandbox_id)
            raise
        logger.info("session %s: started sandbox %s", session_id, sandbox.sandbox_id)
        return assigned

    async def start(self, spec: SandboxSpec) -> Sandbox:
        """Create a sandbox and wait until it is ready; nothing is left behind on failure."""
        try:
            sandbox = await self._backend.create(spec)
        except SandboxError as exc:
            raise ProvisioningFailed(str(exc)) from None
        try:
            await self._backend.wait_ready(sandbox, spec.token, self._timeout)
        except BaseException as exc:
            await self._backend.delete(sandbox.sandbox_id)
            if isinstance(exc, SandboxError):
                raise ProvisioningFailed(str(exc)) from None
            raise
        return sandbox

    async def claim_from_pool(self, session_id: str, tenant: str) -> PoolEntry | None:
        """A ready warm-pool sandbox, claimed for the tenant's session; ``None`` if the pool
        has none (the ones found not ready are removed)."""
        if self._demand is not None:
            await self._demand.record_claim()
        while (entry := await self._store.pool_take()) is not None:
            if self._demand is not None:
                self._demand.changed.set()
            if await self._backend.health(entry.sandbox, entry.token) is not Health.READY:
                logger.warning("pooled sandbox %s is not ready: removing it", entry.sandbox.sandbox_id)
                await remove_sandbox(self._backend, entry.sandbox)
                continue
            claimed = await self._backend.claim(entry.sandbox, session_id, tenant)
            if claimed is not None:
                return PoolEntry(claimed, entry.token)
        return None

    async def replace(self, route: Route, unresponsive: bool = False) -> Route:
        """The route's sandbox could not be reached: unless it still answers ``/ready``
        (a passing hiccup: the route is kept), drop it and provision another on the same
        volume (in tenant scope, for every session on it). Another request may have
        replaced it already; then that one is used.

        ``unresponsive``: the relay saw it connected but answering neither the request nor
        ``/health`` (:class:`~hosting.gateway.sandbox_response.SandboxUnresponsive`), so it is
        not asked again, and it is killed at once (it has nothing to drain), so that the
        new sandbox can take its volume without waiting for a grace it cannot use."""
        if not unresponsive and route.sandbox_id is not None and route.address is not None and route.token is not None:
            sandbox = Sandbox(route.sandbox_id, self._backend.name, route.address, route.volume, route.session_id,
                              route.tenant, pid=route.pid)
            if await self._backend.health(sandbox, route.token) is Health.READY:
                return route
        if route.sandbox_id is not None and self._shared is not None:
            await self._shared.lost(route, at_once=unresponsive)
        elif route.sandbox_id is not None and await self._store.release(route.key, route.sandbox_id):
            logger.warning("session %s: sandbox %s lost, replacing it", route.session_id, route.sandbox_id)
            await self._backend.delete(route.sandbox_id, at_once=unresponsive)
        return await self.ensure(route.session_id, route.tenant)

