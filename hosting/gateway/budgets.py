"""Tenant spending budgets: model tokens per UTC day, US dollars per UTC calendar month.

What a tenant spends is what its turns' ``result`` events report, counted in a
:class:`BudgetLedger` beside the routes (Redis shared by the replicas, or this process's
memory), so every replica refuses a tenant whose budget is spent:

- **Tokens**: the sum of the token kinds in the turn's ``usage`` (input, output, cache
  creation, cache read), which are the turn's own.
- **Dollars**: ``total_cost_usd`` is *not* the turn's own cost but the session's running
  total: the Claude Code CLI reports the cost of its ``query()`` so far, cumulative across
  the turns a warm CLI serves, and a resumed session continues from the total its
  transcript saved (seen with warm CLIs and with a CLI per turn alike). So a turn
  costs its total minus the last total seen for the same session, which the ledger keeps
  per (tenant, session) for :data:`SESSION_COST_TTL_SECONDS`; a total below the last (the
  CLI's running total was reset: ``/clear``, a transcript without one) counts whole, and so
  does the first total seen of a session (a session older than the ledger's memory of it
  is charged its whole history once).

- **When it is counted.** As the turn's ``result`` event is relayed (the relay reads a
  turn's stream to its end even when its client has gone, so a turn whose client left is
  charged too). For a tenant with a budget, the turn's last event (``done``) goes out only
  once its spend is recorded, so a client's next turn is checked against it.
- **When it is checked.** Once the turn is admitted by the quotas (and before anything is
  provisioned): a tenant whose spend in the current window has reached a budget gets
  ``429`` with ``Retry-After`` (seconds until that window ends) and, e.g.,
  ``tenant budget exhausted: tokens per day (1000000)``; its quota permit is given back.
- **Overrun.** A turn that starts within budget runs to its end, and its spend is only
  known at its ``result``: a budget can be overrun by what the turns running when it runs
  out spend (at most ``max_turns`` of them; the server's ``AGENT_MAX_BUDGET_USD`` caps each,
  give or take the model call that crosses it).
- **Windows** are the UTC day and the UTC calendar month on the ledger's clock: Redis's
  own (``TIME`` inside the scripts), so replicas' clocks need not agree. A window's
  counter expires when the window ends.
- **Not counted.** ``POST /runtime/advance`` is checked like any turn but not charged:
  its answer (``text`` and ``state``) carries no usage (its cost is in the session's running
  total, so it is charged with the session's next streamed turn, if any). While Redis cannot
  be reached, turns are not refused for a budget and what they spend is not counted (both
  logged).

A budget of 0 means unlimited (the default).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import redis.asyncio as aioredis

from hosting.errors import ErrorCode, HostingError
from hosting.gateway.cleanup import shielded
from hosting.gateway.quotas import TurnPermit
from hosting.gateway.routing.protocols import RoutingStore, RoutingStoreUnavailable
from hosting.gateway.routing.redis import RedisRoutingStore, or_unavailable

logger = logging.getLogger("hosting.gateway.budgets")

SESSION_COST_TTL_SECONDS = 40 * 24 * 3600
"""How long the ledger remembers a session's last reported running cost (past the server's
default session TTL of 30 days, so a session is charged its history at most once)."""

USAGE_TOKEN_KINDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
"""The token counts of a ``result`` event's ``usage`` that a turn spends (all of them)."""


@dataclass(frozen=True)
class TenantBudget:
    """One tenant's budgets; 0 = unlimited."""

    tokens_per_day: int = 0
    usd_per_month: float = 0.0

    @property
    def limited(self) -> bool:
        return bool(self.tokens_per_day or self.usd_per_month)

    def with_overrides(self, overrides: Mapping[str, float]) -> TenantBudget:
        changes: dict[str, Any] = dict(overrides)
        if "tokens_per_day" in changes:
            changes["tokens_per_day"] = int(changes["tokens_per_day"])
        return replace(self, **changes)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class BudgetExhausted(HostingError):
    """A tenant budget is spent for its current window (HTTP 429 with ``Retry-After``)."""

    code = ErrorCode.OVER_BUDGET
    retry_after: int

    def __init__(self, budget: str, limit: float, retry_after_seconds: float) -> None:
        super().__init__(f"tenant budget exhausted: {budget} ({limit})")
        self.budget = budget
        self.limit = limit
        self.retry_after = max(1, math.ceil(retry_after_seconds))


@dataclass(frozen=True)
class Reported:
    """What a turn's ``result`` event reports: the turn's tokens and its session's running cost."""

    tokens: int = 0
    session_cost_usd: float = 0.0

    @classmethod
    def of_result(cls, payload: object) -> Reported:
        """From a ``result`` event's data; what is missing or malformed counts as nothing."""
        if not isinstance(payload, Mapping):
            return cls()
        usage = payload.get("usage")
        tokens = 0
        if isinstance(usage, Mapping):
            for kind in USAGE_TOKEN_KINDS:
                count = usage.get(kind)
                if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                    tokens += count
        cost = payload.get("total_cost_usd")
        usd = float(cost) if isinstance(cost, int | float) and not isinstance(cost, bool) else 0.0
        return cls(tokens, usd if math.isfinite(usd) and usd > 0 else 0.0)

    def __bool__(self) -> bool:
        return self.tokens > 0 or self.session_cost_usd > 0


@dataclass(frozen=True)
class Spend:
    """What one turn spent (what the ledger added)."""

    tokens: int = 0
    usd: float = 0.0


def turn_cost(session_cost_usd: float, last_seen: float | None) -> float:
    """A turn's cost from its session's running total and the previous one seen."""
    if last_seen is None or session_cost_usd < last_seen:
        return session_cost_usd
    return session_cost_usd - last_seen


@dataclass(frozen=True)
class Spent:
    """A tenant's spend in the windows current at ``now`` (epoch seconds, the ledger's clock)."""

    now: float
    tokens: int
    """Tokens spent in the UTC day ``day`` (``YYYY-MM-DD``), which ends at ``day_ends``."""
    usd: float
    """Dollars spent in the UTC month ``month`` (``YYYY-MM``), which ends at ``month_ends``."""
    day: str
    day_ends: float
    month: str
    month_ends: float


def utc_windows(now: float) -> tuple[str, float, str, float]:
    """The UTC day and month around ``now``: ``(day, day_ends, month, month_ends)``
    (labels ``YYYY-MM-DD`` and ``YYYY-MM``, ends in epoch seconds)."""
    moment = datetime.fromtimestamp(math.floor(now), UTC)
    day = datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
    next_month = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    return (day.strftime("%Y-%m-%d"), (day + timedelta(days=1)).timestamp(),
            moment.strftime("%Y-%m"), next_month.timestamp())


class BudgetLedger(abc.ABC):
    """Where tenants' spend is counted, per window. The cut-off: the ledger charges turns
    (tokens to the current UTC day; the cost, from the session's running total, to the
    current UTC month) and reads what the current windows hold, on its own clock; limits
    and refusals are :class:`Budgets`' business.

    Both methods raise :class:`~hosting.gateway.routing.protocols.RoutingStoreUnavailable` when the
    store cannot be reached, having changed nothing."""

    @abc.abstractmethod
    async def add(self, tenant: str, session_id: str, reported: Reported) -> Spend:
        """Charge a turn of the tenant's session, atomically: its tokens to the current day,
        its cost (:func:`turn_cost` of the session's running total) to the current month.
        What was added."""

    @abc.abstractmethod
    async def spent(self, tenant: str) -> Spent:
        """The tenant's spend in the current windows, and when they end."""


class MemoryBudgetLedger(BudgetLedger):
    """In this process (with the in-memory routing store: one replica). ``clock`` gives
    epoch seconds (tests move it across midnight)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._tokens: dict[str, tuple[str, int]] = {}  # tenant -> (day, tokens)
        self._usd: dict[str, tuple[str, float]] = {}  # tenant -> (month, dollars)
        self._sessions: dict[tuple[str, str], tuple[float, float]] = {}  # -> (running cost, when it expires)

    async def add(self, tenant: str, session_id: str, reported: Reported) -> Spend:
        now = self._clock()
        day, _, month, _ = utc_windows(now)
        usd = 0.0
        if reported.session_cost_usd:
            last, expires = self._sessions.get((tenant, session_id), (0.0, 0.0))
            usd = turn_cost(reported.session_cost_usd, last if expires > now else None)
            self._sessions[(tenant, session_id)] = (reported.session_cost_usd, now + SESSION_COST_TTL_SECONDS)
        spend = Spend(reported.tokens, usd)
        if spend.tokens:
            counted_day, tokens = self._tokens.get(tenant, (day, 0))
            self._tokens[tenant] = (day, spend.tokens + (tokens if counted_day == day else 0))
        if spend.usd:
            counted_month, dollars = self._usd.get(tenant, (month, 0.0))
            self._usd[tenant] = (month, spend.usd + (dollars if counted_month == month else 0.0))
        return spend

    async def spent(self, tenant: str) -> Spent:
        now = self._clock()
        day, day_ends, month, month_ends = utc_windows(now)
        counted_day, tokens = self._tokens.get(tenant, (day, 0))
        counted_month, usd = self._usd.get(tenant, (month, 0.0))
        return Spent(now, tokens if counted_day == day else 0, usd if counted_month == month else 0.0,
                     day, day_ends, month, month_ends)


# The civil calendar from a day number (days since 1970-01-01) and back, for Lua in Redis,
# which has no os.date: Howard Hinnant's algorithms (chrono-compatible low-level date
# algorithms), with floor division, exact for any date a clock will show.
_CALENDAR = """
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end
local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp + 3
  if mp >= 10 then m = mp - 9 end
  if m <= 2 then return yoe + era * 400 + 1, m, d end
  return yoe + era * 400, m, d
end
local function windows(secs)
  local day = math.floor(secs / 86400)
  local y, m, d = civil_from_days(day)
  local ny, nm = y, m + 1
  if nm > 12 then ny, nm = y + 1, 1 end
  return string.format('%04d-%02d-%02d', y, m, d), string.format('%d', (day + 1) * 86400),
         string.format('%04d-%02d', y, m), string.format('%d', days_from_civil(ny, nm, 1) * 86400)
end
"""

# KEYS: the tenant's tokens-per-day and usd-per-month hashes ({window, spent}), [the session's running cost].
_NOW = (_CALENDAR + "local t = redis.call('TIME') "
        "local day, day_ends, month, month_ends = windows(tonumber(t[1])) ")

# ARGV: the turn's tokens, its session's running cost, how long to remember that. Returns the turn's cost.
_ADD = _NOW + """
local function add(key, window, ends, command, amount)
  if redis.call('HGET', key, 'window') ~= window then
    redis.call('DEL', key)
    redis.call('HSET', key, 'window', window)
  end
  redis.call(command, key, 'spent', amount)
  redis.call('EXPIREAT', key, ends)
end
local usd = 0
local total = tonumber(ARGV[2])
if total > 0 then
  local last = tonumber(redis.call('GET', KEYS[3]))
  if last == nil or total < last then usd = total else usd = total - last end
  redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[3])
end
if tonumber(ARGV[1]) > 0 then add(KEYS[1], day, day_ends, 'HINCRBY', ARGV[1]) end
if usd > 0 then add(KEYS[2], month, month_ends, 'HINCRBYFLOAT', string.format('%.17g', usd)) end
return string.format('%.17g', usd)
"""

_SPENT = _NOW + """
local function spent(key, window)
  local found = redis.call('HMGET', key, 'window', 'spent')
  if found[1] == window and found[2] then return found[2] end
  return '0'
end
return {t[1] .. '.' .. string.format('%06d', tonumber(t[2])), spent(KEYS[1], day), spent(KEYS[2], month),
        day, day_ends, month, month_ends}
"""


class RedisBudgetLedger(BudgetLedger):
    """In Redis, on the routing store's connection: per tenant, a hash for the current day's
    tokens (``<prefix>budget:tokens_per_day:<tenant>``) and one for the current month's
    dollars (``<prefix>budget:usd_per_month:<tenant>``), each ``{window, spent}`` and
    expiring when its window ends; and per session the last running cost it reported
    (``<prefix>budget:session_cost:<tenant>/<session id>``, for :data:`SESSION_COST_TTL_SECONDS`).
    Windows come from Redis's ``TIME``, inside the scripts that add and read, so every
    replica agrees on them whatever its own clock says."""

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self._prefix = prefix
        self._add = redis.register_script(_ADD)
        self._spent = redis.register_script(_SPENT)

    def keys(self, tenant: str) -> list[str]:
        """The tenant's two counters: tokens this day, dollars this month."""
        return [f"{self._prefix}budget:tokens_per_day:{tenant}", f"{self._prefix}budget:usd_per_month:{tenant}"]

    def session_key(self, tenant: str, session_id: str) -> str:
        """The last running cost reported for the tenant's session."""
        return f"{self._prefix}budget:session_cost:{tenant}/{session_id}"

    async def add(self, tenant: str, session_id: str, reported: Reported) -> Spend:
        usd = await or_unavailable(self._add(keys=[*self.keys(tenant), self.session_key(tenant, session_id)],
                                              args=[reported.tokens, repr(reported.session_cost_usd),
                                                    SESSION_COST_TTL_SECONDS]))
        return Spend(reported.tokens, float(usd))

    async def spent(self, tenant: str) -> Spent:
        now, tokens, usd, day, day_ends, month, month_ends = await or_unavailable(self._spent(keys=self.keys(tenant)))
        return Spent(float(now), int(tokens), float(usd), day, float(day_ends), month, float(month_ends))


def open_budget_ledger(store: RoutingStore) -> BudgetLedger:
    """The ledger beside the routing store: in Redis (its connection and key prefix) for
    :class:`RedisRoutingStore`, else in this process."""
    if isinstance(store, RedisRoutingStore):
        return RedisBudgetLedger(store.redis, store.prefix)
    return MemoryBudgetLedger()


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Budgets:
    """The gateway's budget checks and spend recording, over a :class:`BudgetLedger`."""

    def __init__(self, ledger: BudgetLedger, defaults: TenantBudget,
                 overrides: Mapping[str, Mapping[str, float]] | None = None) -> None:
        self.ledger = ledger
        self.defaults = defaults
        self._overrides = {tenant: defaults.with_overrides(budget) for tenant, budget in (overrides or {}).items()}
        self._recording: set[asyncio.Task[None]] = set()

    def budget(self, tenant: str) -> TenantBudget:
        return self._overrides.get(tenant, self.defaults)

    async def check(self, tenant: str) -> None:
        """Raise :class:`BudgetExhausted` if a budget of the tenant is spent in its current
        window (naming the one that ends last, when both are). Unlimited tenants cost
        nothing; with the store down, the turn is let through (logged)."""
        budget = self.budget(tenant)
        if not budget.limited:
            return
        try:
            spent = await self.ledger.spent(tenant)
        except RoutingStoreUnavailable:
            logger.warning("tenant %s: routing store down, budgets not checked", tenant)
            return
        exhausted = []
        if budget.tokens_per_day and spent.tokens >= budget.tokens_per_day:
            exhausted.append(BudgetExhausted("tokens per day", budget.tokens_per_day, spent.day_ends - spent.now))
        if budget.usd_per_month and spent.usd >= budget.usd_per_month:
            exhausted.append(BudgetExhausted("usd per month", budget.usd_per_month, spent.month_ends - spent.now))
        if exhausted:
            raise max(exhausted, key=lambda refusal: refusal.retry_after)

    async def admit(self, tenant: str, permit: TurnPermit | None = None) -> None:
        """:meth:`check`, giving the turn's quota ``permit`` back if the turn is refused."""
        try:
            await self.check(tenant)
        except BaseException:
            if permit is not None:
                await shielded(permit.refund())
            raise

    def charge(self, tenant: str, session_id: str) -> TurnCharge:
        """What one turn of the tenant's session spends, to be told of its ``result`` event."""
        return TurnCharge(self, tenant, session_id)

    def record_soon(self, tenant: str, session_id: str, reported: Reported) -> asyncio.Task[None]:
        """Charge what a turn reported in a task of its own: it completes even if the
        turn's stream is cancelled, and a failure is logged, never raised."""
        task = asyncio.create_task(self.record(tenant, session_id, reported), name=f"budget-{tenant}")
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)
        return task

    async def record(self, tenant: str, session_id: str, reported: Reported) -> None:
        try:
            await self.ledger.add(tenant, session_id, reported)
        except RoutingStoreUnavailable:
            logger.warning("tenant %s: could not count a turn's spend (%d tokens; session cost %.6f USD so far): "
                           "routing store down", tenant, reported.tokens, reported.session_cost_usd)
        except Exception:
            logger.exception("tenant %s: could not count a turn's spend (%d tokens; session cost %.6f USD so far)",
                             tenant, reported.tokens, reported.session_cost_usd)

    async def drain(self) -> None:
        """Wait for spend still being recorded (at shutdown, before the store closes)."""
        while self._recording:
            await asyncio.wait(list(self._recording))

    async def usage(self, tenant: str) -> dict[str, Any]:
        """Each budget: its limit (0: unlimited), what was spent in the current window, the
        window and when it ends (what ``GET /admin/tenants/{tenant}`` shows)."""
        budget, spent = self.budget(tenant), await self.ledger.spent(tenant)
        return {
            "tokens_per_day": {"limit": budget.tokens_per_day, "spent": spent.tokens, "window": spent.day,
                               "window_ends": _iso(spent.day_ends),
                               "exhausted": bool(budget.tokens_per_day and spent.tokens >= budget.tokens_per_day)},
            "usd_per_month": {"limit": budget.usd_per_month, "spent": round(spent.usd, 9), "window": spent.month,
                              "window_ends": _iso(spent.month_ends),
                              "exhausted": bool(budget.usd_per_month and spent.usd >= budget.usd_per_month)},
        }


class TurnCharge:
    """One turn's spend: recorded as its ``result`` event is relayed (:meth:`result`, told
    by :class:`hosting.gateway.telemetry.GatewayTurn`), then waited for before the turn's
    last event goes out (:meth:`settled`) when the tenant has a budget."""

    def __init__(self, budgets: Budgets, tenant: str, session_id: str) -> None:
        self._budgets = budgets
        self.tenant = tenant
        self.session_id = session_id
        self._recording: list[asyncio.Task[None]] = []

    def result(self, payload: object) -> None:
        """A ``result`` event of the turn was relayed: count what it reports."""
        reported = Reported.of_result(payload)
        if reported:
            self._recording.append(self._budgets.record_soon(self.tenant, self.session_id, reported))

    async def settled(self) -> None:
        """Wait until the turn's spend is counted if the tenant has a budget, so its next
        turn is checked against it; otherwise let it be counted in the background."""
        if not self._budgets.budget(self.tenant).limited:
            return
        for task in self._recording:
            await asyncio.shield(task)
