"""The warm pool: sandboxes started ahead so a new session's first turn skips the start.

One replica refills at a time (a lock in the routing store), one sandbox at a
time, and counts what the store holds, so replicas sharing a store never grow
the pool past its target. A sandbox enters the pool only once it is ready, and
leaves it through an atomic take (a claim) or remove (teardown), so it is
handed out at most once and never while being torn down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from hosting.gateway.cleanup import shielded
from hosting.gateway.provisioning import Provisioner, ProvisioningFailed, new_spec
from hosting.gateway.routing.protocols import Locking, RoutingStoreUnavailable, WarmPoolLedger
from hosting.gateway.routing.records import PoolEntry
from hosting.locks import holding
from hosting.sandboxes.base import Sandbox, SandboxBackend, SandboxError

logger = logging.getLogger("hosting.gateway.pool")

WARM_TIMEOUT_SECONDS = 60.0
"""How long a new pooled sandbox may take to pre-start its CLI before it is pooled anyway."""
REFILL_CHECK_SECONDS = 5.0
"""How often the pool looks at its size when nothing woke it (another replica's claims)."""
REFILL_LOCK = "pool-refill"
"""The lock one replica holds while it refills the pool."""


class PoolStore(WarmPoolLedger, Locking, Protocol):
    """What the warm pool needs of the routing store: its ledger, and the refill lock."""


class WarmPool:
    """Keeps ``target`` ready, unclaimed sandboxes."""

    def __init__(self, backend: SandboxBackend, store: PoolStore, provisioner: Provisioner,
                 sandbox_env: Mapping[str, str], target: int, lock_seconds: float, wake: asyncio.Event) -> None:
        self._backend = backend
        self._store = store
        self._provisioner = provisioner
        self._env = sandbox_env
        self.target = target
        self._lock_seconds = lock_seconds
        self._wake = wake
        self.starting = 0

    async def run(self) -> None:
        """Refill whenever woken (a claim) or every few seconds, until cancelled."""
        backoff = 1.0
        while True:
            try:
                await self.refill()
                backoff = 1.0
            except (ProvisioningFailed, RoutingStoreUnavailable) as exc:
                logger.warning("warm pool: could not refill (%s); retrying in %.0f s", exc, backoff)
                await asyncio.sleep(backoff)
                # A store outage is retried often (cheap, and the pool should be back soon after).
                backoff = min(backoff * 2, 5.0 if isinstance(exc, RoutingStoreUnavailable) else 60.0)
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), REFILL_CHECK_SECONDS)
            except TimeoutError:
                pass

    async def refill(self) -> int:
        """Start sandboxes until the pool holds ``target``; how many were added."""
        if self.target == 0:
            return 0
        async with holding(self._store.locks, REFILL_LOCK, self._lock_seconds) as held:
            if not held:
                return 0
            added = 0
            while len(await self._store.pool_entries()) < self.target:
                spec = new_spec(self._env)
                self.starting += 1
                try:
                    sandbox = await self._provisioner.start(spec)
                    try:
                        if not await self._backend.wait_warm(sandbox, spec.token, WARM_TIMEOUT_SECONDS):
                            logger.warning("pooled sandbox %s has no pre-started CLI yet: pooling it anyway",
                                           sandbox.sandbox_id)
                        await self._store.pool_put(PoolEntry(sandbox, spec.token))
                    except BaseException:
                        # Not pooled (a store error, or the gateway stopping meanwhile), so nobody
                        # could claim or find it: remove it now, even while being cancelled.
                        await shielded(self._discard(sandbox))
                        raise
                finally:
                    self.starting -= 1
                added += 1
            return added

    async def _discard(self, sandbox: Sandbox) -> None:
        with contextlib.suppress(SandboxError):
            await self._backend.delete(sandbox.sandbox_id)
            await self._backend.delete_volume(sandbox.volume)

    async def drain(self) -> None:
        """Remove every pooled sandbox and its volume (at shutdown, when nothing else
        could claim them later)."""
        for entry in await self._store.pool_entries():
            if await self._store.pool_remove(entry.sandbox.sandbox_id):
                await self._backend.delete(entry.sandbox.sandbox_id)
                await self._backend.delete_volume(entry.sandbox.volume)

    async def status(self) -> dict[str, Any]:
        entries = await self._store.pool_entries()
        return {"target": self.target, "ready": len(entries), "starting_here": self.starting,
                "sandboxes": [entry.sandbox.sandbox_id for entry in entries]}
