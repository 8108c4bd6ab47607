"""The routing store in Redis, shared by every gateway replica of an installation.

Replicas that share it are interchangeable: a request may land on any of them. Everything
that must happen once across replicas is one atomic step in Redis: claiming a pooled
sandbox (a script that removes it; only one caller gets it), releasing a route's sandbox
(compare-and-set on the sandbox id), locks (:class:`hosting.locks.RedisLocks`), and the
quota counters (each in one script, on Redis's clock). The scripts are the ``.lua`` files
beside this module.

When Redis cannot be reached, :meth:`RedisRoutingStore.get` answers from a small cache of
the routes this replica read or wrote last (:class:`~hosting.gateway.routing.cache.RouteCache`),
so turns on sessions it knows keep working through an outage; everything else raises
:class:`~hosting.gateway.routing.protocols.RoutingStoreUnavailable` (HTTP 503) and changes nothing.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import asdict
from importlib import resources
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from hosting.gateway.routing.cache import ROUTE_CACHE_SIZE, RouteCache
from hosting.gateway.routing.protocols import RoutingStore, RoutingStoreUnavailable
from hosting.gateway.routing.records import PoolEntry, Route, SharedVolume
from hosting.locks import Locks, RedisLocks

logger = logging.getLogger("hosting.gateway.routing")

UNRELEASED_LOCKS_KEPT = 1024
"""Locks whose release failed in an outage that a replica remembers, to release them later."""


def _lua(name: str) -> str:
    return (resources.files("hosting.gateway.routing") / f"{name}.lua").read_text(encoding="utf-8")


async def or_unavailable(awaitable: Any) -> Any:
    """Await a call to Redis; :class:`RoutingStoreUnavailable` if Redis cannot be reached."""
    try:
        return await awaitable
    except (TimeoutError, RedisError, OSError) as exc:
        raise RoutingStoreUnavailable(f"routing store unreachable: {type(exc).__name__}") from None


def _session_of(key: str) -> str:
    return key.partition("/")[2]


def _route_fields(route: Route) -> dict[Any, Any]:
    return {name: str(value) for name, value in asdict(route).items() if value is not None}


def _route_from(fields: dict[str, str]) -> Route:
    return Route(
        session_id=fields["session_id"], tenant=fields["tenant"], volume=fields["volume"],
        sandbox_id=fields.get("sandbox_id"), address=fields.get("address"), token=fields.get("token"),
        pid=int(fields["pid"]) if "pid" in fields else None,
        last_activity=float(fields.get("last_activity", 0)), epoch=int(fields.get("epoch", 0)),
    )


class OutageLocks:
    """The store's locks through an outage: :class:`hosting.locks.RedisLocks` raising
    :class:`RoutingStoreUnavailable` when Redis cannot be reached. A lock whose release
    failed so is released as soon as Redis answers again (before the next lock is taken;
    it would expire anyway), so a provisioning cut short by the outage does not block its
    session until then. Compare-and-delete: a lock that expired and was taken by someone
    else meanwhile is left alone."""

    def __init__(self, locks: RedisLocks) -> None:
        self._locks = locks
        self._unreleased: dict[tuple[str, str], None] = {}

    async def acquire(self, name: str, ttl_seconds: float) -> str | None:
        for left_name, left_token in list(self._unreleased):
            await or_unavailable(self._locks.release(left_name, left_token))
            self._unreleased.pop((left_name, left_token), None)
        return cast("str | None", await or_unavailable(self._locks.acquire(name, ttl_seconds)))

    async def release(self, name: str, token: str) -> bool:
        try:
            return bool(await or_unavailable(self._locks.release(name, token)))
        except RoutingStoreUnavailable:
            if len(self._unreleased) < UNRELEASED_LOCKS_KEPT:
                self._unreleased[(name, token)] = None
            raise


class RedisRoutingStore(RoutingStore):
    """Routes in Redis, shared by every replica: a hash per session
    (``gw:<installation>:route:<tenant>/<id>``), a set indexing them, a hash for the pool,
    in tenant scope a hash of each tenant's shared volumes (``gw:<installation>:shared:<tenant>``,
    volume → record) and a set of those tenants, plain keys for locks
    (``gw:<installation>:lock:<name>``, see :class:`OutageLocks`) and sorted sets for the
    quota counters (``gw:<installation>:quota:<kind>:<tenant>``) and the other rate windows
    (``gw:<installation>:quota:<name>``: the warm pool's claims).
    Scripts make each compound step atomic.

    Through an outage, :meth:`get` answers from the :class:`RouteCache` of the routes
    this replica last read or wrote (refreshed on every successful read)."""

    def __init__(self, url: str, installation: str, cache_size: int = ROUTE_CACHE_SIZE) -> None:
        # One quick retry on a fresh connection (a pooled one may be dead after Redis
        # restarted), no backoff: during an outage every call fails at once.
        self._redis = aioredis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=2,
                                              socket_timeout=5, health_check_interval=10,
                                              retry=Retry(NoBackoff(), 1))
        self._prefix = f"gw:{installation}:"
        self.cache = RouteCache(cache_size)
        self._locks = OutageLocks(RedisLocks(self._redis, self._key("lock", "")))
        register = self._redis.register_script
        self._touch = register(_lua("touch_if_exists"))
        self._release = register(_lua("release_if_assigned"))
        self._delete = register(_lua("delete_route"))
        self._reindex = register(_lua("reindex"))
        self._migrate = register(_lua("migrate_route"))
        self._pool_take = register(_lua("pool_take"))
        self._take_slot = register(_lua("take_slot"))
        self._refresh_slot = register(_lua("refresh_slot"))
        self._count_live = register(_lua("count_live"))
        self._take_rate = register(_lua("take_rate"))
        self._count_rate = register(_lua("count_rate"))
        self._record_rate = register(_lua("record_rate"))
        self._reserve = register(_lua("reserve_sandbox"))
        self._cancel_reservation = register(_lua("cancel_reservation"))

    @property
    def redis(self) -> aioredis.Redis:
        """The connection pool, for counters kept beside the routes (budgets)."""
        return self._redis

    @property
    def prefix(self) -> str:
        """``gw:<installation>:``: every key of this installation starts with it."""
        return self._prefix

    def _key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    def _sandboxes_key(self, tenant: str = "") -> str:
        return self._key("quota", "sandboxes", tenant)

    @property
    def locks(self) -> Locks:
        """Locks under ``gw:<installation>:lock:<name>``."""
        return self._locks

    async def ping(self) -> None:
        await or_unavailable(self._redis.ping())

    async def _fetch(self, key: str) -> Route | None:
        fields = await or_unavailable(self._redis.hgetall(self._key("route", key)))
        return _route_from(fields) if fields else None

    async def get(self, key: str) -> Route | None:
        try:
            route = await self._fetch(key)
        except RoutingStoreUnavailable:
            cached = self.cache.get(key)
            if cached is None:
                raise
            logger.info("routing store down, using the route this replica knows")
            return cached
        if route is None:
            self.cache.forget(key)
        else:
            self.cache.put(route)
        return route

    async def put(self, route: Route) -> None:
        key = self._key("route", route.key)
        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.hset(key, mapping=_route_fields(route))
                pipe.sadd(self._key("routes"), route.key)
                if route.sandbox_id is not None:
                    pipe.zadd(self._sandboxes_key(route.tenant), {route.session_id: "+inf"})
                else:
                    pipe.zrem(self._sandboxes_key(route.tenant), route.session_id)
                await pipe.execute()
        await or_unavailable(write())
        self.cache.put(route)

    async def delete(self, key: str) -> None:
        await or_unavailable(self._delete(keys=[self._key("route", key), self._key("routes")],
                                          args=[self._sandboxes_key(), key, _session_of(key)]))
        self.cache.forget(key)

    async def touch(self, key: str) -> str | None:
        sandbox_id = await or_unavailable(self._touch(keys=[self._key("route", key)], args=[str(time.time())]))
        return cast("str | None", sandbox_id)

    async def release(self, key: str, sandbox_id: str) -> bool:
        released = bool(await or_unavailable(self._release(keys=[self._key("route", key)],
                                                           args=[sandbox_id, self._sandboxes_key(), _session_of(key)])))
        cached = self.cache.get(key)
        if cached is not None and cached.sandbox_id == sandbox_id:
            self.cache.put(cached.released())
        return released

    async def routes(self) -> list[Route]:
        keys = await or_unavailable(self._redis.smembers(self._key("routes")))
        found = [await self._fetch(key) for key in sorted(keys)]
        return [route for route in found if route is not None]

    async def migrate_routes(self) -> list[Route]:
        """Re-key the routes written before session ids were per tenant (keyed by the
        session id alone) under their tenant's :func:`route_key`. Each move is one atomic
        step, so replicas doing this at once move each route once."""
        moved = []
        for member in await or_unavailable(self._redis.smembers(self._key("routes"))):
            if "/" in member:
                continue
            key = await or_unavailable(self._migrate(keys=[self._key("route", member), self._key("routes")],
                                                     args=[self._key("route", ""), member]))
            if key and (route := await self._fetch(key)) is not None:
                moved.append(route)
        return moved

    async def reindex(self, route: Route) -> None:
        await or_unavailable(self._reindex(keys=[self._key("route", route.key)],
                                           args=[self._sandboxes_key(), route.session_id]))

    async def pool_put(self, entry: PoolEntry) -> None:
        await or_unavailable(self._redis.hset(self._key("pool"), entry.sandbox.sandbox_id, entry.to_json()))

    async def pool_take(self) -> PoolEntry | None:
        raw = await or_unavailable(self._pool_take(keys=[self._key("pool")]))
        return PoolEntry.from_json(cast(str, raw)) if raw else None

    async def pool_remove(self, sandbox_id: str) -> bool:
        return bool(await or_unavailable(self._redis.hdel(self._key("pool"), sandbox_id)))

    async def pool_entries(self) -> list[PoolEntry]:
        raw = await or_unavailable(self._redis.hvals(self._key("pool")))
        return [PoolEntry.from_json(item) for item in raw]

    async def shared_volumes(self, tenant: str) -> list[SharedVolume]:
        raw = await or_unavailable(self._redis.hvals(self._key("shared", tenant)))
        return [SharedVolume.from_json(item) for item in raw]

    async def put_shared_volume(self, volume: SharedVolume) -> None:
        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(self._key("shared", volume.tenant), volume.volume, volume.to_json())
                pipe.sadd(self._key("shared-tenants"), volume.tenant)
                await pipe.execute()
        await or_unavailable(write())

    async def remove_shared_volume(self, tenant: str, volume: str) -> None:
        async def remove() -> None:
            await self._redis.hdel(self._key("shared", tenant), volume)
            if not await self._redis.exists(self._key("shared", tenant)):  # under the tenant's lock: no race
                await self._redis.srem(self._key("shared-tenants"), tenant)
        await or_unavailable(remove())

    async def shared_tenants(self) -> list[str]:
        return sorted(await or_unavailable(self._redis.smembers(self._key("shared-tenants"))))

    async def take_slot(self, name: str, limit: int, ttl_seconds: float) -> str | None:
        token = secrets.token_hex(8)
        taken = await or_unavailable(self._take_slot(keys=[self._key("quota", name)], args=[limit, token, ttl_seconds]))
        return token if taken else None

    async def refresh_slot(self, name: str, token: str, ttl_seconds: float) -> None:
        await or_unavailable(self._refresh_slot(keys=[self._key("quota", name)], args=[token, ttl_seconds]))

    async def release_slot(self, name: str, token: str) -> None:
        await or_unavailable(self._redis.zrem(self._key("quota", name), token))

    async def count_slots(self, name: str) -> int:
        return int(await or_unavailable(self._count_live(keys=[self._key("quota", name)])))

    async def take_rate(self, name: str, limit: int, window_seconds: float) -> tuple[str | None, float]:
        token = secrets.token_hex(8)
        answer = await or_unavailable(self._take_rate(keys=[self._key("quota", name)], args=[limit, window_seconds, token]))
        return (token, 0.0) if answer == "ok" else (None, max(0.0, float(answer)))

    async def refund_rate(self, name: str, token: str) -> None:
        await or_unavailable(self._redis.zrem(self._key("quota", name), token))

    async def record_rate(self, name: str, window_seconds: float) -> None:
        await or_unavailable(self._record_rate(keys=[self._key("quota", name)], args=[window_seconds, secrets.token_hex(8)]))

    async def count_rate(self, name: str, window_seconds: float) -> int:
        return int(await or_unavailable(self._count_rate(keys=[self._key("quota", name)], args=[window_seconds])))

    async def reserve_sandbox(self, tenant: str, session_id: str, limit: int, ttl_seconds: float) -> bool:
        return bool(await or_unavailable(self._reserve(keys=[self._sandboxes_key(tenant)],
                                                       args=[session_id, limit, ttl_seconds])))

    async def cancel_sandbox_reservation(self, tenant: str, session_id: str) -> None:
        await or_unavailable(self._cancel_reservation(keys=[self._sandboxes_key(tenant)], args=[session_id]))

    async def count_sandboxes(self, tenant: str) -> int:
        return int(await or_unavailable(self._count_live(keys=[self._sandboxes_key(tenant)])))

    async def aclose(self) -> None:
        await self._redis.aclose()
