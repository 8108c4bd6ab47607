"""What the routing store promises, one protocol per concern.

Each part of the gateway is typed against the concerns it uses (the reaper: routes and
locks; the quotas: the counters), so what it may touch is in its signature. One store
implements them all (:class:`RoutingStore`): in memory or in Redis.

Every method raises :class:`RoutingStoreUnavailable` when the store cannot be reached,
and changes nothing then (except that :meth:`Routes.get` may answer from a cache: see
:class:`~hosting.gateway.routing.redis.RedisRoutingStore`).
"""

from __future__ import annotations

from typing import Protocol

from hosting.errors import StoreUnavailable
from hosting.gateway.routing.records import PoolEntry, Route, SharedVolume
from hosting.locks import Locks


class RoutingStoreUnavailable(StoreUnavailable, store="routing store"):
    """The routing store cannot be reached (HTTP 503)."""


class Routes(Protocol):
    """Which sandbox serves which session; routes are named by their
    :func:`~hosting.gateway.routing.records.route_key`."""

    async def get(self, key: str) -> Route | None: ...

    async def put(self, route: Route) -> None:
        """Write the route; a route with a sandbox counts for its tenant's sandboxes
        (:class:`SandboxReservations`) from now on, one without does not."""

    async def delete(self, key: str) -> None: ...

    async def touch(self, key: str) -> str | None:
        """Stamp activity now (nothing if the route is gone); the sandbox the route has
        now (``None``: none, or no route), so a relay learns when its session moved."""

    async def release(self, key: str, sandbox_id: str) -> bool:
        """Detach ``sandbox_id`` from the route if it is still the one assigned;
        ``False`` if another caller already did (or assigned a new one)."""

    async def routes(self) -> list[Route]: ...

    async def reindex(self, route: Route) -> None:
        """Count the route's sandbox for its tenant if it has one (start-up, after an upgrade)."""

    async def migrate_routes(self) -> list[Route]:
        """Re-key routes written before session ids were per tenant; the routes moved."""


class SandboxReservations(Protocol):
    """The sandboxes each tenant has: its routes with a sandbox, plus provisionings under way."""

    async def reserve_sandbox(self, tenant: str, session_id: str, limit: int, ttl_seconds: float) -> bool:
        """Count a sandbox about to be provisioned for the tenant's session, unless the
        tenant has ``limit`` already (assigned routes plus reservations). ``True`` if the
        session is counted now. A reservation lapses after ``ttl_seconds`` unless a route
        with a sandbox is written for the session meanwhile; then it counts until released."""

    async def cancel_sandbox_reservation(self, tenant: str, session_id: str) -> None:
        """Drop a reservation whose provisioning failed (an assigned route stays counted)."""

    async def count_sandboxes(self, tenant: str) -> int: ...


class WarmPoolLedger(Protocol):
    """The sandboxes of the warm pool; each leaves it once, to one caller."""

    async def pool_put(self, entry: PoolEntry) -> None: ...

    async def pool_take(self) -> PoolEntry | None:
        """Remove and return one pooled sandbox; each is returned to one caller only."""

    async def pool_remove(self, sandbox_id: str) -> bool:
        """Take this sandbox out of the pool; ``True`` for the one caller that did."""

    async def pool_entries(self) -> list[PoolEntry]: ...


class SharedVolumes(Protocol):
    """Tenant scope's volumes (:class:`~hosting.gateway.routing.records.SharedVolume`), per
    tenant. Changed only under the tenant's placement lock
    (:func:`hosting.gateway.tenant_scope.placement_lock`), so a plain read and write suffice."""

    async def shared_volumes(self, tenant: str) -> list[SharedVolume]: ...

    async def put_shared_volume(self, volume: SharedVolume) -> None: ...

    async def remove_shared_volume(self, tenant: str, volume: str) -> None: ...

    async def shared_tenants(self) -> list[str]:
        """The tenants that have a shared volume."""


class TurnSlots(Protocol):
    """Slots, named by the caller: one is held while something runs, and lapses after its
    ttl unless refreshed (so a crashed holder's do)."""

    async def take_slot(self, name: str, limit: int, ttl_seconds: float) -> str | None:
        """Take one of ``limit`` slots for ``ttl_seconds``: its token, or ``None`` if all are held."""

    async def refresh_slot(self, name: str, token: str, ttl_seconds: float) -> None:
        """Hold the slot ``ttl_seconds`` longer if it is still held (a released or lapsed
        slot is not taken again: a refresh racing the release must not resurrect it)."""

    async def release_slot(self, name: str, token: str) -> None: ...

    async def count_slots(self, name: str) -> int: ...


class RateWindows(Protocol):
    """Sliding windows, named by the caller: each event counts once, for the window's length."""

    async def take_rate(self, name: str, limit: int, window_seconds: float) -> tuple[str | None, float]:
        """Count one event if fewer than ``limit`` happened in the last ``window_seconds``:
        ``(token, 0)``; otherwise ``(None, seconds until one leaves the window)``."""

    async def refund_rate(self, name: str, token: str) -> None:
        """Uncount an event (it was refused after all)."""

    async def record_rate(self, name: str, window_seconds: float) -> None:
        """Count one event whatever the count: a measure of demand, not a limit (the warm
        pool's claims). It leaves the window after ``window_seconds``."""

    async def count_rate(self, name: str, window_seconds: float) -> int: ...


class Locking(Protocol):
    """Named locks in the same store, so whoever shares the store shares them."""

    @property
    def locks(self) -> Locks: ...


class RoutingStore(Routes, SandboxReservations, WarmPoolLedger, SharedVolumes, TurnSlots, RateWindows, Locking,
                   Protocol):
    """All of the gateway's state: what a replica opens (:func:`~hosting.gateway.routing.open_routing_store`)."""

    async def ping(self) -> None:
        """Raise :class:`RoutingStoreUnavailable` if the store is down."""

    async def aclose(self) -> None:
        """Release connections."""
