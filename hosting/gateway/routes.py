"""The routing store: which sandbox serves which session, the warm pool, and locks.

This is all the state a gateway replica has, so replicas that share one store
(Redis) are interchangeable: a request may land on any of them. Without Redis
the store lives in the process (:class:`MemoryRouteStore`): one replica only,
and routes are lost when it stops.

Everything that must happen once across replicas is atomic in the store:
claiming a pooled sandbox (an ``HDEL`` that only one caller wins), releasing a
route's sandbox (compare-and-set on the sandbox id), and locks (``SET NX`` with
a unique token and an expiry, released only by their holder: compare-and-delete).
"""

from __future__ import annotations

import abc
import json
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from hosting.sandboxes.base import Sandbox


class RouteStoreUnavailable(ConnectionError):
    """The routing store cannot be reached (HTTP 503)."""


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

    @property
    def state(self) -> str:
        return "assigned" if self.sandbox_id else "released"

    def with_sandbox(self, sandbox: Sandbox, token: str) -> Route:
        return replace(self, sandbox_id=sandbox.sandbox_id, address=sandbox.address, token=token,
                       pid=sandbox.pid, last_activity=time.time())

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
    """Routes, the pool and locks. Every method raises :class:`RouteStoreUnavailable`
    when the store cannot be reached, and changes nothing then."""

    @abc.abstractmethod
    async def get(self, session_id: str) -> Route | None: ...

    @abc.abstractmethod
    async def put(self, route: Route) -> None: ...

    @abc.abstractmethod
    async def delete(self, session_id: str) -> None: ...

    @abc.abstractmethod
    async def touch(self, session_id: str) -> None:
        """Stamp activity now; does nothing if the route is gone."""

    @abc.abstractmethod
    async def release(self, session_id: str, sandbox_id: str) -> bool:
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

    async def get(self, session_id: str) -> Route | None:
        return self._routes.get(session_id)

    async def put(self, route: Route) -> None:
        self._routes[route.session_id] = route

    async def delete(self, session_id: str) -> None:
        self._routes.pop(session_id, None)

    async def touch(self, session_id: str) -> None:
        route = self._routes.get(session_id)
        if route is not None:
            self._routes[session_id] = replace(route, last_activity=time.time())

    async def release(self, session_id: str, sandbox_id: str) -> bool:
        route = self._routes.get(session_id)
        if route is None or route.sandbox_id != sandbox_id:
            return False
        self._routes[session_id] = route.released()
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


_COMPARE_AND_DELETE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_TOUCH_IF_EXISTS = "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'last_activity', ARGV[1]) end return 0"
_RELEASE_IF_ASSIGNED = (
    "if redis.call('HGET', KEYS[1], 'sandbox_id') ~= ARGV[1] then return 0 end "
    "redis.call('HDEL', KEYS[1], 'sandbox_id', 'address', 'token', 'pid') return 1"
)
_POOL_TAKE = (
    "local ids = redis.call('HKEYS', KEYS[1]) if #ids == 0 then return false end "
    "local entry = redis.call('HGET', KEYS[1], ids[1]) redis.call('HDEL', KEYS[1], ids[1]) return entry"
)


def _route_fields(route: Route) -> dict[Any, Any]:
    return {name: str(value) for name, value in asdict(route).items() if value is not None}


def _route_from(fields: dict[str, str]) -> Route:
    return Route(
        session_id=fields["session_id"], tenant=fields["tenant"], volume=fields["volume"],
        sandbox_id=fields.get("sandbox_id"), address=fields.get("address"), token=fields.get("token"),
        pid=int(fields["pid"]) if "pid" in fields else None,
        last_activity=float(fields.get("last_activity", 0)),
    )


class RedisRouteStore(RouteStore):
    """Routes in Redis, shared by every replica: a hash per session
    (``gw:<installation>:route:<id>``), a set indexing them, a hash for the pool
    and plain keys for locks. Scripts make each compound step atomic."""

    def __init__(self, url: str, installation: str) -> None:
        self._redis = aioredis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=2,
                                              socket_timeout=5, health_check_interval=10)
        self._prefix = f"gw:{installation}:"
        self._compare_and_delete = self._redis.register_script(_COMPARE_AND_DELETE)
        self._touch = self._redis.register_script(_TOUCH_IF_EXISTS)
        self._release = self._redis.register_script(_RELEASE_IF_ASSIGNED)
        self._pool_take = self._redis.register_script(_POOL_TAKE)

    def _key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    async def _call(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except (TimeoutError, RedisError, OSError) as exc:
            raise RouteStoreUnavailable(f"routing store unreachable: {type(exc).__name__}") from None

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def get(self, session_id: str) -> Route | None:
        fields = await self._call(self._redis.hgetall(self._key("route", session_id)))
        return _route_from(fields) if fields else None

    async def put(self, route: Route) -> None:
        key = self._key("route", route.session_id)
        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.hset(key, mapping=_route_fields(route))
                pipe.sadd(self._key("routes"), route.session_id)
                await pipe.execute()
        await self._call(write())

    async def delete(self, session_id: str) -> None:
        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._key("route", session_id))
                pipe.srem(self._key("routes"), session_id)
                await pipe.execute()
        await self._call(write())

    async def touch(self, session_id: str) -> None:
        await self._call(self._touch(keys=[self._key("route", session_id)], args=[str(time.time())]))

    async def release(self, session_id: str, sandbox_id: str) -> bool:
        return bool(await self._call(self._release(keys=[self._key("route", session_id)], args=[sandbox_id])))

    async def routes(self) -> list[Route]:
        ids = await self._call(self._redis.smembers(self._key("routes")))
        found = [await self.get(session_id) for session_id in sorted(ids)]
        return [route for route in found if route is not None]

    async def acquire(self, name: str, ttl_seconds: float) -> str | None:
        token = secrets.token_hex(16)
        taken = await self._call(self._redis.set(self._key("lock", name), token, nx=True,
                                                 px=max(1, int(ttl_seconds * 1000))))
        return token if taken else None

    async def release_lock(self, name: str, token: str) -> bool:
        return bool(await self._call(self._compare_and_delete(keys=[self._key("lock", name)], args=[token])))

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

    async def aclose(self) -> None:
        await self._redis.aclose()


def open_route_store(redis_url: str | None, installation: str) -> RouteStore:
    return RedisRouteStore(redis_url, installation) if redis_url else MemoryRouteStore()
