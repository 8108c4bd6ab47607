"""At start-up, make what runs agree with what the routing store says.

Sandboxes the store no longer knows (a replica died between starting one and
writing its route, or routes were lost with an in-memory store) are removed;
known ones are re-adopted as they are. Routes and pool entries whose sandbox is
gone are released, so the next turn provisions a new one on the same volume;
the others are counted for their tenant's sandbox quota.
A sandbox another replica is provisioning right now is not an orphan: its lock
is held, and then it is left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from hosting.gateway.routes import RouteStore
from hosting.sandboxes.base import Sandbox, SandboxBackend

logger = logging.getLogger("hosting.gateway.reconcile")


@dataclass
class Reconciled:
    adopted: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)


def _lock_name(sandbox: Sandbox) -> str:
    return f"provision:{sandbox.session_id}" if sandbox.session_id else "pool-refill"


async def reconcile(backend: SandboxBackend, store: RouteStore) -> Reconciled:
    result = Reconciled()
    sandboxes = await backend.list()
    routes = await store.routes()
    pool = await store.pool_entries()
    known = {r.sandbox_id for r in routes if r.sandbox_id} | {e.sandbox.sandbox_id for e in pool}
    existing = {s.sandbox_id for s in sandboxes}
    for sandbox in sandboxes:
        if sandbox.sandbox_id in known:
            result.adopted.append(sandbox.sandbox_id)
            continue
        lock = await store.acquire(_lock_name(sandbox), 60)
        if lock is None:
            continue
        try:
            if await _known_now(store, sandbox):
                result.adopted.append(sandbox.sandbox_id)
                continue
            await backend.delete(sandbox.sandbox_id)
            result.removed.append(sandbox.sandbox_id)
        finally:
            await store.release_lock(_lock_name(sandbox), lock)
    for route in routes:
        if route.sandbox_id and route.sandbox_id not in existing and await store.release(route.session_id,
                                                                                          route.sandbox_id):
            result.released.append(route.sandbox_id)
        elif route.sandbox_id:
            await store.reindex(route)  # counted for its tenant's quota (routes written before quotas)
    for entry in pool:
        if entry.sandbox.sandbox_id not in existing and await store.pool_remove(entry.sandbox.sandbox_id):
            result.released.append(entry.sandbox.sandbox_id)
    logger.info("reconciled: %d adopted, %d orphans removed, %d lost sandboxes released",
                len(result.adopted), len(result.removed), len(result.released))
    return result


async def _known_now(store: RouteStore, sandbox: Sandbox) -> bool:
    """Re-read under the lock: a replica may have recorded it since the snapshot (a
    claimed pool sandbox still carries no session on engines that cannot relabel)."""
    if any(route.sandbox_id == sandbox.sandbox_id for route in await store.routes()):
        return True
    return any(e.sandbox.sandbox_id == sandbox.sandbox_id for e in await store.pool_entries())
