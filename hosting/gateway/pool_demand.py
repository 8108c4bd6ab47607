"""How many sandboxes the warm pool should hold: as many as were claimed lately, within bounds.

Each new session's claim on the pool is counted in the routing store's window of claims,
whether or not it found a sandbox there, so every replica sharing the store (Redis, on
its clock) counts the same claims and computes the same target: the claims of the last
:data:`DEMAND_WINDOW_SECONDS`, never below the floor (``GATEWAY_WARM_POOL``) nor above the
ceiling (``GATEWAY_WARM_POOL_MAX``). A burst of new sessions grows the pool for the next
one; when claims stop they leave the window, and the target falls back to the floor.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from hosting.gateway.routing.protocols import RateWindows

DEMAND_WINDOW_SECONDS = 120.0
"""How long a claim counts towards the target. Long enough that a second burst a minute
after the first finds the pool grown by it; short enough that a pool nobody claims from is
back at its floor two minutes after the last claim (plus one refill check)."""
CLAIMS_WINDOW = "pool-claims"
"""The rate window (in the routing store) of the claims on the pool."""

TargetCause = Literal["floor", "demand", "max"]
"""Why the target is what it is: few claims (the floor), the claims themselves, or more
claims than the ceiling allows. A bounded set, so it can label a metric."""


@dataclass(frozen=True)
class PoolSizing:
    """The warm pool's bounds, and how many sandboxes it starts at once."""

    floor: int = 2
    """Ready sandboxes kept however few claims there are (``GATEWAY_WARM_POOL``)."""
    ceiling: int = 10
    """The most it grows to with demand (``GATEWAY_WARM_POOL_MAX``); 0: no pool."""
    start_concurrency: int = 2
    """Sandboxes a refill starts at once (``GATEWAY_POOL_START_CONCURRENCY``, at least 1)."""


@dataclass(frozen=True)
class PoolTarget:
    """How many ready sandboxes the pool should hold now, and why."""

    size: int
    cause: TargetCause
    claims: int
    """Claims counted in the window."""
    window_seconds: float

    @property
    def reason(self) -> str:
        """For people: ``"5 claims in the last 120 s"``, with ``floor`` or ``capped at max`` before it."""
        recent = f"{self.claims} claim{'' if self.claims == 1 else 's'} in the last {self.window_seconds:g} s"
        return {"floor": f"floor ({recent})", "demand": recent, "max": f"capped at max ({recent})"}[self.cause]


def pool_target(claims: int, sizing: PoolSizing, window_seconds: float = DEMAND_WINDOW_SECONDS) -> PoolTarget:
    """The target for ``claims`` claims in the last ``window_seconds``: one ready sandbox per
    claim, clamped to the sizing's floor and ceiling."""
    if claims > sizing.ceiling:
        return PoolTarget(sizing.ceiling, "max", claims, window_seconds)
    if claims > sizing.floor:
        return PoolTarget(claims, "demand", claims, window_seconds)
    return PoolTarget(sizing.floor, "floor", claims, window_seconds)


class PoolDemand:
    """The claims on an installation's pool, counted where every replica sees them, and
    the target they give (:func:`pool_target`)."""

    def __init__(self, store: RateWindows, sizing: PoolSizing, window_seconds: float = DEMAND_WINDOW_SECONDS) -> None:
        self._store = store
        self.sizing = sizing
        self.window_seconds = window_seconds
        self.changed = asyncio.Event()
        """Set when this replica's claims changed the pool (one taken, or the target grown),
        so this replica's pool looks at once rather than at its next check."""

    async def record_claim(self) -> None:
        """Count one new session's claim on the pool. Called before anything is taken,
        so a store error here leaves nothing taken."""
        await self._store.record_rate(CLAIMS_WINDOW, self.window_seconds)
        self.changed.set()

    async def target(self) -> PoolTarget:
        return pool_target(await self._store.count_rate(CLAIMS_WINDOW, self.window_seconds), self.sizing,
                           self.window_seconds)
