"""Tenant spending budgets (tokens per UTC day, dollars per UTC month) and the server's
per-turn cap (``AGENT_MAX_BUDGET_USD``).

In-process with the memory ledger and a clock the test moves: what a turn spends (from
its ``result`` event, as the relay sees it), refusals (429, ``Retry-After``, the budget
named, nothing provisioned, the quota permit given back), windows rolling over, 0 =
unlimited, configuration. The Redis ledger against a real Redis is in
tests/integration/test_budget_ledger.py; real gateways and a real server with the per-turn cap
in tests/e2e/test_budget_turns.py.
"""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from hosting.client import AgentClient, RateLimitedError
from hosting.gateway.app import create_app
from hosting.gateway.budgets import (
    BudgetExhausted,
    Budgets,
    MemoryBudgetLedger,
    Reported,
    Spend,
    Spent,
    TenantBudget,
)
from hosting.gateway.event_stream import StreamWatcher
from hosting.gateway.pool_demand import PoolSizing
from hosting.gateway.quotas import Quotas, TenantLimits
from hosting.gateway.routing.memory import MemoryRoutingStore
from hosting.gateway.routing.protocols import RoutingStoreUnavailable
from hosting.gateway.settings import GatewaySettings
from hosting.gateway.telemetry import GatewayTelemetry, GatewayTurn
from hosting.gateway.tenants import load_tenant_budgets, load_tenant_overrides, load_tenant_tokens
from hosting.sandboxes.memory import MemoryBackend
from hosting.server.settings import Settings
from hosting.settings_env import ConfigError
from hosting.telemetry.settings import TelemetrySettings
from hosting.telemetry.turns import TurnRecord
from hosting.wire import WireEvent, encode
from tests.support.gateways import ADMIN, ALICE, BOB, auth

BASE_ENV = {"GATEWAY_TENANTS": "tok-a:alice", "ANTHROPIC_API_KEY": "sk-x"}


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


class Clock:
    """Epoch seconds the test sets."""

    def __init__(self, text: str) -> None:
        self.now = at(text)

    def __call__(self) -> float:
        return self.now

    def set(self, text: str) -> None:
        self.now = at(text)


def result(tokens: tuple[int, int, int, int], session_cost: float | None) -> dict[str, Any]:
    """A ``result`` event's data as the server sends it (``total_cost_usd`` is the session's running total)."""
    kinds = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    return {"subtype": "success", "is_error": False, "usage": {
        **dict(zip(kinds, tokens, strict=True)), "output_tokens_details": {"thinking_tokens": 9},
        "cache_creation": {"ephemeral_5m_input_tokens": 7}, "service_tier": "standard"},
        "total_cost_usd": session_cost}


def relayed_turn(budgets: Budgets, tenant: str, session_id: str, data: dict[str, Any]) -> Any:
    """One turn's stream through the gateway's own watcher and turn record, the charge hooked as in
    ``post_message`` (:mod:`hosting.gateway.http.turns`); returns the charge's :meth:`settled`."""
    observed = GatewayTurn(TELEMETRY, TurnRecord(time.monotonic(), {"tenant": tenant}))
    charge = budgets.charge(tenant, session_id)
    observed.on_result = charge.result
    watcher = StreamWatcher(observed.saw)
    stream = b"".join(encode(event, f"1-{n}") for n, event in enumerate(
        [WireEvent("session", {"session_id": session_id}), WireEvent("text", {"text": "hi"}),
         WireEvent("result", data), WireEvent("done")], start=1))
    for cut in range(0, len(stream), 37):  # chunks cut anywhere, as they come off the wire
        watcher.feed(stream[cut:cut + 37])
    assert watcher.done
    return charge.settled()


TELEMETRY = GatewayTelemetry(TelemetrySettings(service_name="test-gateway"))


# --- what a turn spends ----------------------------------------------------------------------


async def test_tokens_and_cost_are_summed_from_result_events() -> None:
    clock = Clock("2026-03-14T18:00:00")
    budgets = Budgets(MemoryBudgetLedger(clock), TenantBudget(tokens_per_day=10_000))
    await relayed_turn(budgets, "alice", "s1", result((275, 51, 10, 4), 0.00159))
    await relayed_turn(budgets, "alice", "s1", result((322, 51, 0, 0), 0.003321))  # running total: +0.001731
    await relayed_turn(budgets, "alice", "s2", result((100, 20, 0, 0), 0.0005))
    await relayed_turn(budgets, "bob", "s1", result((1, 1, 0, 0), 0.25))  # bob's s1 is another session
    spent = await budgets.ledger.spent("alice")
    assert spent.tokens == 340 + 373 + 120, "every token kind of usage, nothing else"
    assert spent.usd == pytest.approx(0.003321 + 0.0005), "each turn's cost: its session's running total's increase"
    assert (spent.day, spent.month) == ("2026-03-14", "2026-03")
    assert (await budgets.ledger.spent("bob")).usd == pytest.approx(0.25)

    await relayed_turn(budgets, "alice", "s1", result((5, 5, 0, 0), 0.001))  # the total was reset (/clear): counts whole
    await relayed_turn(budgets, "alice", "s3", result((0, 0, 0, 0), None))  # a crashed turn's zeroed result
    spent = await budgets.ledger.spent("alice")
    assert (spent.tokens, spent.usd) == (843, pytest.approx(0.004821))
    assert Reported.of_result({"usage": "?", "total_cost_usd": "1"}) == Reported()
    assert Reported.of_result(None) == Reported()


# --- refusals --------------------------------------------------------------------------------


async def test_a_spent_budget_is_refused_until_its_window_ends_and_others_go_on() -> None:
    clock = Clock("2026-03-14T18:00:00")
    store = MemoryRoutingStore()
    budgets = Budgets(MemoryBudgetLedger(clock), TenantBudget(tokens_per_day=1000),
                      {"carol": {"tokens_per_day": 0, "usd_per_month": 25.0}})
    quotas = Quotas(store, TenantLimits(max_turns=5, turns_per_minute=10))
    await budgets.ledger.add("alice", "s1", Reported(999))
    await budgets.admit("alice", await quotas.admit_turn("alice"))  # under the limit
    await budgets.ledger.add("alice", "s1", Reported(1))
    permit = await quotas.admit_turn("alice")
    with pytest.raises(BudgetExhausted) as refused:
        await budgets.admit("alice", permit)
    assert refused.value.detail == "tenant budget exhausted: tokens per day (1000)"
    assert refused.value.retry_after == 6 * 3600, "until the UTC day ends"
    assert (await quotas.usage("alice"))["usage"]["turns_last_minute"] == 1, "the refused turn's permit was given back"
    await budgets.check("bob")  # another tenant, same limits, nothing spent

    await budgets.ledger.add("carol", "c1", Reported(10**9, 24.99))
    await budgets.check("carol")  # no token budget; 24.99 of 25 dollars
    await budgets.ledger.add("carol", "c1", Reported(0, 25.0))
    with pytest.raises(BudgetExhausted) as refused:
        await budgets.check("carol")
    assert refused.value.detail == "tenant budget exhausted: usd per month (25.0)"
    assert refused.value.retry_after == (at("2026-04-01T00:00:00") - clock.now)

    both = Budgets(budgets.ledger, TenantBudget(tokens_per_day=1, usd_per_month=1.0))
    await both.ledger.add("dave", "d1", Reported(5, 5.0))
    with pytest.raises(BudgetExhausted, match="usd per month"):  # the one that ends last
        await both.check("dave")


async def test_windows_roll_over_at_utc_midnight_and_month_end() -> None:
    clock = Clock("2028-02-28T23:59:59")
    ledger = MemoryBudgetLedger(clock)
    budgets = Budgets(ledger, TenantBudget(tokens_per_day=100, usd_per_month=2.0))
    await ledger.add("alice", "s1", Reported(100, 1.0))
    with pytest.raises(BudgetExhausted) as refused:
        await budgets.check("alice")
    assert refused.value.retry_after == 1
    clock.set("2028-02-29T00:00:00")  # a leap day
    await budgets.check("alice")
    assert (await ledger.spent("alice")).tokens == 0 and (await ledger.spent("alice")).usd == 1.0
    await ledger.add("alice", "s1", Reported(1, 2.0))  # running total 2.0: this turn cost 1.0
    with pytest.raises(BudgetExhausted) as refused:
        await budgets.check("alice")
    assert refused.value.detail == "tenant budget exhausted: usd per month (2.0)" and refused.value.retry_after == 86400
    usage = await budgets.usage("alice")
    assert usage["usd_per_month"] == {"limit": 2.0, "spent": 2.0, "window": "2028-02",
                                      "window_ends": "2028-03-01T00:00:00Z", "exhausted": True}
    assert usage["tokens_per_day"] == {"limit": 100, "spent": 1, "window": "2028-02-29",
                                       "window_ends": "2028-03-01T00:00:00Z", "exhausted": False}
    clock.set("2028-03-01T00:00:00")
    await budgets.check("alice")
    clock.set("2028-12-31T12:00:00")
    await ledger.add("alice", "s1", Reported(0, 4.5))
    with pytest.raises(BudgetExhausted) as refused:
        await budgets.check("alice")
    assert refused.value.retry_after == 12 * 3600, "December ends with the year"
    clock.set("2029-01-01T00:00:01")
    await budgets.check("alice")


async def test_zero_means_unlimited_and_a_running_turn_may_overrun() -> None:
    ledger = MemoryBudgetLedger(Clock("2026-03-14T18:00:00"))
    unlimited = Budgets(ledger, TenantBudget())
    await ledger.add("alice", "s1", Reported(10**12, 10**6))
    await unlimited.check("alice")
    assert not TenantBudget(0, 0.0).limited and TenantBudget(0, 0.5).limited
    limited = Budgets(ledger, TenantBudget(tokens_per_day=10**12 + 10))
    await limited.check("alice")  # the turn starts within budget...
    await ledger.add("alice", "s1", Reported(500))  # ...and is charged all it spent
    assert (await limited.usage("alice"))["tokens_per_day"]["spent"] == 10**12 + 500


class DownLedger(MemoryBudgetLedger):
    """A ledger whose store cannot be reached."""

    async def add(self, tenant: str, session_id: str, reported: Reported) -> Spend:
        raise RoutingStoreUnavailable("routing store unreachable: ConnectionError")

    async def spent(self, tenant: str) -> Spent:
        raise RoutingStoreUnavailable("routing store unreachable: ConnectionError")


async def test_a_store_outage_neither_refuses_turns_nor_breaks_their_streams(caplog: pytest.LogCaptureFixture) -> None:
    budgets = Budgets(DownLedger(), TenantBudget(tokens_per_day=1))
    with caplog.at_level("WARNING", logger="hosting.gateway.budgets"):
        await budgets.check("alice")  # let through
        await relayed_turn(budgets, "alice", "s1", result((10, 10, 0, 0), 0.01))  # settles without raising
        await budgets.drain()
    assert "budgets not checked" in caplog.text and "could not count a turn's spend" in caplog.text


# --- configuration ---------------------------------------------------------------------------


def test_budgets_from_the_tenants_file_and_the_environment(tmp_path: Path) -> None:
    assert GatewaySettings.from_env(BASE_ENV).tenant_budget == TenantBudget(0, 0.0), "unlimited by default"
    path = tmp_path / "tenants"
    path.write_text(f"bob sha256:{'ab' * 32} max_turns=2 tokens_per_day=1000000 usd_per_month=25\n"
                    f"bob sha256:{'cd' * 32} usd_per_month=25.00\n"
                    f"carol sha256:{'ef' * 32} usd_per_month=0.5 tokens_per_day=0\n"
                    f"dave sha256:{'01' * 32}\n")
    settings = GatewaySettings.from_env({**BASE_ENV, "GATEWAY_TENANTS_FILE": str(path),
                                         "GATEWAY_TENANT_TOKENS_PER_DAY": "5000", "GATEWAY_TENANT_USD_PER_MONTH": "7.5"})
    assert settings.budget_for("alice") == settings.budget_for("dave") == TenantBudget(5000, 7.5)
    assert settings.budget_for("bob") == TenantBudget(1_000_000, 25.0)
    assert settings.budget_for("carol") == TenantBudget(0, 0.5)
    assert isinstance(settings.budget_for("bob").tokens_per_day, int)
    assert settings.limits_for("bob").max_turns == 2
    assert load_tenant_overrides(str(path)) == {"bob": {"max_turns": 2}}, "budgets are not quota limits"
    assert load_tenant_budgets(str(path)) == {"bob": {"tokens_per_day": 1_000_000, "usd_per_month": 25.0},
                                              "carol": {"usd_per_month": 0.5, "tokens_per_day": 0}}


@pytest.mark.parametrize("item, fragment", [
    ("usd_per_month=abc", "line 1: usd_per_month must be a decimal number"),
    ("usd_per_month=-1", "line 1: usd_per_month must be a decimal number"),
    ("usd_per_month=1e3", "line 1: usd_per_month must be a decimal number"),
    ("usd_per_month=nan", "line 1: usd_per_month must be a decimal number"),
    ("usd_per_month=" + "9" * 400, "line 1: usd_per_month must be a decimal number"),
    ("tokens_per_day=1.5", "line 1: tokens_per_day must be a whole number"),
    ("tokens_per_day=-3", "line 1: tokens_per_day must be a whole number"),
    ("usd_per_day=3", "unknown setting 'usd_per_day'"),
    ("tokens_per_day=5 usd_per_month=2\nbob sha256:{d} usd_per_month=3", "line 2: usd_per_month for tenant 'bob' differs"),
])
def test_bad_budgets_name_the_line_never_the_token(tmp_path: Path, item: str, fragment: str) -> None:
    digest = hashlib.sha256(b"tok-secret-1").hexdigest()
    path = tmp_path / "tenants"
    path.write_text(f"bob sha256:{digest} {item.format(d=digest)}")
    with pytest.raises(ConfigError) as raised:
        load_tenant_tokens("", str(path))
    assert fragment in str(raised.value) and "tok-secret-1" not in str(raised.value)


@pytest.mark.parametrize("name, value", [
    ("GATEWAY_TENANT_TOKENS_PER_DAY", "-1"), ("GATEWAY_TENANT_TOKENS_PER_DAY", "lots"),
    ("GATEWAY_TENANT_TOKENS_PER_DAY", "1.5"), ("GATEWAY_TENANT_USD_PER_MONTH", "-2"),
    ("GATEWAY_TENANT_USD_PER_MONTH", "inf"), ("GATEWAY_TENANT_USD_PER_MONTH", "$25"),
])
def test_bad_budget_settings_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        GatewaySettings.from_env({**BASE_ENV, name: value})


def test_the_server_takes_a_per_turn_budget() -> None:
    assert Settings.from_env({}).max_budget_usd is None
    assert Settings.from_env({"AGENT_MAX_BUDGET_USD": "0.25"}).max_budget_usd == 0.25
    for bad in ("0", "-1", "nan", "inf", "a quarter"):
        with pytest.raises(ConfigError, match="AGENT_MAX_BUDGET_USD"):
            Settings.from_env({"AGENT_MAX_BUDGET_USD": bad})
    gateway = GatewaySettings.from_env({**BASE_ENV, "AGENT_MAX_BUDGET_USD": "0.25"})
    assert gateway.sandbox_env["AGENT_MAX_BUDGET_USD"] == "0.25", "sandboxes inherit it"


# --- the gateway's HTTP answer, in-process ---------------------------------------------------


async def test_the_gateway_answers_429_before_provisioning_and_the_client_raises_it() -> None:
    clock = Clock("2026-03-14T18:00:00")
    backend, store = MemoryBackend(), MemoryRoutingStore()
    settings = GatewaySettings(tenants={hashlib.sha256(ALICE.encode()).digest(): "alice",
                                        hashlib.sha256(BOB.encode()).digest(): "bob"},
                               admin_token=ADMIN, warm_pool=PoolSizing(floor=0, ceiling=0))
    budgets = Budgets(MemoryBudgetLedger(clock), TenantBudget(tokens_per_day=1_000_000))
    app = create_app(settings, backend, store, budgets=budgets)
    await budgets.ledger.add("alice", "s1", Reported(1_000_000, 0.5))
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
        refused = await http.post("/sessions/s1/messages", json={"prompt": "hi"}, headers=auth(ALICE))
        assert refused.status_code == 429 and refused.headers["retry-after"] == str(6 * 3600)
        assert refused.json() == {"detail": "tenant budget exhausted: tokens per day (1000000)", "code": "over_budget"}
        advance = await http.post("/runtime/advance", headers=auth(ALICE), json={
            "input": {"type": "user_message", "message": {"content": [{"type": "text", "text": "hi"}]}}})
        assert advance.status_code == 429 and advance.json() == refused.json()
        assert backend.creates == 0 and await store.routes() == [], "nothing provisioned"
        tenant = (await http.get("/admin/tenants/alice", headers=auth(ADMIN))).json()
    assert tenant["usage"]["turns_last_minute"] == 0, "the refused turns' quota counts were given back"
    assert tenant["budgets"] == {
        "tokens_per_day": {"limit": 1_000_000, "spent": 1_000_000, "window": "2026-03-14",
                           "window_ends": "2026-03-15T00:00:00Z", "exhausted": True},
        "usd_per_month": {"limit": 0.0, "spent": 0.5, "window": "2026-03",
                          "window_ends": "2026-04-01T00:00:00Z", "exhausted": False}}
    async with AgentClient("http://gateway", token=ALICE, session_id="s1", transport=transport) as client:
        with pytest.raises(RateLimitedError) as raised:
            await client.arun("hi")
    assert (raised.value.status, raised.value.code, raised.value.retry_after) == (429, "over_budget", 6 * 3600)
    assert raised.value.detail == "tenant budget exhausted: tokens per day (1000000)"
