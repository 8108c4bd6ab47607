"""The warm pool's target, on a clock the test moves: it follows the claims of the last
window between its floor and its max, and falls back when they stop; the pool never pools
above it; ``/admin/pool`` and ``/metrics`` say what it is and why. Two replicas on one Redis:
``tests/integration/test_gateway_logic.py``."""

from __future__ import annotations

import asyncio
import hashlib

import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client.parser import text_string_to_metric_families

from hosting.gateway.app import create_app
from hosting.gateway.pool import WarmPool
from hosting.gateway.pool_demand import CLAIMS_WINDOW, DEMAND_WINDOW_SECONDS, PoolDemand, PoolSizing, pool_target
from hosting.gateway.provisioning import Provisioner
from hosting.gateway.routing.memory import MemoryRoutingStore
from hosting.gateway.routing.records import PoolEntry
from hosting.gateway.settings import GatewaySettings
from hosting.sandboxes.base import Sandbox, SandboxSpec
from hosting.sandboxes.memory import MemoryBackend
from tests.support.gateways import ADMIN, ALICE, auth
from tests.support.polling import wait_for_async

ENV = {"ANTHROPIC_API_KEY": "sk-x"}


class Clock:
    """Monotonic seconds that move only when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("claims, size, cause, reason", [
    (0, 2, "floor", "floor (0 claims in the last 120 s)"),
    (1, 2, "floor", "floor (1 claim in the last 120 s)"),
    (2, 2, "floor", "floor (2 claims in the last 120 s)"),
    (7, 7, "demand", "7 claims in the last 120 s"),
    (10, 10, "demand", "10 claims in the last 120 s"),
    (15, 10, "max", "capped at max (15 claims in the last 120 s)"),
])
def test_the_target_is_one_sandbox_per_recent_claim_between_floor_and_max(claims: int, size: int, cause: str,
                                                                          reason: str) -> None:
    target = pool_target(claims, PoolSizing(floor=2, ceiling=10))
    assert (target.size, target.cause, target.reason) == (size, cause, reason)


def test_a_pool_without_a_max_is_off_whatever_the_claims() -> None:
    assert pool_target(5, PoolSizing(floor=0, ceiling=0)).size == 0


async def test_the_target_follows_the_claims_of_the_window_and_falls_back_to_the_floor() -> None:
    clock = Clock()
    demand = PoolDemand(MemoryRoutingStore(clock), PoolSizing(floor=2, ceiling=10))
    assert (await demand.target()).cause == "floor"
    for _ in range(15):  # a burst of new sessions
        await demand.record_claim()
        clock.now += 0.1
    assert demand.changed.is_set(), "a claim wakes this replica's pool"
    assert (await demand.target()).size == 10
    clock.now += 60  # a second burst, a minute later, finds the pool grown by the first
    assert (await demand.target()).reason == "capped at max (15 claims in the last 120 s)"
    for _ in range(5):
        await demand.record_claim()
    clock.now += DEMAND_WINDOW_SECONDS - 60  # the first burst leaves the window
    target = await demand.target()
    assert (target.size, target.cause, target.claims) == (5, "demand", 5)
    clock.now += 60  # no claims since: back at the floor
    assert (await demand.target()).reason == "floor (0 claims in the last 120 s)"


class GatedBackend(MemoryBackend):
    """Creates wait for the test to open the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def create(self, spec: SandboxSpec) -> Sandbox:
        await self.gate.wait()
        return await super().create(spec)


async def test_a_sandbox_started_for_a_target_that_fell_meanwhile_is_removed_not_pooled(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock, backend = Clock(), GatedBackend()
    store = MemoryRoutingStore(clock)
    demand = PoolDemand(store, PoolSizing(floor=1, ceiling=4, start_concurrency=3))
    pool = WarmPool(backend, store, Provisioner(backend, store, ENV, 10, demand), ENV, demand, lock_seconds=30)
    puts: list[tuple[int, int]] = []
    put = store.pool_put

    async def put_and_check(entry: PoolEntry) -> None:
        await put(entry)
        puts.append((len(await store.pool_entries()), (await demand.target()).size))

    monkeypatch.setattr(store, "pool_put", put_and_check)
    for _ in range(3):
        await demand.record_claim()
    refill = asyncio.create_task(pool.refill())
    await wait_for_async(lambda: pool.starting == 3, timeout=5)
    clock.now += DEMAND_WINDOW_SECONDS  # the claims leave the window while three sandboxes start
    backend.gate.set()
    assert await refill == 1
    assert puts == [(1, 1)], "pooled only below the target of the moment"
    assert len(await store.pool_entries()) == 1 and len(await backend.list()) == 1 and backend.deletes == 2


async def test_admin_pool_and_metrics_show_the_target_and_why() -> None:
    clock, backend = Clock(), MemoryBackend()
    store = MemoryRoutingStore(clock)
    settings = GatewaySettings(tenants={hashlib.sha256(ALICE.encode()).digest(): "alice"}, admin_token=ADMIN,
                               warm_pool=PoolSizing(floor=1, ceiling=3))
    app = create_app(settings, backend, store)
    async with LifespanManager(app) as running, httpx.AsyncClient(
            transport=httpx.ASGITransport(running.app), base_url="http://gateway") as http:

        async def pool() -> dict[str, object]:
            answer = await http.get("/admin/pool", headers=auth(ADMIN))
            assert answer.status_code == 200
            return dict(answer.json())

        async def metrics() -> dict[tuple[str, str], float]:
            text = (await http.get("/metrics", headers=auth(ADMIN))).text
            return {(sample.name, sample.labels.get("cause", "")): sample.value
                    for family in text_string_to_metric_families(text) for sample in family.samples
                    if sample.name.startswith("agent_gateway_warm_pool_target")}

        await wait_for_async(lambda: ready_in(http, 1), timeout=5)
        assert {k: v for k, v in (await pool()).items() if k != "sandboxes"} == {
            "target": 1, "floor": 1, "max": 3, "cause": "floor", "reason": "floor (0 claims in the last 120 s)",
            "claims": 0, "window_seconds": 120.0, "start_concurrency": 2, "ready": 1, "starting_here": 0}
        for _ in range(5):
            await store.record_rate(CLAIMS_WINDOW, DEMAND_WINDOW_SECONDS)
        assert await metrics() == {
            ("agent_gateway_warm_pool_target", ""): 3, ("agent_gateway_warm_pool_target_cause", "floor"): 0,
            ("agent_gateway_warm_pool_target_cause", "demand"): 0, ("agent_gateway_warm_pool_target_cause", "max"): 1}
        assert (await pool())["reason"] == "capped at max (5 claims in the last 120 s)"
        clock.now += DEMAND_WINDOW_SECONDS
        assert (await metrics())[("agent_gateway_warm_pool_target_cause", "floor")] == 1
        assert (await pool())["target"] == 1


async def ready_in(http: httpx.AsyncClient, ready: int) -> bool:
    return bool((await http.get("/admin/pool", headers=auth(ADMIN))).json()["ready"] == ready)
