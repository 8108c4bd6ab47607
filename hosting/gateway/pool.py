"""The warm pool: sandboxes started ahead so a new session's first turn skips the start.

Its target follows the recent claims on it (:mod:`hosting.gateway.pool_demand`), the same
on every replica. One replica refills at a time (a lock in the routing store), starting a
few sandboxes at once, and counts what the store holds, so replicas sharing a store never
grow the pool past its current target; when the target falls, the surplus is removed,
oldest first. A sandbox enters the pool only once it is ready, and leaves it through an
atomic take (a claim) or remove (surplus, teardown), so it is handed out at most once and
never removed while or after it is claimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from hosting.gateway.cleanup import shielded
from hosting.gateway.pool_demand import PoolDemand
from hosting.gateway.provisioning import Provisioner, ProvisioningFailed, new_spec
from hosting.gateway.routing.protocols import Locking, RoutingStoreUnavailable, WarmPoolLedger
from hosting.gateway.routing.records import PoolEntry
from hosting.locks import holding
from hosting.sandboxes.base import Sandbox, SandboxBackend, SandboxError

logger = logging.getLogger("hosting.gateway.pool")

WARM_TIMEOUT_SECONDS = 60.0
"""How long a new pooled sandbox may take to pre-start its CLI before it is pooled anyway."""
REFILL_CHECK_SECONDS = 5.0
"""How often the pool looks at its size and target when nothing woke it (another replica's
claims, or claims leaving the window)."""
REFILL_LOCK = "pool-refill"
"""The lock one replica holds while it trims the pool or starts a wave of sandboxes for it."""


class PoolStore(WarmPoolLedger, Locking, Protocol):
    """What the warm pool needs of the routing store: its ledger, and the refill lock."""


class WarmPool:
    """Keeps as many ready, unclaimed sandboxes as its demand's current target."""

    def __init__(self, backend: SandboxBackend, store: PoolStore, provisioner: Provisioner,
                 sandbox_env: Mapping[str, str], demand: PoolDemand, lock_seconds: float,
                 session_capacity: int = 1) -> None:
        self._backend = backend
        self._store = store
        self._provisioner = provisioner
        self._env = sandbox_env
        self._demand = demand
        self._session_capacity = session_capacity
        """Sessions each pooled sandbox will hold: more than one in tenant scope."""
        self._lock_seconds = lock_seconds
        """How long the refill lock is held at most: longer than one sandbox's start."""
        self._pooling = asyncio.Lock()
        self.starting = 0

    async def run(self) -> None:
        """Refill whenever woken (a claim here) or every few seconds, until cancelled."""
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
            self._demand.changed.clear()
            try:
                await asyncio.wait_for(self._demand.changed.wait(), REFILL_CHECK_SECONDS)
            except TimeoutError:
                pass

    async def refill(self) -> int:
        """Bring the pool to its current target: the surplus removed, oldest first, or the
        missing sandboxes started, ``start_concurrency`` at a time; how many were added.

        Each wave of starts holds the refill lock (so the lock need outlive one start
        only), and between waves the target is read again: a target that fell stops the
        refill, and a sandbox that finds it fell once started is removed, not pooled."""
        if self._demand.sizing.ceiling == 0:
            return 0
        added = 0
        while True:
            async with holding(self._store.locks, REFILL_LOCK, self._lock_seconds) as held:
                if not held:
                    return added
                wave = await self._trim_and_plan()
                if wave == 0:
                    return added
                outcomes = await asyncio.gather(*(self._add_one() for _ in range(wave)), return_exceptions=True)
            added += sum(outcome is True for outcome in outcomes)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome

    async def _trim_and_plan(self) -> int:
        """Remove the pool's surplus over its target, oldest first; how many to start now."""
        target = await self._demand.target()
        entries = await self._store.pool_entries()
        if len(entries) > target.size:
            logger.info("warm pool: %d ready, target %d (%s): removing the oldest", len(entries), target.size,
                        target.reason)
        while len(entries) > target.size:
            oldest = min(entries, key=lambda entry: entry.sandbox.created_at)
            # Removed only if nobody claimed it meanwhile (the take and the remove are atomic).
            if await self._store.pool_remove(oldest.sandbox.sandbox_id):
                await self._discard(oldest.sandbox)
            entries = await self._store.pool_entries()
        return min(target.size - len(entries), self._demand.sizing.start_concurrency)

    async def _add_one(self) -> bool:
        """Start a sandbox and pool it once ready, if the pool is still below its target
        then (else remove it); whether it was pooled."""
        spec = new_spec(self._env, session_capacity=self._session_capacity)
        self.starting += 1
        offered: list[bool] = []  # set once its entry is being put in the pool
        try:
            sandbox = await self._provisioner.start(spec)
            try:
                if not await self._backend.wait_warm(sandbox, spec.token, WARM_TIMEOUT_SECONDS):
                    logger.warning("pooled sandbox %s has no pre-started CLI yet: pooling it anyway",
                                   sandbox.sandbox_id)
                pooled = await self._pool_below_target(PoolEntry(sandbox, spec.token), offered)
            except BaseException:
                # A store error, or the gateway stopping meanwhile: remove it now, even while
                # being cancelled, unless its entry got into the pool and was claimed since.
                await shielded(self._withdraw(sandbox, bool(offered)))
                raise
        finally:
            self.starting -= 1
        if not pooled:
            logger.info("warm pool: its target fell while sandbox %s started: removing it", sandbox.sandbox_id)
            await self._discard(sandbox)
        return pooled

    async def _pool_below_target(self, entry: PoolEntry, offered: list[bool]) -> bool:
        # One at a time here (only the lock's holder pools, and claims only take away), so
        # two starts finishing together cannot both fill the last place.
        async with self._pooling:
            if len(await self._store.pool_entries()) >= (await self._demand.target()).size:
                return False
            offered.append(True)
            await self._store.pool_put(entry)
            return True

    async def _withdraw(self, sandbox: Sandbox, offered: bool) -> None:
        """Remove a sandbox whose pooling was cut short: taken back out of the pool first if
        its entry may be there (an atomic remove, so a claimed one is left to its session)."""
        if offered:
            try:
                if not await self._store.pool_remove(sandbox.sandbox_id):
                    return  # claimed meanwhile, or never put (then reconciliation finds it)
            except RoutingStoreUnavailable:
                return
        await self._discard(sandbox)

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
        """The target (with its bounds and why: ``cause`` is one of a few words, ``reason``
        a sentence) and what the pool holds."""
        target = await self._demand.target()
        entries = await self._store.pool_entries()
        sizing = self._demand.sizing
        return {"target": target.size, "floor": sizing.floor, "max": sizing.ceiling, "cause": target.cause,
                "reason": target.reason, "claims": target.claims, "window_seconds": target.window_seconds,
                "start_concurrency": sizing.start_concurrency, "ready": len(entries), "starting_here": self.starting,
                "sandboxes": [entry.sandbox.sandbox_id for entry in entries]}
