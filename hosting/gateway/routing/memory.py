"""The routing store in the process: one gateway replica, nothing survives a restart."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import replace

from hosting.gateway.routing.protocols import RoutingStore
from hosting.gateway.routing.records import PoolEntry, Route, SharedVolume, route_key
from hosting.locks import Locks, MemoryLocks


class MemoryRoutingStore(RoutingStore):
    """Every concern in dicts of this process; it never raises
    :class:`~hosting.gateway.routing.protocols.RoutingStoreUnavailable`.

    ``clock`` (monotonic seconds) times the slots, rate windows and reservations, so a
    test can move time on instead of waiting for it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._routes: dict[str, Route] = {}
        self._pool: dict[str, PoolEntry] = {}
        self._shared: dict[str, dict[str, SharedVolume]] = {}
        """tenant → volume → its record."""
        self._locks = MemoryLocks()
        self._slots: dict[str, dict[str, float]] = {}
        """name → token → when it lapses (on ``clock``)."""
        self._rates: dict[str, dict[str, float]] = {}
        """name → token → when it was counted (on ``clock``)."""
        self._reserved: dict[str, dict[str, float]] = {}
        """tenant → session → when its reservation lapses (on ``clock``)."""

    @property
    def locks(self) -> Locks:
        return self._locks

    async def ping(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    # Routes

    async def get(self, key: str) -> Route | None:
        return self._routes.get(key)

    async def put(self, route: Route) -> None:
        self._routes[route.key] = route
        if route.sandbox_id is not None:
            self._reserved.get(route.tenant, {}).pop(route.session_id, None)

    async def delete(self, key: str) -> None:
        self._routes.pop(key, None)

    async def touch(self, key: str) -> str | None:
        route = self._routes.get(key)
        if route is None:
            return None
        self._routes[key] = replace(route, last_activity=time.time())
        return route.sandbox_id

    async def release(self, key: str, sandbox_id: str) -> bool:
        route = self._routes.get(key)
        if route is None or route.sandbox_id != sandbox_id:
            return False
        self._routes[key] = route.released()
        return True

    async def routes(self) -> list[Route]:
        return list(self._routes.values())

    async def reindex(self, route: Route) -> None:
        """Nothing to do: the sandbox counts are read from the routes themselves."""

    async def migrate_routes(self) -> list[Route]:
        """Nothing to do: no route survives a restart."""
        return []

    # The warm pool

    async def pool_put(self, entry: PoolEntry) -> None:
        self._pool[entry.sandbox.sandbox_id] = entry

    async def pool_take(self) -> PoolEntry | None:
        if not self._pool:
            return None
        return self._pool.pop(next(iter(self._pool)))

    async def pool_remove(self, sandbox_id: str) -> bool:
        return self._pool.pop(sandbox_id, None) is not None

    async def pool_entries(self) -> list[PoolEntry]:
        return list(self._pool.values())

    # Shared volumes

    async def shared_volumes(self, tenant: str) -> list[SharedVolume]:
        return list(self._shared.get(tenant, {}).values())

    async def put_shared_volume(self, volume: SharedVolume) -> None:
        self._shared.setdefault(volume.tenant, {})[volume.volume] = volume

    async def remove_shared_volume(self, tenant: str, volume: str) -> None:
        volumes = self._shared.get(tenant, {})
        volumes.pop(volume, None)
        if not volumes:
            self._shared.pop(tenant, None)

    async def shared_tenants(self) -> list[str]:
        return list(self._shared)

    # Slots

    def _live_slots(self, name: str) -> dict[str, float]:
        now = self._clock()
        slots = {token: until for token, until in self._slots.get(name, {}).items() if until > now}
        self._slots[name] = slots
        return slots

    async def take_slot(self, name: str, limit: int, ttl_seconds: float) -> str | None:
        slots = self._live_slots(name)
        if len(slots) >= limit:
            return None
        token = secrets.token_hex(8)
        slots[token] = self._clock() + ttl_seconds
        return token

    async def refresh_slot(self, name: str, token: str, ttl_seconds: float) -> None:
        slots = self._live_slots(name)
        if token in slots:
            slots[token] = self._clock() + ttl_seconds

    async def release_slot(self, name: str, token: str) -> None:
        self._slots.get(name, {}).pop(token, None)

    async def count_slots(self, name: str) -> int:
        return len(self._live_slots(name))

    # Rate windows

    def _recent(self, name: str, window_seconds: float) -> dict[str, float]:
        since = self._clock() - window_seconds
        recent = {token: at for token, at in self._rates.get(name, {}).items() if at > since}
        self._rates[name] = recent
        return recent

    async def take_rate(self, name: str, limit: int, window_seconds: float) -> tuple[str | None, float]:
        recent = self._recent(name, window_seconds)
        if len(recent) >= limit:
            return None, max(0.0, min(recent.values()) + window_seconds - self._clock())
        token = secrets.token_hex(8)
        recent[token] = self._clock()
        return token, 0.0

    async def refund_rate(self, name: str, token: str) -> None:
        self._rates.get(name, {}).pop(token, None)

    async def record_rate(self, name: str, window_seconds: float) -> None:
        self._recent(name, window_seconds)[secrets.token_hex(8)] = self._clock()

    async def count_rate(self, name: str, window_seconds: float) -> int:
        return len(self._recent(name, window_seconds))

    # Sandbox reservations

    def _sandboxes_of(self, tenant: str) -> set[str]:
        now = self._clock()
        reserved = {s: until for s, until in self._reserved.get(tenant, {}).items() if until > now}
        self._reserved[tenant] = reserved
        assigned = {r.session_id for r in self._routes.values() if r.tenant == tenant and r.sandbox_id is not None}
        return assigned | set(reserved)

    async def reserve_sandbox(self, tenant: str, session_id: str, limit: int, ttl_seconds: float) -> bool:
        counted = self._sandboxes_of(tenant)
        route = self._routes.get(route_key(tenant, session_id))
        if route is not None and route.sandbox_id is not None:
            return True
        if session_id not in counted and len(counted) >= limit:
            return False
        self._reserved[tenant][session_id] = self._clock() + ttl_seconds
        return True

    async def cancel_sandbox_reservation(self, tenant: str, session_id: str) -> None:
        self._reserved.get(tenant, {}).pop(session_id, None)

    async def count_sandboxes(self, tenant: str) -> int:
        return len(self._sandboxes_of(tenant))
