"""Tenant quotas: live sandboxes, concurrent turns and turns per minute.

Counted in the routing store, so replicas that share Redis share the counts
(in the process with the in-memory store):

- **Live sandboxes** (``max_sandboxes``): sessions of the tenant that have a
  sandbox now, plus provisionings under way. Checked, and the new one counted
  atomically, under the session's provisioning lock *before* a sandbox is
  claimed or started; freed when the sandbox is reaped, replaced or deleted.
- **Concurrent turns** (``max_turns``): a slot is taken when a turn is admitted
  (before anything is provisioned) and held while its stream is relayed; it is
  released when the stream ends, however it ends (``done``, client gone, sandbox
  lost). A slot is refreshed while held and lapses :data:`SLOT_TTL_SECONDS` after
  the last refresh, so the slots of a replica that crashed expire.
- **Turns per minute** (``turns_per_minute``): a sliding window of the last 60 s.

A turn refused for any reason (a quota, a 409 from the sandbox, no sandbox, the
store down) is not counted: what it took is given back. A limit of 0 means
unlimited.

When Redis cannot be reached, turns on sessions this replica knows still run
(see :class:`~hosting.gateway.routing.redis.RedisRoutingStore`): their turn quotas are
then counted in this replica's memory, so each replica still enforces the limits
on its own until Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

from hosting.errors import ErrorCode, HostingError
from hosting.gateway.routing.memory import MemoryRoutingStore
from hosting.gateway.routing.protocols import RateWindows, RoutingStoreUnavailable, SandboxReservations, TurnSlots

logger = logging.getLogger("hosting.gateway.quotas")

SLOT_TTL_SECONDS = 60.0
"""A concurrent-turn slot lapses this long after its last refresh (a crashed replica's)."""
RATE_WINDOW_SECONDS = 60.0
CONCURRENT_RETRY_AFTER_SECONDS = 5
"""Turns end at their own pace: suggest trying again soon."""
SANDBOX_RETRY_AFTER_SECONDS = 30
"""Sandboxes are freed by deleting a session or by the idle reaper: not within seconds."""


class TurnCounters(TurnSlots, RateWindows, Protocol):
    """Where a tenant's turns are counted: its running turns (slots), its recent ones (a window)."""


class QuotaCounters(TurnCounters, SandboxReservations, Protocol):
    """What the quotas count in: a tenant's turns, and its sandboxes."""


@dataclass(frozen=True)
class TenantLimits:
    """One tenant's limits; 0 = unlimited."""

    max_sandboxes: int = 50
    max_turns: int = 25
    turns_per_minute: int = 120

    def with_overrides(self, overrides: Mapping[str, int]) -> TenantLimits:
        return replace(self, **overrides)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class QuotaExceeded(HostingError):
    """A tenant quota is reached (HTTP 429 with ``Retry-After``)."""

    code = ErrorCode.OVER_QUOTA
    retry_after: int

    def __init__(self, quota: str, limit: int, retry_after_seconds: float) -> None:
        super().__init__(f"tenant quota exceeded: {quota} ({limit})")
        self.quota = quota
        self.limit = limit
        self.retry_after = max(1, math.ceil(retry_after_seconds))


class TurnPermit:
    """What an admitted turn holds: its concurrent-turn slot and its count in the window."""

    def __init__(self, store: TurnCounters, tenant: str, slot: str | None, rate: str | None,
                 slot_ttl_seconds: float) -> None:
        self._store = store
        self.tenant = tenant
        self._slot = slot
        self._rate = rate
        self._ttl = slot_ttl_seconds

    @property
    def holds_slot(self) -> bool:
        """Whether there is a slot to keep alive (none without a concurrent-turns limit)."""
        return self._slot is not None

    async def keep_alive(self) -> None:
        """Refresh the slot until cancelled (while the turn's stream is relayed)."""
        while self._slot is not None:
            await asyncio.sleep(self._ttl / 3)
            slot = self._slot
            if slot is None:  # released meanwhile
                return
            try:
                await self._store.refresh_slot(_turns(self.tenant), slot, self._ttl)
            except RoutingStoreUnavailable:
                logger.warning("tenant %s: could not refresh a turn slot (routing store down)", self.tenant)

    async def release(self) -> None:
        """The turn ended: free its slot (it stays counted in the window)."""
        slot, self._slot = self._slot, None
        if slot is not None:
            try:
                await self._store.release_slot(_turns(self.tenant), slot)
            except RoutingStoreUnavailable:
                logger.warning("tenant %s: could not free a turn slot; it lapses in %.0f s", self.tenant, self._ttl)

    async def refund(self) -> None:
        """The turn was refused after all: uncount it entirely."""
        await self.release()
        rate, self._rate = self._rate, None
        if rate is not None:
            try:
                await self._store.refund_rate(_rate(self.tenant), rate)
            except RoutingStoreUnavailable:
                logger.warning("tenant %s: could not uncount a refused turn (routing store down)", self.tenant)


def _turns(tenant: str) -> str:
    return f"turns:{tenant}"


def _rate(tenant: str) -> str:
    return f"rate:{tenant}"


class Quotas:
    """The gateway's quota checks, over the routing store's counters."""

    def __init__(self, store: QuotaCounters, defaults: TenantLimits,
                 overrides: Mapping[str, Mapping[str, int]] | None = None, *,
                 reservation_ttl_seconds: float = 130.0, slot_ttl_seconds: float = SLOT_TTL_SECONDS,
                 window_seconds: float = RATE_WINDOW_SECONDS) -> None:
        self._store = store
        self._fallback: TurnCounters = MemoryRoutingStore()
        self.defaults = defaults
        self._overrides = {tenant: defaults.with_overrides(limits) for tenant, limits in (overrides or {}).items()}
        self._reservation_ttl = reservation_ttl_seconds
        self._slot_ttl = slot_ttl_seconds
        self._window = window_seconds

    def limits(self, tenant: str) -> TenantLimits:
        return self._overrides.get(tenant, self.defaults)

    async def admit_turn(self, tenant: str) -> TurnPermit:
        """Take a concurrent-turn slot and count the turn in the window, or raise
        :class:`QuotaExceeded` having taken nothing. Counted in this replica's memory
        while the routing store is down."""
        try:
            return await self._admit(self._store, tenant)
        except RoutingStoreUnavailable:
            logger.warning("tenant %s: routing store down, counting the turn in this replica only", tenant)
            return await self._admit(self._fallback, tenant)

    async def _admit(self, store: TurnCounters, tenant: str) -> TurnPermit:
        limits = self.limits(tenant)
        slot = rate = None
        if limits.max_turns:
            slot = await store.take_slot(_turns(tenant), limits.max_turns, self._slot_ttl)
            if slot is None:
                raise QuotaExceeded("concurrent turns", limits.max_turns, CONCURRENT_RETRY_AFTER_SECONDS)
        permit = TurnPermit(store, tenant, slot, None, self._slot_ttl)
        if limits.turns_per_minute:
            try:
                rate, wait = await store.take_rate(_rate(tenant), limits.turns_per_minute, self._window)
            except BaseException:
                await permit.refund()
                raise
            if rate is None:
                await permit.refund()
                raise QuotaExceeded("turns per minute", limits.turns_per_minute, wait)
        return TurnPermit(store, tenant, slot, rate, self._slot_ttl)

    async def reserve_sandbox(self, tenant: str, session_id: str) -> bool:
        """Count a sandbox about to be provisioned for the session, or raise
        :class:`QuotaExceeded`. ``True`` if a reservation was made (cancel it with
        :meth:`cancel_sandbox` if provisioning fails); ``False`` when unlimited."""
        limit = self.limits(tenant).max_sandboxes
        if not limit:
            return False
        if not await self._store.reserve_sandbox(tenant, session_id, limit, self._reservation_ttl):
            raise QuotaExceeded("live sandboxes", limit, SANDBOX_RETRY_AFTER_SECONDS)
        return True

    async def cancel_sandbox(self, tenant: str, session_id: str) -> None:
        try:
            await self._store.cancel_sandbox_reservation(tenant, session_id)
        except RoutingStoreUnavailable:
            logger.warning("session %s: could not cancel its sandbox reservation; it lapses", session_id)

    async def usage(self, tenant: str) -> dict[str, Any]:
        """The tenant's limits and what counts against them now (the routing store's counts)."""
        return {"tenant": tenant, "limits": self.limits(tenant).as_dict(), "usage": {
            "sandboxes": await self._store.count_sandboxes(tenant),
            "turns": await self._store.count_slots(_turns(tenant)),
            "turns_last_minute": await self._store.count_rate(_rate(tenant), self._window),
        }}
