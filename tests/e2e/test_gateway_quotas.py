"""Tenant quotas: live sandboxes, concurrent turns, turns per minute (their configuration:
tests/unit/test_quota_settings.py).

The counters and the checks run against both routing stores (Redis for real) on the
in-memory backend; then real gateway processes (local backend, the real SDK and CLI
against the local model) show the HTTP behaviour: 429 with ``Retry-After`` and the
quota named, nothing provisioned, slots freed however a stream ends, and two
replicas on one Redis sharing the counts.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Awaitable
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from hosting.gateway.provisioning import Provisioner, ProvisioningFailed
from hosting.gateway.quotas import QuotaExceeded, Quotas, TenantLimits
from hosting.gateway.reaper import Reaper
from hosting.gateway.routing.protocols import RoutingStore
from hosting.gateway.routing.records import Route
from hosting.gateway.routing.redis import RedisRoutingStore
from hosting.sandboxes.base import Sandbox, SandboxSpec
from hosting.sandboxes.memory import MemoryBackend
from tests.support.gateways import ALICE, BOB, GatewayProcess, Gateways, OpenTurn, auth, open_turn
from tests.support.polling import wait_for, wait_for_async
from tests.support.turns import Turn, post_turn

pytestmark = pytest.mark.e2e

ENV = {"ANTHROPIC_API_KEY": "sk-x"}


# --- the counters, on both stores ----------------------------------------------------------


async def counted(count: Awaitable[int], expected: int) -> bool:
    return await count == expected


def routed(session_id: str, tenant: str = "alice") -> Route:
    return Route(session_id, tenant, f"vol-{session_id}").with_sandbox(
        Sandbox(f"sbx-{session_id}", "memory", f"http://{session_id}", f"vol-{session_id}"), "tk")


async def test_slots_are_limited_released_and_lapse_unless_refreshed(store: RoutingStore) -> None:
    first, second = await store.take_slot("turns:a", 2, 0.6), await store.take_slot("turns:a", 2, 0.6)
    assert first and second and await store.take_slot("turns:a", 2, 0.6) is None
    assert await store.take_slot("turns:b", 2, 0.6), "each name counts on its own"
    await store.release_slot("turns:a", first)
    await store.refresh_slot("turns:a", first, 0.6)  # a refresh racing the release
    assert await store.count_slots("turns:a") == 1, "a released slot is not taken again"
    third = await store.take_slot("turns:a", 2, 0.6)
    assert third is not None and await store.count_slots("turns:a") == 2
    for _ in range(4):  # ``second`` is refreshed, ``third`` is left as a crashed replica would
        await asyncio.sleep(0.25)
        await store.refresh_slot("turns:a", second, 0.6)
    assert await store.count_slots("turns:a") == 1, "an unrefreshed slot lapses"
    assert await store.take_slot("turns:a", 2, 0.6) is not None


async def test_the_window_counts_refunds_and_says_when_to_retry(store: RoutingStore) -> None:
    tokens = [(await store.take_rate("rate:a", 3, 1.0))[0] for _ in range(3)]
    assert all(tokens)
    refused, wait = await store.take_rate("rate:a", 3, 1.0)
    assert refused is None and 0 < wait <= 1.0
    assert await store.count_rate("rate:a", 1.0) == 3, "a refused event is not counted"
    assert tokens[0] is not None
    await store.refund_rate("rate:a", tokens[0])
    assert (await store.take_rate("rate:a", 3, 1.0))[0] is not None
    await wait_for_async(lambda: counted(store.count_rate("rate:a", 1.0), 0), timeout=5)
    assert (await store.take_rate("rate:a", 3, 1.0))[0] is not None


async def test_sandbox_counts_follow_the_routes(store: RoutingStore) -> None:
    assert await store.reserve_sandbox("alice", "s1", 2, 30)
    assert await store.reserve_sandbox("alice", "s2", 2, 30)
    assert await store.reserve_sandbox("alice", "s1", 2, 30), "a session already counted is not counted twice"
    assert not await store.reserve_sandbox("alice", "s3", 2, 30)
    assert await store.reserve_sandbox("bob", "s9", 2, 30), "tenants count apart"
    await store.put(routed("s1"))
    await store.cancel_sandbox_reservation("alice", "s1")
    assert await store.count_sandboxes("alice") == 2, "an assigned sandbox stays counted"
    await store.cancel_sandbox_reservation("alice", "s2")
    assert await store.count_sandboxes("alice") == 1
    assert await store.reserve_sandbox("alice", "s3", 2, 0.3)
    await wait_for_async(lambda: counted(store.count_sandboxes("alice"), 1), timeout=5)  # nobody completed it: lapsed
    await store.put(routed("s4"))
    assert await store.count_sandboxes("alice") == 2
    assert await store.release("alice/s1", "sbx-s1")
    assert await store.count_sandboxes("alice") == 1, "a released sandbox is not counted"
    await store.delete("alice/s4")
    assert await store.count_sandboxes("alice") == 0, "a deleted session is not counted"


class SlowBackend(MemoryBackend):
    async def create(self, spec: SandboxSpec) -> Sandbox:
        await asyncio.sleep(0.05)
        return await super().create(spec)


async def test_the_sandbox_quota_is_checked_before_provisioning(store: RoutingStore) -> None:
    backend = MemoryBackend()
    quotas = Quotas(store, TenantLimits(max_sandboxes=2, max_turns=0, turns_per_minute=0))
    provisioner = Provisioner(backend, store, ENV, timeout_seconds=10, quotas=quotas)
    s1 = await provisioner.ensure("s1", "alice")
    await provisioner.ensure("s2", "alice")
    with pytest.raises(QuotaExceeded) as refused:
        await provisioner.ensure("s3", "alice")
    assert refused.value.detail == "tenant quota exceeded: live sandboxes (2)" and refused.value.retry_after >= 1
    assert backend.creates == 2 and await store.get("alice/s3") is None
    assert (await provisioner.ensure("s1", "alice")).sandbox_id == s1.sandbox_id, "a session with a sandbox is served"
    await provisioner.ensure("b1", "bob")
    await store.put(replace(s1, last_activity=time.time() - 100))
    assert await Reaper(backend, store, idle_timeout_seconds=10).sweep() == [s1.sandbox_id]
    await provisioner.ensure("s3", "alice")
    with pytest.raises(QuotaExceeded):
        await provisioner.ensure("s1", "alice")  # its sandbox was reaped: it needs a new one, over the limit
    backend.fail_next_create()
    with pytest.raises(QuotaExceeded):
        await provisioner.ensure("s4", "alice")
    assert await quotas.usage("alice") == {"tenant": "alice", "usage": {"sandboxes": 2, "turns": 0,
                                           "turns_last_minute": 0}, "limits": {"max_sandboxes": 2, "max_turns": 0,
                                                                              "turns_per_minute": 0}}


async def test_a_failed_provisioning_gives_its_sandbox_back(store: RoutingStore) -> None:
    backend = MemoryBackend()
    quotas = Quotas(store, TenantLimits(max_sandboxes=1))
    provisioner = Provisioner(backend, store, ENV, timeout_seconds=10, quotas=quotas)
    backend.fail_next_create()
    with pytest.raises(ProvisioningFailed, match="injected"):
        await provisioner.ensure("s1", "alice")
    assert await store.count_sandboxes("alice") == 0
    await provisioner.ensure("s2", "alice")


@pytest.mark.stores
async def test_replicas_racing_for_sandboxes_never_pass_the_limit(redis_url: str) -> None:
    installation = f"t{secrets.token_hex(4)}"
    stores = [RedisRoutingStore(redis_url, installation) for _ in range(2)]
    backend = SlowBackend()
    provisioners = [Provisioner(backend, s, ENV, timeout_seconds=10,
                                quotas=Quotas(s, TenantLimits(max_sandboxes=3))) for s in stores]
    results = await asyncio.gather(*(provisioners[i % 2].ensure(f"s{i}", "alice") for i in range(10)),
                                   return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["QuotaExceeded"] * 7 + ["Route"] * 3
    assert backend.creates == 3 and await stores[1].count_sandboxes("alice") == 3
    for s in stores:
        await s.aclose()


async def test_turn_admission_counts_what_runs_and_refunds_what_was_refused(store: RoutingStore) -> None:
    quotas = Quotas(store, TenantLimits(max_turns=2, turns_per_minute=3), window_seconds=2.0)
    one, two = await quotas.admit_turn("alice"), await quotas.admit_turn("alice")
    with pytest.raises(QuotaExceeded) as refused:
        await quotas.admit_turn("alice")
    assert refused.value.detail == "tenant quota exceeded: concurrent turns (2)"
    usage = (await quotas.usage("alice"))["usage"]
    assert usage["turns"] == 2 and usage["turns_last_minute"] == 2, "the refused turn is not counted"
    await (await quotas.admit_turn("bob")).release()
    await one.release()
    await one.release()  # idempotent
    three = await quotas.admit_turn("alice")
    await two.release()
    with pytest.raises(QuotaExceeded) as refused:
        await quotas.admit_turn("alice")
    assert refused.value.detail == "tenant quota exceeded: turns per minute (3)"
    assert 1 <= refused.value.retry_after <= 2
    await three.refund()  # e.g. the sandbox answered 409: the turn never ran
    four = await quotas.admit_turn("alice")
    await four.release()
    assert (await quotas.usage("alice"))["usage"] == {"sandboxes": 0, "turns": 0, "turns_last_minute": 3}
    unlimited = Quotas(store, TenantLimits(0, 0, 0))
    permits = [await unlimited.admit_turn("carol") for _ in range(50)]
    assert (await unlimited.usage("carol"))["usage"] == {"sandboxes": 0, "turns": 0, "turns_last_minute": 0}
    for permit in permits:
        await permit.release()


@pytest.mark.stores
async def test_a_held_slot_is_kept_alive_and_a_crashed_replicas_lapses(redis_url: str) -> None:
    installation = f"t{secrets.token_hex(4)}"
    live, crashed = RedisRoutingStore(redis_url, installation), RedisRoutingStore(redis_url, installation)
    limits = TenantLimits(max_turns=2, turns_per_minute=0)
    here = Quotas(live, limits, slot_ttl_seconds=0.6)
    held = await here.admit_turn("alice")
    await Quotas(crashed, limits, slot_ttl_seconds=0.6).admit_turn("alice")  # never released
    await crashed.aclose()
    with pytest.raises(QuotaExceeded):
        await here.admit_turn("alice")
    keeper = asyncio.create_task(held.keep_alive())
    await asyncio.sleep(1.2)
    assert (await here.usage("alice"))["usage"]["turns"] == 1, "the crashed replica's slot lapsed, the held one did not"
    keeper.cancel()
    await held.release()
    await live.aclose()


# --- real gateways -------------------------------------------------------------------------


def tenants_file(root: Path, **alice: int) -> str:
    path = root / f"tenants-{secrets.token_hex(3)}"
    limits = " ".join(f"{name}={value}" for name, value in alice.items())
    path.write_text(f"alice sha256:{hashlib.sha256(ALICE.encode()).hexdigest()} {limits}\n"
                    f"bob sha256:{hashlib.sha256(BOB.encode()).hexdigest()}\n")
    return str(path)


def start(gateways: Gateways, warm_pool: int = 0, **alice: int) -> GatewayProcess:
    return gateways.start(wait_pool=warm_pool > 0, GATEWAY_TENANTS="", GATEWAY_WARM_POOL=str(warm_pool),
                          GATEWAY_TENANTS_FILE=tenants_file(gateways.root, **alice))


def turn(url: str, session_id: str, prompt: str = "hi", token: str = ALICE) -> Turn:
    done = post_turn(url, session_id, prompt, headers=auth(token))
    assert done.types[-1] == "done" and "error" not in done.types, done.types
    return done


def post(url: str, session_id: str, prompt: str = "hi", token: str = ALICE) -> httpx.Response:
    return httpx.post(f"{url}/sessions/{session_id}/messages", json={"prompt": prompt}, headers=auth(token), timeout=60)


def assert_over_quota(response: httpx.Response, detail: str) -> None:
    assert response.status_code == 429, (response.status_code, response.text)
    assert response.json() == {"detail": f"tenant quota exceeded: {detail}", "code": "over_quota"}
    assert 1 <= int(response.headers["retry-after"]) <= 60


def usage(gateway: GatewayProcess, tenant: str = "alice") -> dict[str, int]:
    return gateway.admin(f"tenants/{tenant}").json()["usage"]  # type: ignore[no-any-return]


def test_concurrent_turns_quota_and_its_slot_freed_however_the_stream_ends(local_gateways: Gateways) -> None:
    gateway = start(local_gateways, max_turns=1, turns_per_minute=0)
    url = gateway.base_url
    turn(url, "a1")
    turn(url, "b1", token=BOB)
    sandboxes = {s["sandbox_id"] for s in gateway.sandboxes()}
    with open_turn(url, "a1", "[[delay:4]] Remember this value: 8080") as running:
        assert usage(gateway)["turns"] == 1
        assert_over_quota(post(url, "a2"), "concurrent turns (1)")
        assert_over_quota(post(url, "a1"), "concurrent turns (1)")
        assert gateway.route("a2") is None and {s["sandbox_id"] for s in gateway.sandboxes()} == sandboxes
        turn(url, "b1", token=BOB)  # another tenant, under its limit: nothing changes
        assert running.finish()[-1] == "done" and "error" not in running.kinds
    assert usage(gateway)["turns"] == 0, "the slot is free by the time the client reads done"
    turn(url, "a2")

    dropped = OpenTurn(url, "a2", "[[delay:6]] Remember this value: 3131")
    dropped.drop()  # the client leaves mid-stream; its sandbox runs the turn to its end
    time.sleep(0.5)
    assert usage(gateway)["turns"] == 1, "a turn holds its slot until it ends in its sandbox"
    assert_over_quota(post(url, "a3"), "concurrent turns (1)")
    with httpx.stream("GET", f"{url}/sessions/a2/events", headers=auth(ALICE), timeout=60) as reattached:
        assert reattached.status_code == 200
        assert usage(gateway)["turns"] == 1, "re-attaching takes no second slot"
        assert b"event: done" in reattached.read()
    wait_for(lambda: usage(gateway)["turns"] == 0, timeout=10)
    turn(url, "a1")
    assert "3131" in turn(url, "a2", "What value did I ask you to remember?").text, "the left turn ran to its end"

    route = gateway.route("a1")
    assert route is not None
    with open_turn(url, "a1", "[[delay:15]] never answered") as lost:
        local_gateways.kill_sandbox(route["sandbox_id"], route["pid"])
        assert lost.finish()[-2:] == ["error", "done"]
    assert usage(gateway)["turns"] == 0
    assert "8080" in turn(url, "a1", "What value did I ask you to remember?").text, "resumed on a new sandbox"


def test_turns_per_minute_quota_counts_only_turns_that_ran(local_gateways: Gateways) -> None:
    gateway = start(local_gateways, turns_per_minute=3)
    url = gateway.base_url
    turn(url, "r1")
    with open_turn(url, "r1", "[[delay:3]] a long one") as running:
        busy = post(url, "r1")
        assert busy.status_code == 409, busy.text  # the sandbox refused it: not counted
        assert usage(gateway)["turns_last_minute"] == 2
        assert running.finish()[-1] == "done"
    assert post(url, "r1", "  ").status_code == 422
    turn(url, "r1", token=BOB)  # bob's own r1, another session: counted for bob alone
    assert usage(gateway, "bob")["turns_last_minute"] == 1 and usage(gateway)["turns_last_minute"] == 2
    turn(url, "r1")
    assert_over_quota(post(url, "r1"), "turns per minute (3)")
    assert_over_quota(post(url, "r2"), "turns per minute (3)")
    assert gateway.route("r2") is None
    assert usage(gateway)["turns_last_minute"] == 3
    turn(url, "b1", token=BOB)


def test_sandbox_quota_refuses_new_sessions_not_running_ones(local_gateways: Gateways) -> None:
    gateway = start(local_gateways, warm_pool=1, max_sandboxes=1)
    url = gateway.base_url
    turn(url, "s1")
    gateway.wait_pool_full()
    pooled = gateway.pool()["sandboxes"]
    sandboxes = {s["sandbox_id"] for s in gateway.sandboxes()}
    assert_over_quota(post(url, "s2"), "live sandboxes (1)")
    assert gateway.route("s2") is None
    assert gateway.pool()["sandboxes"] == pooled, "the pooled sandbox was not claimed"
    assert {s["sandbox_id"] for s in gateway.sandboxes()} == sandboxes
    turn(url, "s1")
    assert usage(gateway) == {"sandboxes": 1, "turns": 0, "turns_last_minute": 2}
    assert httpx.delete(f"{url}/sessions/s1", headers=auth(ALICE), timeout=60).status_code == 204
    assert usage(gateway)["sandboxes"] == 0
    turn(url, "s2")


@pytest.mark.stores
def test_two_replicas_share_every_count(local_gateways: Gateways, redis_url: str) -> None:
    alice = {"max_turns": 1, "turns_per_minute": 5, "max_sandboxes": 2}
    tenants = tenants_file(local_gateways.root, **alice)
    one, two = (local_gateways.start(wait_pool=False, GATEWAY_TENANTS="", GATEWAY_WARM_POOL="0",
                                     GATEWAY_TENANTS_FILE=tenants, GATEWAY_REDIS_URL=redis_url) for _ in range(2))
    turn(one.base_url, "x1")
    with open_turn(one.base_url, "x1", "[[delay:4]] a long one") as running:
        assert_over_quota(post(two.base_url, "x2"), "concurrent turns (1)")
        assert usage(two) == {"sandboxes": 1, "turns": 1, "turns_last_minute": 2}
        assert two.route("x2") is None
        assert running.finish()[-1] == "done"
    turn(two.base_url, "x2")  # at once: the slot was freed before done went out
    dropped = OpenTurn(one.base_url, "x2", "[[delay:4]] a turn its client leaves")
    dropped.drop()
    assert_over_quota(post(two.base_url, "x1"), "concurrent turns (1)")  # held until it ends, on every replica
    wait_for(lambda: usage(two)["turns"] == 0, timeout=20)
    assert_over_quota(post(one.base_url, "x3"), "live sandboxes (2)")
    assert usage(two) == {"sandboxes": 2, "turns": 0, "turns_last_minute": 4}, "the refused turn was not counted"
    turn(two.base_url, "x1")
    assert_over_quota(post(one.base_url, "x1"), "turns per minute (5)")
    turn(one.base_url, "b1", token=BOB)
