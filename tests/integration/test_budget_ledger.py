"""The Redis budget ledger against a real Redis: windows on Redis's clock, replicas sharing the
count, and the Lua calendar agreeing with Python's (the rules themselves: tests/unit/test_gateway_budgets.py)."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta

import pytest

from hosting.gateway.budgets import (
    _CALENDAR,
    SESSION_COST_TTL_SECONDS,
    MemoryBudgetLedger,
    RedisBudgetLedger,
    Reported,
    open_budget_ledger,
    utc_windows,
)
from hosting.gateway.routing.memory import MemoryRoutingStore
from hosting.gateway.routing.redis import RedisRoutingStore


async def redis_now(store: RedisRoutingStore) -> float:
    seconds, micros = await store.redis.time()
    return float(seconds) + micros / 1e6


@pytest.mark.stores
async def test_the_redis_ledger_counts_on_redis_clock_and_replicas_share_it(redis_url: str) -> None:
    installation = f"t{secrets.token_hex(4)}"
    one, two = RedisRoutingStore(redis_url, installation), RedisRoutingStore(redis_url, installation)
    try:
        ledgers = [open_budget_ledger(one), open_budget_ledger(two)]
        assert all(isinstance(ledger, RedisBudgetLedger) for ledger in ledgers)
        assert isinstance(open_budget_ledger(MemoryRoutingStore()), MemoryBudgetLedger)
        first = ledgers[0]
        assert isinstance(first, RedisBudgetLedger)
        await asyncio.gather(*(ledgers[n % 2].add("alice", f"s{n}", Reported(10, 0.01 * (n + 1))) for n in range(40)))
        assert (await first.add("alice", "s0", Reported(5, 0.03))).usd == pytest.approx(0.02), "s0 was at 0.01"
        assert (await ledgers[1].add("alice", "s0", Reported(5, 0.03))).usd == 0, "same total: nothing new"
        now = await redis_now(one)
        day, day_ends, month, month_ends = utc_windows(now)
        for ledger in ledgers:
            spent = await ledger.spent("alice")
            assert (spent.tokens, spent.usd) == (410, pytest.approx(sum(0.01 * (n + 1) for n in range(40)) + 0.02))
            assert abs(spent.now - now) < 2 and (spent.day, spent.day_ends, spent.month, spent.month_ends) == (
                day, day_ends, month, month_ends)
        tokens_key, usd_key = first.keys("alice")
        assert tokens_key == f"gw:{installation}:budget:tokens_per_day:alice"
        assert await one.redis.hgetall(tokens_key) == {"window": day, "spent": "410"}
        assert (await one.redis.hgetall(usd_key))["window"] == month
        assert abs(await one.redis.expiretime(tokens_key) - day_ends) <= 1, "expires when its day ends, on Redis's clock"
        assert abs(await one.redis.expiretime(usd_key) - month_ends) <= 1
        session_ttl = await one.redis.ttl(first.session_key("alice", "s0"))
        assert SESSION_COST_TTL_SECONDS - 5 <= session_ttl <= SESSION_COST_TTL_SECONDS
        assert (await ledgers[1].spent("bob")).tokens == 0

        await one.redis.hset(tokens_key, "window", "1999-12-31")  # yesterday's counter, not yet expired
        assert (await first.spent("alice")).tokens == 0
        await first.add("alice", "s9", Reported(7))
        assert await one.redis.hgetall(tokens_key) == {"window": day, "spent": "7"}
    finally:
        await one.aclose()
        await two.aclose()


@pytest.mark.stores
async def test_the_lua_calendar_agrees_with_python(redis_url: str) -> None:
    store = RedisRoutingStore(redis_url, f"t{secrets.token_hex(4)}")
    try:
        script = store.redis.register_script(
            _CALENDAR + "local out = {} for i, s in ipairs(ARGV) do local a, b, c, d = windows(tonumber(s)) "
            "out[i] = a .. ' ' .. b .. ' ' .. c .. ' ' .. d end return out")
        moments: list[int] = []
        for year in (1970, 1999, 2000, 2024, 2025, 2026, 2038, 2100, 2400):
            for month in range(1, 13):
                start = datetime(year, month, 1, tzinfo=UTC)
                moments += [int((start + offset).timestamp()) for offset in
                            (timedelta(0), timedelta(seconds=-1), timedelta(days=14, hours=13), timedelta(days=28))]
        moments += list(range(0, 400 * 366 * 86400, 86400 * 97 + 3607))  # every month and weekday, 400 years
        answers = await script(args=moments)
        for moment, answer in zip(moments, answers, strict=True):
            day, day_ends, month, month_ends = utc_windows(moment)
            assert answer == f"{day} {int(day_ends)} {month} {int(month_ends)}", moment
    finally:
        await store.aclose()
