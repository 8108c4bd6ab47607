"""The routes a replica read or wrote last, for an outage of Redis."""

from __future__ import annotations

from collections import OrderedDict

from hosting.gateway.routing.records import Route

ROUTE_CACHE_SIZE = 4096
"""Routes a replica remembers for an outage of Redis (the ones it read or wrote last)."""


class RouteCache:
    """The routes a replica read or wrote last, at most ``size`` of them (least recently
    used go first). Only :class:`~hosting.gateway.routing.redis.RedisRoutingStore` reads
    it, and only when Redis is down."""

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
