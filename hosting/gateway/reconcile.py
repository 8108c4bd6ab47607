"""At start-up, make what runs agree with what the routing store says.

Sandboxes the store no longer knows (a replica died between starting one and
writing its route, or routes were lost with an in-memory store) are removed;
known ones are re-adopted as they are. Routes and pool entries whose sandbox is
gone are released, so the next turn provisions a new one on the same volume;
the others are counted for their tenant's sandbox quota.
A sandbox another replica is provisioning right now is not an orphan: its lock
is held, and then it is left alone.

In tenant scope the shared volumes' sandboxes are known too, and one that is gone is
taken off its volume (its sessions' routes are released with the others).

Before that, routes written before session ids were per tenant are moved under
their tenant's key (:func:`adopt_legacy_routes`), and so are their stored
conversations: each keeps working for its owner, and only for its owner.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from hosting.gateway.conversations import StoredConversations
from hosting.gateway.pool import REFILL_LOCK
from hosting.gateway.provisioning import provisioning_lock
from hosting.gateway.routing.protocols import Locking, Routes, WarmPoolLedger
from hosting.gateway.tenant_scope import SharedSandboxes, volume_lock
from hosting.locks import holding
from hosting.sandboxes.base import Sandbox, SandboxBackend, SandboxError

logger = logging.getLogger("hosting.gateway.reconcile")


class ReconcileStore(Routes, WarmPoolLedger, Locking, Protocol):
    """What reconciliation needs of the routing store: the routes, the pool, and the locks
    of the sandboxes being provisioned or pooled."""


@dataclass
class Reconciled:
    adopted: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)


def _lock_name(sandbox: Sandbox) -> str:
    """The lock held while the sandbox is being made: its session's, its shared volume's, or the pool's."""
    if sandbox.session_id and sandbox.tenant:
        return provisioning_lock(sandbox.tenant, sandbox.session_id)
    if sandbox.tenant:
        return volume_lock(sandbox.tenant, sandbox.volume)
    return REFILL_LOCK


async def reconcile(backend: SandboxBackend, store: ReconcileStore, shared: SharedSandboxes | None = None) -> Reconciled:
    result = Reconciled()
    sandboxes = await backend.list()
    routes = await store.routes()
    pool = await store.pool_entries()
    known = {r.sandbox_id for r in routes if r.sandbox_id} | {e.sandbox.sandbox_id for e in pool}
    if shared is not None:
        known |= {v.sandbox_id for v in await shared.volumes() if v.sandbox_id}
    existing = {s.sandbox_id for s in sandboxes}
    for sandbox in sandboxes:
        if sandbox.sandbox_id in known:
            result.adopted.append(sandbox.sandbox_id)
            continue
        async with holding(store.locks, _lock_name(sandbox), 60) as held:
            if not held:
                continue
            if await _known_now(store, shared, sandbox):
                result.adopted.append(sandbox.sandbox_id)
                continue
            await backend.delete(sandbox.sandbox_id)
            result.removed.append(sandbox.sandbox_id)
    for route in routes:
        if route.sandbox_id and route.sandbox_id not in existing and await store.release(route.key, route.sandbox_id):
            result.released.append(route.sandbox_id)
        elif route.sandbox_id:
            await store.reindex(route)  # counted for its tenant's quota (routes written before quotas)
    for entry in pool:
        if entry.sandbox.sandbox_id not in existing and await store.pool_remove(entry.sandbox.sandbox_id):
            result.released.append(entry.sandbox.sandbox_id)
    if shared is not None:
        result.released += [s for s in await shared.release_lost(existing) if s not in result.released]
    logger.info("reconciled: %d adopted, %d orphans removed, %d lost sandboxes released",
                len(result.adopted), len(result.removed), len(result.released))
    return result


async def adopt_legacy_routes(backend: SandboxBackend, store: Routes,
                              conversations: StoredConversations | None) -> list[str]:
    """Move routes keyed by the session id alone under their tenant's key, copy their
    stored conversations to the tenant's stored id, and retire their sandboxes (started
    before per-sandbox store credentials, they may hold the gateway's): the next turn
    gets a new sandbox on the same volume. The keys of the routes moved."""
    moved = []
    for route in await store.migrate_routes():
        if conversations is not None:
            await conversations.adopt(route.tenant, route.session_id)
        if route.sandbox_id is not None and await store.release(route.key, route.sandbox_id):
            try:
                await backend.delete(route.sandbox_id)
            except SandboxError as exc:
                logger.warning("could not remove sandbox %s of a migrated route: %s", route.sandbox_id, exc)
        moved.append(route.key)
    if moved:
        logger.info("%d routes from before per-tenant session ids moved under their tenants", len(moved))
    return moved


async def _known_now(store: ReconcileStore, shared: SharedSandboxes | None, sandbox: Sandbox) -> bool:
    """Re-read under the lock: a replica may have recorded it since the snapshot (a
    claimed pool sandbox still carries no session on engines that cannot relabel)."""
    if any(route.sandbox_id == sandbox.sandbox_id for route in await store.routes()):
        return True
    if shared is not None and any(v.sandbox_id == sandbox.sandbox_id for v in await shared.volumes()):
        return True
    return any(e.sandbox.sandbox_id == sandbox.sandbox_id for e in await store.pool_entries())
