"""The routing store: all the state a gateway replica has.

Which sandbox serves which tenant's session (the routes), the warm pool, in tenant scope the
volumes that sessions of one tenant share (their seats and sandbox), named locks, and
the tenant quota counters (the sandboxes each tenant has, kept in step with the routes in
the same atomic steps; its running turns, slots with an expiry so a crashed replica's
lapse; its recent turns, a sliding window), and the recent claims on the pool (a sliding
window too, which sets the pool's target). Replicas that share one store (Redis) share
all of it and are interchangeable; without Redis the store lives in the process: one
replica only, and routes are lost when it stops.

Modules:

- ``records``: what is stored: :class:`~hosting.gateway.routing.records.Route` (keyed by
  tenant and session: :func:`~hosting.gateway.routing.records.route_key`), pool entries and
  :class:`~hosting.gateway.routing.records.SharedVolume`
- ``protocols``: one protocol per concern (routes, sandbox reservations, the warm pool's
  ledger, shared volumes, turn slots, rate windows (quotas, the pool's claims), locks),
  :class:`~hosting.gateway.routing.protocols.RoutingStore`
  combining them, and the error every method raises when the store cannot be reached
- ``memory``: in the process (one replica)
- ``redis``: in Redis, its scripts the ``.lua`` files beside it; ``cache``: the routes it
  serves through an outage of Redis
"""

from __future__ import annotations

from hosting.gateway.routing.memory import MemoryRoutingStore
from hosting.gateway.routing.protocols import RoutingStore
from hosting.gateway.routing.redis import RedisRoutingStore


def open_routing_store(redis_url: str | None, installation: str) -> RoutingStore:
    """The store of an installation's replicas: in Redis when ``redis_url`` is set, else in the process."""
    return RedisRoutingStore(redis_url, installation) if redis_url else MemoryRoutingStore()
