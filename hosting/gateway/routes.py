"""The routing store: which sandbox serves which session, the warm pool, and locks.

A session is one tenant's: routes are keyed by (tenant, session id)
(:func:`route_key`), so two tenants using the same id have two routes, two
sandboxes and two conversations, and neither can tell that the other exists.

This is all the state a gateway replica has, so replicas that share one store
(Redis) are interchangeable: a request may land on any of them. Without Redis
the store lives in the process (:class:`MemoryRouteStore`): one replica only,
and routes are lost when it stops.

Everything that must happen once across replicas is atomic in the store:
claiming a pooled sandbox (an ``HDEL`` that only one caller wins), releasing a
route's sandbox (compare-and-set on the sandbox id), and locks (``SET NX`` with
a unique token and an expiry, released only by their holder: compare-and-delete).

The store also keeps the tenant quota counters (:mod:`hosting.gateway.quotas`), so
that replicas sharing Redis share them: the sandboxes each tenant has (kept in
step with the routes, in the same atomic steps), its running turns (slots with an
expiry, so a crashed replica's slots lapse) and its recent turns (a sliding window).

When Redis cannot be reached, :class:`RedisRouteStore` answers :meth:`~RouteStore.get`
from a small cache of the routes this replica read or wrote last, so turns on
sessions it knows keep working through an outage; everything else raises
:class:`RouteStoreUnavailable` (HTTP 503) and changes nothing.
"""

from __future__ import annotations

import abc
import json
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from hosting.sandboxes.base import Sandbox

logger = logging.getLogger("hosting.gateway.routes")

ROUTE_CACHE_SIZE = 4096
"""Routes a replica remembers for an outage of Redis (the ones it read or wrote last)."""


class RouteStoreUnavailable(ConnectionError):
    """The routing store cannot be reached (HTTP 503)."""


def route_key(tenant: str, session_id: str) -> str:
    """The key of one tenant's session. Neither tenant names nor session ids hold ``/``,
    so no two (tenant, session) pairs share a key."""
    return f"{tenant}/{session_id}"


@dataclass(frozen=True)
class Route:
    """One session: its owner, the volume holding its conversation, and the sandbox
    serving it now (``None`` once reaped or lost: the next turn gets a new one)."""

    session_id: str
    tenant: str
    volume: str
    sandbox_id: str | None = None
    address: str | None = None
    token: str | None = field(default=None, repr=False)
    pid: int | None = None
    last_activity: float = field(default_factory=time.time)
    epoch: int = 0
    """Which assignment of the session to a sandbox this is; grows with each one (see
    :meth:`with_sandbox`). Sent to the sandbox with every request (:data:`EPOCH_HEADER`):
    its session store refuses writes carrying an older one, so a replaced sandbox that
    wakes up cannot write over the conversation."""

    @property
    def key(self) -> str:
        """:func:`route_key` of the route's tenant and session."""
        return route_key(self.tenant, self.session_id)

    @property
    def state(self) -> str:
        return "assigned" if self.sandbox_id else "released"

    def with_sandbox(self, sandbox: Sandbox, token: str) -> Route:
        """Assigned to ``sandbox``, under a new epoch: milliseconds since the Unix epoch, past
        the last one. A clock, not a counter, so that a route lost with the routing store
        and made again still gets an epoch above every one used before (within the clock
        skew between gateway replicas, far below the time a replacement takes)."""
        return replace(self, sandbox_id=sandbox.sandbox_id, address=sandbox.address, token=token,
                       pid=sandbox.pid, last_activity=time.time(),
                       epoch=max(self.epoch + 1, int(time.time() * 1000)))

    def released(self) -> Route:
        return replace(self, sandbox_id=None, address=None, token=None, pid=None)


@dataclass(frozen=True)
class PoolEntry:
    """A started, ready sandbox waiting for a session, with its bearer token."""

    sandbox: Sandbox
    token: str = field(repr=False)

    def to_json(self) -> str:
        return json.dumps({"sandbox": asdict(self.sandbox), "token": self.token})

    @classmethod
    def from_json(cls, raw: str | bytes) -> PoolEntry:
        data = json.loads(raw)
        return cls(Sandbox(**data["sandbox"]), data["token"])


class RouteStore(abc.ABC):
    """Routes, the pool, locks and quota counters. Every method raises
    :class:`RouteStoreUnavailable` when the store cannot be reached, and changes
    nothing then (except that :meth:`get` may answer from a cache: see
    :class:`RedisRouteStore`). Routes are named by their :func:`route_key`."""

    @abc.abstractmethod
    async def get(self, key: str) -> Route | None: ...

    @abc.abstractmethod
    async def put(self, route: Route) -> None: ...

    @abc.abstractmethod
    async def delete(self, key: str) -> None: ...

    @abc.abstractmethod
    async def touch(self, key: str) -> str | None:
        """Stamp activity now (nothing if the route is gone); the sandbox the route has
        now (``None``: none, or no route), so a relay learns when its session moved."""

    @abc.abstractmethod
    async def release(self, key: str, sandbox_id: str) -> bool:
        """Detach ``sandbox_id`` from the route if it is still the one assigned;
        ``False`` if another caller already did (or assigned a new one)."""

    @abc.abstractmethod
    async def routes(self) -> list[Route]: ...

    @abc.abstractmethod
    async def acquire(self, name: str, ttl_seconds: float) -> str | None:
        """Take lock ``name`` for at most ``ttl_seconds``: its token, or ``None`` if held."""

    @abc.abstractmethod
    async def release_lock(self, name: str, token: str) -> bool:
        """Release the lock if ``token`` still holds it (never someone else's)."""

    @abc.abstractmethod
    async def pool_put(self, entry: PoolEntry) -> None: ...

    @abc.abstractmethod
    async def pool_take(self) -> PoolEntry | None:
        """Remove and return one pooled sandbox; each is returned to one caller only."""

    @abc.abstractmethod
    async def pool_remove(self, sandbox_id: str) -> bool:
        """Take this sandbox out of the pool; ``True`` for the one caller that did."""

    @abc.abstractmethod
    async def pool_entries(self) -> list[PoolEntry]: ...

    # Quota counters. A *slot* is held while something runs and lapses after its ttl unless
    # refreshed; a *rate* entry counts once in a sliding window. Both are named by the caller.

    @abc.abstractmethod
    async def take_slot(self, name: str, limit: int, ttl_seconds: float) -> str | None:
        """Take one of ``limit`` slots for ``ttl_seconds``: its token, or ``None`` if all are held."""

    @abc.abstractmethod
    async def refresh_slot(self, name: str, token: str, ttl_seconds: float) -> None:
        """Hold the slot ``ttl_seconds`` longer if it is still held (a released or lapsed
        slot is not taken again: a refresh racing the release must not resurrect it)."""

    @abc.abstractmethod
    async def release_slot(self, name: str, token: str) -> None: ...

    @abc.abstractmethod
    async def count_slots(self, name: str) -> int: ...

    @abc.abstractmethod
    async def take_rate(self, name: str, limit: int, window_seconds: float) -> tuple[str | None, float]:
        """Count one event if fewer than ``limit`` happened in the last ``window_seconds``:
        ``(token, 0)``; otherwise ``(None, seconds until one leaves the window)``."""

    @abc.abstractmethod
    async def refund_rate(self, name: str, token: str) -> None:
        """Uncount an event (it was refused after all)."""

    @abc.abstractmethod
    async def count_rate(self, name: str, window_seconds: float) -> int: ...

    @abc.abstractmethod
    async def reserve_sandbox(self, tenant: str, session_id: str, limit: int, ttl_seconds: float) -> bool:
        """Count a sandbox about to be provisioned for the tenant's session, unless the
        tenant has ``limit`` already (assigned routes plus reservations). ``True`` if the
        session is counted now. A reservation lapses after ``ttl_seconds`` unless a route
        with a sandbox is written for the session meanwhile; then it counts until released."""

    @abc.abstractmethod
    async def cancel_sandbox_reservation(self, tenant: str, session_id: str) -> None:
        """Drop a reservation whose provisioning failed (an assigned route stays counted)."""

    @abc.abstractmethod
    async def count_sandboxes(self, tenant: str) -> int: ...

    async def reindex(self, route: Route) -> None:
        """Count the route's sandbox for its tenant if it has one (start-up, after an upgrade)."""

    async def migrate_routes(self) -> list[Route]:
        """Re-key routes written before session ids were per tenant; the routes moved.
        Nothing to do in memory (nothing survives a restart)."""
        return []

    async def ping(self) -> None:
        """Raise :class:`RouteStoreUnavailable` if the store is down."""

    async def aclose(self) -> None:
        """Release connections."""


class MemoryRouteStore(RouteStore):
    """In-process store: one gateway replica, nothing survives a restart."""

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}
        self._pool: dict[str, PoolEntry] = {}
        self._locks: dict[str, tuple[str, float]] = {}
        self._slots: dict[str, dict[str, float]] = {}
        """name → token → when it lapses (monotonic)."""
        self._rates: dict[str, dict[str, float]] = {}
        """name → token → when it was counted (monotonic)."""
        self._reserved: dict[str, dict[str, float]] = {}
        """tenant → session → when its reservation lapses (monotonic)."""

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

    async def acquire(self, name: str, ttl_seconds: float) -> str | None:
        held = self._locks.get(name)
        if held is not None and held[1] > time.monotonic():
            return None
        token = secrets.token_hex(16)
        self._locks[name] = (token, time.monotonic() + ttl_seconds)
        return token

    async def release_lock(self, name: str, token: str) -> bool:
        held = self._locks.get(name)
        if held is None or held[0] != token:
            return False
        del self._locks[name]
        return True

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

    def _live_slots(self, name: str) -> dict[str, float]:
        now = time.monotonic()
        slots = {token: until for token, until in self._slots.get(name, {}).items() if until > now}
        self._slots[name] = slots
        return slots

    async def take_slot(self, name: str, limit: int, ttl_seconds: float) -> str | None:
        slots = self._live_slots(name)
        if len(slots) >= limit:
            return None
        token = secrets.token_hex(8)
        slots[token] = time.monotonic() + ttl_seconds
        return token

    async def refresh_slot(self, name: str, token: str, ttl_seconds: float) -> None:
        slots = self._live_slots(name)
        if token in slots:
            slots[token] = time.monotonic() + ttl_seconds

    async def release_slot(self, name: str, token: str) -> None:
        self._slots.get(name, {}).pop(token, None)

    async def count_slots(self, name: str) -> int:
        return len(self._live_slots(name))

    def _recent(self, name: str, window_seconds: float) -> dict[str, float]:
        since = time.monotonic() - window_seconds
        recent = {token: at for token, at in self._rates.get(name, {}).items() if at > since}
        self._rates[name] = recent
        return recent

    async def take_rate(self, name: str, limit: int, window_seconds: float) -> tuple[str | None, float]:
        recent = self._recent(name, window_seconds)
        if len(recent) >= limit:
            return None, max(0.0, min(recent.values()) + window_seconds - time.monotonic())
        token = secrets.token_hex(8)
        recent[token] = time.monotonic()
        return token, 0.0

    async def refund_rate(self, name: str, token: str) -> None:
        self._rates.get(name, {}).pop(token, None)

    async def count_rate(self, name: str, window_seconds: float) -> int:
        return len(self._recent(name, window_seconds))

    def _sandboxes_of(self, tenant: str) -> set[str]:
        now = time.monotonic()
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
        self._reserved[tenant][session_id] = time.monotonic() + ttl_seconds
        return True

    async def cancel_sandbox_reservation(self, tenant: str, session_id: str) -> None:
        self._reserved.get(tenant, {}).pop(session_id, None)

    async def count_sandboxes(self, tenant: str) -> int:
        return len(self._sandboxes_of(tenant))


_COMPARE_AND_DELETE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_TOUCH_IF_EXISTS = (
    "if redis.call('EXISTS', KEYS[1]) == 0 then return false end "
    "redis.call('HSET', KEYS[1], 'last_activity', ARGV[1]) return redis.call('HGET', KEYS[1], 'sandbox_id')"
)
# Scripts that find a tenant's sandbox count from the route build its key from ARGV (a
# prefix) and the route's tenant: fine on one Redis server, not on Redis Cluster.
_RELEASE_IF_ASSIGNED = (
    "if redis.call('HGET', KEYS[1], 'sandbox_id') ~= ARGV[1] then return 0 end "
    "redis.call('HDEL', KEYS[1], 'sandbox_id', 'address', 'token', 'pid') "
    "local tenant = redis.call('HGET', KEYS[1], 'tenant') "
    "if tenant then redis.call('ZREM', ARGV[2] .. tenant, ARGV[3]) end return 1"
)
_DELETE_ROUTE = (
    "local tenant = redis.call('HGET', KEYS[1], 'tenant') "
    "if tenant then redis.call('ZREM', ARGV[1] .. tenant, ARGV[3]) end "
    "redis.call('DEL', KEYS[1]) redis.call('SREM', KEYS[2], ARGV[2]) return 1"
)
_MIGRATE_ROUTE = (
    "local tenant = redis.call('HGET', KEYS[1], 'tenant') redis.call('SREM', KEYS[2], ARGV[2]) "
    "if not tenant then return false end "
    "local key = tenant .. '/' .. ARGV[2] "
    "if redis.call('EXISTS', ARGV[1] .. key) == 1 then redis.call('DEL', KEYS[1]) return false end "
    "redis.call('RENAME', KEYS[1], ARGV[1] .. key) redis.call('SADD', KEYS[2], key) return key"
)
_REINDEX = (
    "local found = redis.call('HMGET', KEYS[1], 'tenant', 'sandbox_id') "
    "if found[1] and found[2] then redis.call('ZADD', ARGV[1] .. found[1], 'inf', ARGV[2]) return 1 end return 0"
)
_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1000000 "
"""Every replica reads the time from Redis, so their clocks need not agree."""
_TAKE_SLOT = _NOW + (
    "redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) "
    "if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end "
    "redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2]) "
    "redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 1000)) return 1"
)
_REFRESH_SLOT = _NOW + (
    "if redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1]) == 0 then return 0 end "
    "redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000)) return 1"
)
_COUNT_SLOTS = _NOW + "return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')"
_TAKE_RATE = _NOW + (
    "local window = tonumber(ARGV[2]) "
    "redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window) "
    "if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then "
    "  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES') "
    "  return tostring(tonumber(oldest[2]) + window - now) end "
    "redis.call('ZADD', KEYS[1], now, ARGV[3]) "
    "redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000) + 1000) return 'ok'"
)
_COUNT_RATE = _NOW + "return redis.call('ZCOUNT', KEYS[1], '(' .. (now - tonumber(ARGV[1])), '+inf')"
_RESERVE_SANDBOX = _NOW + (
    "redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) "
    "local score = redis.call('ZSCORE', KEYS[1], ARGV[1]) "
    "if score == 'inf' then return 1 end "
    "if (not score) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end "
    "redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1]) return 1"
)
_CANCEL_RESERVATION = (
    "local score = redis.call('ZSCORE', KEYS[1], ARGV[1]) "
    "if score and score ~= 'inf' then redis.call('ZREM', KEYS[1], ARGV[1]) end return 0"
)
_COUNT_SANDBOXES = _NOW + "return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')"
_POOL_TAKE = (
    "local ids = redis.call('HKEYS', KEYS[1]) if #ids == 0 then return false end "
    "local entry = redis.call('HGET', KEYS[1], ids[1]) redis.call('HDEL', KEYS[1], ids[1]) return entry"
)


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


class RouteCache:
    """The routes a replica read or wrote last, at most ``size`` of them (least recently
    used go first). Only :class:`RedisRouteStore` reads it, and only when Redis is down."""

    def __init__(self, size: int = ROUTE_CACHE_SIZE) -> None:
        self.size = size
        self._routes: OrderedDict[str, Route] = OrderedDict()

    def get(self, key: str) -> Route | None:
        route = self._routes.get(key)
        if route is not None:
            self._routes.move_to_end(key)
        return route

    def put(self, route: Route) -> None:
        self._routes[route.key] = route
        self._routes.move_to_end(route.key)
        while len(self._routes) > self.size:
            self._routes.popitem(last=False)

    def forget(self, key: str) -> None:
        self._routes.pop(key, None)

    def __len__(self) -> int:
        return len(self._routes)


class RedisRouteStore(RouteStore):
    """Routes in Redis, shared by every replica: a hash per session
    (``gw:<installation>:route:<tenant>/<id>``), a set indexing them, a hash for the pool,
    plain keys for locks and sorted sets for the quota counters
    (``gw:<installation>:quota:<kind>:<tenant>``). Scripts make each compound step atomic.

    Through an outage, :meth:`get` answers from the :class:`RouteCache` of the routes
    this replica last read or wrote (refreshed on every successful read), and a lock
    whose release failed is released as soon as Redis answers again (it would expire
    anyway), so a provisioning cut short by the outage does not block its session."""

    def __init__(self, url: str, installation: str, cache_size: int = ROUTE_CACHE_SIZE) -> None:
        # One quick retry on a fresh connection (a pooled one may be dead after Redis
        # restarted), no backoff: during an outage every call fails at once.
        self._redis = aioredis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=2,
                                              socket_timeout=5, health_check_interval=10,
                                              retry=Retry(NoBackoff(), 1))
        self._prefix = f"gw:{installation}:"
        self.cache = RouteCache(cache_size)
        self._unreleased: dict[tuple[str, str], None] = {}
        register = self._redis.register_script
        self._compare_and_delete = register(_COMPARE_AND_DELETE)
        self._touch = register(_TOUCH_IF_EXISTS)
        self._release = register(_RELEASE_IF_ASSIGNED)
        self._delete = register(_DELETE_ROUTE)
        self._reindex = register(_REINDEX)
        self._migrate = register(_MIGRATE_ROUTE)
        self._pool_take = register(_POOL_TAKE)
        self._take_slot = register(_TAKE_SLOT)
        self._refresh_slot = register(_REFRESH_SLOT)
        self._count_slots = register(_COUNT_SLOTS)
        self._take_rate = register(_TAKE_RATE)
        self._count_rate = register(_COUNT_RATE)
        self._reserve = register(_RESERVE_SANDBOX)
        self._cancel_reservation = register(_CANCEL_RESERVATION)
        self._count_sandboxes = register(_COUNT_SANDBOXES)

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

    async def _call(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except (TimeoutError, RedisError, OSError) as exc:
            raise RouteStoreUnavailable(f"routing store unreachable: {type(exc).__name__}") from None

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def _fetch(self, key: str) -> Route | None:
        fields = await self._call(self._redis.hgetall(self._key("route", key)))
        return _route_from(fields) if fields else None

    async def get(self, key: str) -> Route | None:
        try:
            route = await self._fetch(key)
        except RouteStoreUnavailable:
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
        await self._call(write())
        self.cache.put(route)

    async def delete(self, key: str) -> None:
        await self._call(self._delete(keys=[self._key("route", key), self._key("routes")],
                                      args=[self._sandboxes_key(), key, _session_of(key)]))
        self.cache.forget(key)

    async def touch(self, key: str) -> str | None:
        sandbox_id = await self._call(self._touch(keys=[self._key("route", key)], args=[str(time.time())]))
        return cast("str | None", sandbox_id)

    async def release(self, key: str, sandbox_id: str) -> bool:
        released = bool(await self._call(self._release(keys=[self._key("route", key)],
                                                       args=[sandbox_id, self._sandboxes_key(), _session_of(key)])))
        cached = self.cache.get(key)
        if cached is not None and cached.sandbox_id == sandbox_id:
            self.cache.put(cached.released())
        return released

    async def routes(self) -> list[Route]:
        keys = await self._call(self._redis.smembers(self._key("routes")))
        found = [await self._fetch(key) for key in sorted(keys)]
        return [route for route in found if route is not None]

    async def migrate_routes(self) -> list[Route]:
        """Re-key the routes written before session ids were per tenant (keyed by the
        session id alone) under their tenant's :func:`route_key`. Each move is one atomic
        step, so replicas doing this at once move each route once."""
        moved = []
        for member in await self._call(self._redis.smembers(self._key("routes"))):
            if "/" in member:
                continue
            key = await self._call(self._migrate(keys=[self._key("route", member), self._key("routes")],
                                                 args=[self._key("route", ""), member]))
            if key and (route := await self._fetch(key)) is not None:
                moved.append(route)
        return moved

    async def reindex(self, route: Route) -> None:
        await self._call(self._reindex(keys=[self._key("route", route.key)],
                                       args=[self._sandboxes_key(), route.session_id]))

    async def acquire(self, name: str, ttl_seconds: float) -> str | None:
        await self._release_left_locks()
        token = secrets.token_hex(16)
        taken = await self._call(self._redis.set(self._key("lock", name), token, nx=True,
                                                 px=max(1, int(ttl_seconds * 1000))))
        return token if taken else None

    async def release_lock(self, name: str, token: str) -> bool:
        try:
            return bool(await self._call(self._compare_and_delete(keys=[self._key("lock", name)], args=[token])))
        except RouteStoreUnavailable:
            if len(self._unreleased) < 1024:
                self._unreleased[(name, token)] = None
            raise

    async def _release_left_locks(self) -> None:
        """Release the locks whose release failed in an outage (compare-and-delete: a lock
        that expired and was taken by someone else meanwhile is left alone)."""
        for name, token in list(self._unreleased):
            await self._call(self._compare_and_delete(keys=[self._key("lock", name)], args=[token]))
            self._unreleased.pop((name, token), None)

    async def pool_put(self, entry: PoolEntry) -> None:
        await self._call(self._redis.hset(self._key("pool"), entry.sandbox.sandbox_id, entry.to_json()))

    async def pool_take(self) -> PoolEntry | None:
        raw = await self._call(self._pool_take(keys=[self._key("pool")]))
        return PoolEntry.from_json(cast(str, raw)) if raw else None

    async def pool_remove(self, sandbox_id: str) -> bool:
        return bool(await self._call(self._redis.hdel(self._key("pool"), sandbox_id)))

    async def pool_entries(self) -> list[PoolEntry]:
        raw = await self._call(self._redis.hvals(self._key("pool")))
        return [PoolEntry.from_json(item) for item in raw]

    async def take_slot(self, name: str, limit: int, ttl_seconds: float) -> str | None:
        token = secrets.token_hex(8)
        taken = await self._call(self._take_slot(keys=[self._key("quota", name)], args=[limit, token, ttl_seconds]))
        return token if taken else None

    async def refresh_slot(self, name: str, token: str, ttl_seconds: float) -> None:
        await self._call(self._refresh_slot(keys=[self._key("quota", name)], args=[token, ttl_seconds]))

    async def release_slot(self, name: str, token: str) -> None:
        await self._call(self._redis.zrem(self._key("quota", name), token))

    async def count_slots(self, name: str) -> int:
        return int(await self._call(self._count_slots(keys=[self._key("quota", name)])))

    async def take_rate(self, name: str, limit: int, window_seconds: float) -> tuple[str | None, float]:
        token = secrets.token_hex(8)
        answer = await self._call(self._take_rate(keys=[self._key("quota", name)], args=[limit, window_seconds, token]))
        return (token, 0.0) if answer == "ok" else (None, max(0.0, float(answer)))

    async def refund_rate(self, name: str, token: str) -> None:
        await self._call(self._redis.zrem(self._key("quota", name), token))

    async def count_rate(self, name: str, window_seconds: float) -> int:
        return int(await self._call(self._count_rate(keys=[self._key("quota", name)], args=[window_seconds])))

    async def reserve_sandbox(self, tenant: str, session_id: str, limit: int, ttl_seconds: float) -> bool:
        return bool(await self._call(self._reserve(keys=[self._sandboxes_key(tenant)],
                                                   args=[session_id, limit, ttl_seconds])))

    async def cancel_sandbox_reservation(self, tenant: str, session_id: str) -> None:
        await self._call(self._cancel_reservation(keys=[self._sandboxes_key(tenant)], args=[session_id]))

    async def count_sandboxes(self, tenant: str) -> int:
        return int(await self._call(self._count_sandboxes(keys=[self._sandboxes_key(tenant)])))

    async def aclose(self) -> None:
        await self._redis.aclose()


def open_route_store(redis_url: str | None, installation: str) -> RouteStore:
    return RedisRouteStore(redis_url, installation) if redis_url else MemoryRouteStore()
