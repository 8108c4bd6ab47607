"""Redis going away and coming back, and SIGTERM while a turn streams.

The routing store's side runs on the in-memory backend against a real Redis that
the test stops and starts again (AOF, fsync on every write), stopping it at the
worst moments: while a sandbox is being started, claimed or pooled. Then real
gateway processes (local backend, the real SDK and CLI against the local model)
show what a client sees: sessions the replica knows keep working, anything that
needs the store gets 503 with ``Retry-After``, and when Redis is back every
session has exactly one sandbox and every route is still there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator

import httpx
import pytest

from hosting.gateway.pool import WarmPool
from hosting.gateway.pool_demand import PoolDemand, PoolSizing
from hosting.gateway.provisioning import Provisioner
from hosting.gateway.quotas import QuotaExceeded, Quotas, TenantLimits
from hosting.gateway.routing.protocols import RoutingStoreUnavailable
from hosting.gateway.routing.records import Route
from hosting.gateway.routing.redis import RedisRoutingStore
from hosting.sandboxes.base import Sandbox, SandboxSpec
from hosting.sandboxes.memory import MemoryBackend
from tests.support.gateways import ADMIN, ALICE, Gateways, auth, open_turn
from tests.support.polling import wait_for
from tests.support.stores import RestartableServer, restartable_redis
from tests.support.turns import Turn, post_turn

pytestmark = [pytest.mark.e2e, pytest.mark.stores]

ENV = {"ANTHROPIC_API_KEY": "sk-x"}
RECALL = "What value did I ask you to remember?"


@pytest.fixture
def redis_server() -> Iterator[RestartableServer]:
    """A Redis of the test's own, with AOF: stopped and started again by the test."""
    with restartable_redis(persistent=True) as server:
        yield server


async def down(server: RestartableServer) -> None:
    await asyncio.to_thread(server.stop)


async def up(server: RestartableServer) -> None:
    await asyncio.to_thread(server.start)


def routed(session_id: str, tenant: str = "alice") -> Route:
    return Route(session_id, tenant, f"vol-{session_id}").with_sandbox(
        Sandbox(f"sbx-{session_id}", "memory", f"http://{session_id}", f"vol-{session_id}"), "tk")


class OutageBackend(MemoryBackend):
    """Redis goes down right after the next ``create`` or ``claim`` (set ``during``)."""

    def __init__(self) -> None:
        super().__init__()
        self.during: str | None = None
        self.outage: Callable[[], Awaitable[None]] | None = None

    async def _maybe(self, step: str) -> None:
        if self.during == step and self.outage is not None:
            self.during = None
            await self.outage()

    async def create(self, spec: SandboxSpec) -> Sandbox:
        sandbox = await super().create(spec)
        await self._maybe("create")
        return sandbox

    async def claim(self, sandbox: Sandbox, session_id: str, tenant: str) -> Sandbox | None:
        claimed = await super().claim(sandbox, session_id, tenant)
        await self._maybe("claim")
        return claimed


# --- the routing store through an outage ---------------------------------------------------


async def test_known_routes_are_served_through_an_outage_and_redis_keeps_everything(
        redis_server: RestartableServer) -> None:
    installation = f"t{secrets.token_hex(4)}"
    here, there = RedisRoutingStore(redis_server.url, installation), RedisRoutingStore(redis_server.url, installation)
    written, read = routed("w1"), routed("r1")
    await here.put(written)
    await there.put(read)
    assert await here.get("alice/r1") == read
    await there.put(routed("c1"))
    assert await here.get("alice/c1") is not None
    assert await there.release("alice/c1", "sbx-c1")
    changed = await here.get("alice/c1")
    assert changed is not None and changed.sandbox_id is None, "a successful read refreshes the cache"
    await there.put(routed("other"))
    lock = await here.locks.acquire("provision:x", 60)
    assert lock is not None

    await down(redis_server)
    assert await here.get("alice/w1") == written and await here.get("alice/r1") == read and await here.get("alice/c1") == changed
    for attempt in (here.get("alice/other"), here.put(routed("n1")), here.locks.acquire("provision:n1", 5), here.ping(),
                    here.routes(), here.pool_take(), here.reserve_sandbox("alice", "n1", 5, 5)):
        with pytest.raises(RoutingStoreUnavailable):
            await attempt
    with pytest.raises(RoutingStoreUnavailable):
        await here.locks.release("provision:x", lock)

    await up(redis_server)
    assert await here.locks.acquire("provision:x", 60) is not None, "the lock whose release failed was released"
    assert sorted(r.session_id for r in await there.routes()) == ["c1", "other", "r1", "w1"], "AOF kept every route"
    other = await there.get("alice/other")
    assert other is not None and other.sandbox_id == "sbx-other"
    assert await there.count_sandboxes("alice") == 3, "and the tenants' sandbox counts"
    for store in (here, there):
        await store.aclose()


async def test_the_cache_holds_the_most_recently_used_routes_only(redis_server: RestartableServer) -> None:
    store = RedisRoutingStore(redis_server.url, f"t{secrets.token_hex(4)}", cache_size=2)
    for name in ("a", "b", "c"):
        await store.put(routed(name))
    await store.get("alice/b")  # now c, b are the two most recent
    await store.delete("alice/c")
    await store.put(routed("d"))
    assert len(store.cache) == 2
    await down(redis_server)
    assert (await store.get("alice/b")) is not None and (await store.get("alice/d")) is not None
    for gone in ("a", "c"):  # evicted, and deleted
        with pytest.raises(RoutingStoreUnavailable):
            await store.get(f"alice/{gone}")
    await up(redis_server)
    await store.aclose()


async def test_a_provisioning_cut_by_an_outage_leaves_nothing_and_blocks_nothing(
        redis_server: RestartableServer) -> None:
    store = RedisRoutingStore(redis_server.url, f"t{secrets.token_hex(4)}")
    backend = OutageBackend()
    backend.outage = lambda: down(redis_server)
    demand = PoolDemand(store, PoolSizing(floor=1, ceiling=1))
    provisioner = Provisioner(backend, store, ENV, timeout_seconds=30, demand=demand,
                              quotas=Quotas(store, TenantLimits(max_sandboxes=1)))
    pool = WarmPool(backend, store, provisioner, ENV, demand, lock_seconds=40)

    backend.during = "create"  # Redis dies while the session's sandbox starts
    with pytest.raises(RoutingStoreUnavailable):
        await provisioner.ensure("s1", "alice")
    assert await backend.list() == [] and backend.creates == 1, "the sandbox nobody could route to was removed"
    await up(redis_server)
    started = time.monotonic()
    first = await provisioner.ensure("s1", "alice")
    assert time.monotonic() - started < 5, "the cut provisioning's lock was released, not waited out"
    assert [s.sandbox_id for s in await backend.list()] == [first.sandbox_id]
    assert await store.count_sandboxes("alice") == 1

    backend.during = "create"  # ... while a pool sandbox starts
    with pytest.raises(RoutingStoreUnavailable):
        await pool.refill()
    assert [s.sandbox_id for s in await backend.list()] == [first.sandbox_id]
    await up(redis_server)
    assert await pool.refill() == 1, "the refill lock was released"
    (pooled,) = [entry.sandbox for entry in await store.pool_entries()]

    backend.during = "claim"  # ... right after a pooled sandbox was claimed for a session
    with pytest.raises(RoutingStoreUnavailable):
        await provisioner.ensure("s2", "bob")
    assert [s.sandbox_id for s in await backend.list()] == [first.sandbox_id], "the claimed sandbox was removed"
    assert pooled.volume not in backend.volumes
    await up(redis_server)
    second = await provisioner.ensure("s2", "bob")
    assert second.sandbox_id not in (None, pooled.sandbox_id)
    assert sorted(s.sandbox_id for s in await backend.list()) == sorted([first.sandbox_id, second.sandbox_id])
    assert (await store.get("alice/s1")) == first and backend.creates == 5
    await store.aclose()


async def test_turn_quotas_hold_per_replica_through_an_outage(redis_server: RestartableServer) -> None:
    store = RedisRoutingStore(redis_server.url, f"t{secrets.token_hex(4)}")
    quotas = Quotas(store, TenantLimits(max_sandboxes=5, max_turns=2, turns_per_minute=0), slot_ttl_seconds=1.0)
    before = await quotas.admit_turn("alice")
    await down(redis_server)
    during = [await quotas.admit_turn("alice") for _ in range(2)]
    with pytest.raises(QuotaExceeded):
        await quotas.admit_turn("alice")
    await before.release()  # cannot reach Redis: its slot lapses there
    for permit in during:
        await permit.release()
    await (await quotas.admit_turn("alice")).release()
    with pytest.raises(RoutingStoreUnavailable):
        await quotas.reserve_sandbox("alice", "s1")  # a new sandbox needs the store: 503
    await up(redis_server)
    await asyncio.sleep(1.1)
    assert (await quotas.usage("alice"))["usage"]["turns"] == 0
    await store.aclose()


# --- real gateways -------------------------------------------------------------------------


def turn(url: str, session_id: str, prompt: str = "hi") -> Turn:
    done = post_turn(url, session_id, prompt, headers=auth(ALICE))
    assert done.types[-1] == "done" and "error" not in done.types, done.types
    return done


def post(url: str, session_id: str) -> httpx.Response:
    return httpx.post(f"{url}/sessions/{session_id}/messages", json={"prompt": "hi"}, headers=auth(ALICE), timeout=60)


def test_a_redis_outage_spares_known_sessions_and_provisions_nothing_twice(
        local_gateways: Gateways, redis_server: RestartableServer) -> None:
    gateway = local_gateways.start(GATEWAY_REDIS_URL=redis_server.url, GATEWAY_WARM_POOL="1")
    url = gateway.base_url
    turn(url, "k1", "Remember this value: 5151")
    before = gateway.route("k1")
    assert before is not None

    with open_turn(url, "k1", "[[delay:2]] still there?") as running:
        redis_server.stop()  # in the middle of a turn
        assert running.finish()[-1] == "done" and "error" not in running.kinds
    assert "5151" in turn(url, "k1", RECALL).text, "a session this replica knows keeps working"
    turn(url, "k1")
    for session_id in ("n1", "n2"):
        refused = post(url, session_id)
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1, refused.text
        assert "routing store" in refused.json()["detail"]
    assert httpx.get(f"{url}/ready", headers=auth(ALICE)).status_code == 503
    assert not [s for s in gateway.sandboxes() if s["session_id"] in ("n1", "n2")], "nothing was provisioned"

    redis_server.start()
    turn(url, "n1", "Remember this value: 6161")
    after = gateway.route("k1")
    assert after is not None and {k: after[k] for k in ("sandbox_id", "tenant", "volume")} == \
        {k: before[k] for k in ("sandbox_id", "tenant", "volume")}, "the route survived the restart (AOF)"
    assert "5151" in turn(url, "k1", RECALL).text and "6161" in turn(url, "n1", RECALL).text
    gateway.wait_pool_full()
    routes = {session_id: gateway.route(session_id) for session_id in ("k1", "n1")}
    routed_ids = {route["sandbox_id"] for route in routes.values() if route is not None}
    sandboxes = gateway.sandboxes()
    assert len(routed_ids) == 2 and routed_ids <= {s["sandbox_id"] for s in sandboxes}
    assert {s["sandbox_id"] for s in sandboxes} - routed_ids == set(gateway.pool()["sandboxes"]), \
        "every sandbox is a session's or pooled: none was provisioned twice"
    assert all(n == 1 for n in Counter(s["session_id"] for s in sandboxes if s["session_id"]).values())


def test_sigterm_refuses_new_turns_lets_the_running_stream_finish_and_exits_zero(local_gateways: Gateways) -> None:
    grace = 20.0
    gateway = local_gateways.start(wait_pool=False, GATEWAY_WARM_POOL="0", GATEWAY_SHUTDOWN_GRACE_SECONDS=str(grace))
    assert gateway.process is not None
    url = gateway.base_url
    turn(url, "d1", "Remember this value: 4242")
    route = gateway.route("d1")
    assert route is not None
    ready = lambda: httpx.get(f"{url}/ready", headers=auth(ADMIN), timeout=10)  # noqa: E731
    with open_turn(url, "d1", f"[[delay:3]] {RECALL}") as running, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        provisioning = pool.submit(post_turn, url, "d3", "Remember this value: 3131", headers=auth(ALICE))
        wait_for(lambda: ready().json()["running_streams"] == 2, timeout=10)  # d3 admitted, its sandbox starting
        signalled = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        for session_id in ("d1", "d2"):
            refused = post(url, session_id)
            assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1, refused.text
            assert "shutting down" in refused.json()["detail"]
        assert ready().status_code == 503
        assert running.finish()[-1] == "done" and "error" not in running.kinds
        assert "4242" in running.text
        admitted = provisioning.result(timeout=grace)
        assert admitted.types[-1] == "done" and "error" not in admitted.types, "a turn admitted before SIGTERM ran"
    assert gateway.process.wait(timeout=grace + 10) == 0
    assert time.monotonic() - signalled < grace, "the gateway exits once the stream is over, within the grace period"
    wait_for(lambda: not local_gateways.sandbox_alive(route["sandbox_id"], route["pid"]), timeout=10)


def test_sigterm_cuts_a_stream_still_running_at_the_deadline_with_shutting_down_then_done(
        local_gateways: Gateways) -> None:
    """The grace is a deadline: a stream that outlasts it ends with a retryable ``error``
    (``shutting_down``) and ``done``, and the gateway exits 0 by then, not at a closed socket."""
    grace = 5.0
    gateway = local_gateways.start(wait_pool=False, GATEWAY_WARM_POOL="0", GATEWAY_SHUTDOWN_GRACE_SECONDS=str(grace))
    assert gateway.process is not None
    url = gateway.base_url
    turn(url, "long")  # its sandbox up, so the next turn streams at once
    long_turn = "[[slow:0.2]] " + " ".join(f"word{n}" for n in range(60))  # 12 s: longer than the grace
    with open_turn(url, "long", long_turn) as cut:
        signalled = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        kinds = cut.finish()
    assert gateway.process.wait(timeout=grace + 10) == 0
    assert time.monotonic() - signalled < grace + 2.0, "the deadline holds, with what an exiting interpreter takes"
    assert kinds[-2:] == ["error", "done"] and "result" not in kinds, kinds
    error = dict(cut.events)["error"]
    assert error["code"] == "shutting_down" and error["retryable"] is True
