"""A gateway's start and stop: reconcile with the backend, run the background loops, close.

At start the routing store and the backend may disagree (a replica crashed, routes of an
older layout): they are reconciled before the first request, best effort, since a
gateway that cannot reach its store still answers ``/health`` and says why on ``/ready``.
At stop the loops end first, then every connection closes; with an in-memory store the
sandboxes go too, as nothing else could find them again, by the shutdown deadline if one
was set (:meth:`hosting.gateway.relay.Relay.cut_streams`): what is left then goes with the
gateway (local sandboxes are its children) or is an orphan the next start removes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from hosting.gateway.conversations import CredentialedBackend
from hosting.gateway.reconcile import adopt_legacy_routes, reconcile
from hosting.gateway.routing.memory import MemoryRoutingStore
from hosting.gateway.routing.protocols import RoutingStoreUnavailable
from hosting.gateway.services import GatewayServices
from hosting.sandboxes.base import SandboxBackend, SandboxError

logger = logging.getLogger("hosting.gateway")


@asynccontextmanager
async def running(services: GatewayServices) -> AsyncIterator[None]:
    """The gateway's lifespan: reconciled and its loops (warm pool, reaper, retention)
    running inside; everything stopped and closed after."""
    backend, store = services.backend, services.store
    try:
        if isinstance(backend, CredentialedBackend):
            await backend.prepare()
        await adopt_legacy_routes(backend, store, services.conversations)
        await reconcile(backend, store, services.shared)
        if isinstance(backend, CredentialedBackend):
            await backend.remove_orphan_credentials()
    except (RoutingStoreUnavailable, SandboxError, ConnectionError) as exc:
        logger.warning("could not reconcile sandboxes at start-up: %s", exc)
    tasks = [asyncio.create_task(services.pool.run(), name="warm-pool"),
             asyncio.create_task(services.reaper.run(), name="reaper"),
             asyncio.create_task(services.retention.run(), name="retention")]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if isinstance(store, MemoryRoutingStore):
            stop_by = services.relay.stop_by
            try:
                async with asyncio.timeout_at(stop_by):
                    await _remove_everything(services)
            except TimeoutError:
                logger.warning("shutdown deadline: sandboxes still being removed are left to the next start")
        await services.relay.aclose()
        await services.budgets.drain()
        await store.aclose()
        await backend.aclose()
        if services.conversations is not None:
            await services.conversations.aclose()
        services.telemetry.shutdown()


async def _remove_everything(services: GatewayServices) -> None:
    """With an in-memory store nothing could find these sandboxes again: remove them.
    Session volumes stay on disk (a restarted gateway does not know them either)."""
    await services.pool.drain()
    sandbox_ids = {route.sandbox_id for route in await services.store.routes() if route.sandbox_id is not None}
    if services.shared is not None:
        sandbox_ids |= {v.sandbox_id for v in await services.shared.volumes() if v.sandbox_id is not None}
    await asyncio.gather(*(_delete(services.backend, sandbox_id) for sandbox_id in sandbox_ids))


async def _delete(backend: SandboxBackend, sandbox_id: str) -> None:
    with contextlib.suppress(SandboxError):
        await backend.delete(sandbox_id)
