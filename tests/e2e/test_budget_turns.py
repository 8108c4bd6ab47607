"""Budgets on real turns: a tenant's spent budget refused on every replica of gateways on one
Redis (local backend, the real SDK and CLI against the local model), and a real server's
per-turn cap (``AGENT_MAX_BUDGET_USD``)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from hosting.gateway.budgets import utc_windows
from tests.support.gateways import ALICE, BOB, Gateways, auth
from tests.support.turns import post_turn


def seconds_to_midnight() -> float:
    return utc_windows(time.time())[1] - time.time()


def used_tokens(data: dict[str, Any]) -> int:
    usage = data["usage"]
    return sum(usage[kind] for kind in ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                                        "cache_read_input_tokens"))


@pytest.mark.e2e
@pytest.mark.stores
def test_a_spent_budget_is_refused_on_every_replica(local_gateways: Gateways, redis_url: str) -> None:
    if seconds_to_midnight() < 30:  # the day must not end between the turn and the refusals
        time.sleep(seconds_to_midnight() + 1)
    tenants = local_gateways.root / "tenants"
    tenants.write_text(f"alice sha256:{hashlib.sha256(ALICE.encode()).hexdigest()} tokens_per_day=100\n"
                       f"bob sha256:{hashlib.sha256(BOB.encode()).hexdigest()}\n")
    with ThreadPoolExecutor(2) as starting:  # two replicas on one Redis, started side by side
        one, two = starting.map(lambda _: local_gateways.start(
            wait_pool=False, GATEWAY_TENANTS="", GATEWAY_WARM_POOL="0", GATEWAY_TENANTS_FILE=str(tenants),
            GATEWAY_REDIS_URL=redis_url), range(2))
    first = post_turn(one.base_url, "m1", "Remember this value: 42", headers=auth(ALICE))
    assert first.types[-1] == "done" and "error" not in first.types, first.types
    spent = used_tokens(first.result)
    assert spent > 100, "one turn spends the day's budget"
    sandboxes = {sandbox["sandbox_id"] for sandbox in one.sandboxes()}
    for gateway, session_id in ((two, "m1"), (one, "m1"), (two, "m2")):  # at once: done followed the charge
        refused = httpx.post(f"{gateway.base_url}/sessions/{session_id}/messages", json={"prompt": "hi"},
                             headers=auth(ALICE), timeout=30)
        assert refused.status_code == 429, (refused.status_code, refused.text)
        assert refused.json() == {"detail": "tenant budget exhausted: tokens per day (100)", "code": "over_budget"}
        assert abs(int(refused.headers["retry-after"]) - seconds_to_midnight()) <= 5, "until the UTC day ends"
    assert {sandbox["sandbox_id"] for sandbox in two.sandboxes()} == sandboxes, "nothing provisioned"
    assert two.route("m2") is None
    other = post_turn(two.base_url, "m1", "hi", headers=auth(BOB))  # bob's own m1, no budget
    assert other.types[-1] == "done" and "error" not in other.types, other.types
    tenant = two.admin("tenants/alice").json()
    assert tenant["usage"]["turns_last_minute"] == 1, "the refused turns were not counted"
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    assert tenant["budgets"]["tokens_per_day"] == {
        "limit": 100, "spent": spent, "window": day,
        "window_ends": datetime.fromtimestamp(utc_windows(time.time())[1], UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "exhausted": True}
    assert tenant["budgets"]["usd_per_month"]["spent"] == pytest.approx(first.result["total_cost_usd"])
    assert one.admin("tenants/bob").json()["budgets"]["tokens_per_day"]["spent"] == used_tokens(other.result)


@pytest.mark.e2e
def test_the_per_turn_cap_stops_a_turn_and_the_next_gets_a_fresh_cli(start_server: Callable[..., Any]) -> None:
    # At the default model's prices the local model's turns here cost about 0.0011, 0.0017 and
    # 0.0014 USD; the CLI counts the cap over its life, so the warm CLI's second turn reaches it.
    server = start_server(AGENT_MAX_BUDGET_USD="0.002")
    first = post_turn(server.base_url, "c1", "Remember this value: 7")
    assert first.result["subtype"] == "success" and first.result["total_cost_usd"] < 0.002
    capped = post_turn(server.base_url, "c1", "hello")
    assert capped.result["subtype"] == "error_max_budget_usd" and capped.types[-2:] == ["error", "done"]
    third = post_turn(server.base_url, "c1", "What value did I ask you to remember?")
    assert third.result["subtype"] == "success" and "7" in third.text, "a new CLI resumed the session"
