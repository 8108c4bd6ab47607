"""The gateway's backend-agnostic logic on the in-memory backend: provisioning, the warm
pool (two replicas growing it with their claims, never above its target, and its fall back
to the floor), the reaper and start-up reconciliation, with both routing stores (Redis for real).

What the sandbox scope changes (provisioning, replacement, reaping, retention, reconciliation,
store credentials) runs in both scopes (``scope``), each session of a test in a tenant of its
own where sessions of one tenant would share a sandbox in tenant scope; what tenant scope does
with the sessions of one tenant is in ``test_tenant_scope.py``. The pool's refill is the same
in both scopes and runs in one.

Creates are slowed a little so concurrent callers really interleave."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import replace

import pytest
import redis.asyncio as aioredis

import hosting.gateway.reaper as reaper_module
from hosting.gateway.conversations import CredentialedBackend, StoredConversations
from hosting.gateway.pool import WarmPool
from hosting.gateway.pool_demand import PoolDemand, PoolSizing
from hosting.gateway.provisioning import Provisioner, ProvisioningFailed, new_spec, provisioning_lock
from hosting.gateway.reconcile import reconcile
from hosting.gateway.routing.memory import MemoryRoutingStore
from hosting.gateway.routing.protocols import RoutingStore
from hosting.gateway.routing.records import PoolEntry
from hosting.sandboxes.base import Health, Sandbox, SandboxSpec
from hosting.sandboxes.memory import MemoryBackend
from hosting.stores.access import sandbox_user
from tests.support.polling import wait_for_async
from tests.support.scopes import ENV, SCOPES, Scoped


class SlowBackend(MemoryBackend):
    """Takes a moment to create, as every real engine does."""

    async def create(self, spec: SandboxSpec) -> Sandbox:
        await asyncio.sleep(0.05)
        return await super().create(spec)


def provisioner(backend: MemoryBackend, store: RoutingStore, demand: PoolDemand | None = None) -> Provisioner:
    return Provisioner(backend, store, ENV, timeout_seconds=10, demand=demand)


def fixed_pool(backend: MemoryBackend, store: RoutingStore, size: int) -> tuple[WarmPool, PoolDemand]:
    """A pool of ``size`` whatever the demand, and the demand its claims must go to."""
    demand = PoolDemand(store, PoolSizing(floor=size, ceiling=size))
    return WarmPool(backend, store, provisioner(backend, store, demand), ENV, demand, lock_seconds=30), demand


@pytest.fixture(params=SCOPES)
def scope(request: pytest.FixtureRequest) -> str:
    """Each sandbox scope: a sandbox per session, or sessions of a tenant sharing sandboxes."""
    return str(request.param)


async def test_concurrent_first_requests_make_one_sandbox_per_tenant(store: RoutingStore, scope: str) -> None:
    backend = SlowBackend()
    gateway = Scoped(scope, backend, store)
    routes = await asyncio.gather(*(gateway.provisioner().ensure("s1", tenant)
                                    for _ in range(10) for tenant in ("alice", "bob")))
    assert backend.creates == 2
    by_tenant = {tenant: {r.sandbox_id for r in routes if r.tenant == tenant} for tenant in ("alice", "bob")}
    assert len(by_tenant["alice"]) == len(by_tenant["bob"]) == 1 and by_tenant["alice"] != by_tenant["bob"]
    alice, bob = await store.get("alice/s1"), await store.get("bob/s1")
    assert alice is not None and bob is not None and alice.volume != bob.volume
    assert {s.tenant for s in await backend.list()} == {"alice", "bob"}


async def test_a_failed_start_leaves_nothing_and_says_so(store: RoutingStore, scope: str) -> None:
    backend = MemoryBackend()
    gateway = Scoped(scope, backend, store)
    backend.fail_next_create("engine said no")
    with pytest.raises(ProvisioningFailed, match="engine said no"):
        await gateway.provisioner().ensure("s1", "alice")
    assert await store.get("alice/s1") is None and await backend.list() == []
    assert await store.shared_volumes("alice") == []
    assert (await gateway.provisioner().ensure("s1", "alice")).sandbox_id is not None


async def test_claims_skip_pooled_sandboxes_that_are_not_ready(store: RoutingStore, scope: str) -> None:
    backend = MemoryBackend()
    gateway = Scoped(scope, backend, store)
    pool, demand = gateway.fixed_pool(3)
    assert await pool.refill() == 3
    entries = await store.pool_entries()
    assert {backend.spec_of(e.sandbox.sandbox_id).session_capacity for e in entries} == {gateway.session_capacity}
    dead, draining = entries[0].sandbox.sandbox_id, entries[1].sandbox.sandbox_id
    backend.kill(dead)
    backend.set_health(draining, Health.STARTING)
    first = await gateway.provisioner(demand).ensure("s1", "alice")
    assert first.sandbox_id == entries[2].sandbox.sandbox_id, "only the ready pooled sandbox may be handed out"
    assert demand.changed.is_set()
    assert draining not in {s.sandbox_id for s in await backend.list()}, "a pooled sandbox that is not ready is removed"
    second = await gateway.provisioner(demand).ensure("s2", "bob")
    assert second.sandbox_id not in (dead, draining, first.sandbox_id)
    assert await pool.refill() == 3


async def test_pools_of_two_replicas_never_exceed_the_target(store: RoutingStore) -> None:
    backend = SlowBackend()
    pools = [fixed_pool(backend, store, 2)[0] for _ in range(2)]
    await asyncio.gather(*(pool.refill() for pool in pools * 3))
    assert len(await store.pool_entries()) == 2 and backend.creates == 2
    claims = await asyncio.gather(*(provisioner(backend, store).ensure(f"s{i}", "alice") for i in range(5)))
    assert len({c.sandbox_id for c in claims}) == 5
    await asyncio.gather(*(pool.refill() for pool in pools))
    assert len(await store.pool_entries()) == 2 and backend.creates == 7


def replicas(backend: MemoryBackend, store: RoutingStore, sizing: PoolSizing,
             window_seconds: float = 120.0) -> list[tuple[WarmPool, Provisioner]]:
    """Two gateway replicas on one store and one engine: each its own demand, pool and provisioner."""
    made = []
    for _ in range(2):
        demand = PoolDemand(store, sizing, window_seconds)
        made.append((WarmPool(backend, store, provisioner(backend, store, demand), ENV, demand, lock_seconds=30),
                     provisioner(backend, store, demand)))
    return made


async def test_two_replicas_grow_the_pool_with_claims_never_above_the_current_target(
        store: RoutingStore, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = SlowBackend()
    sizing = PoolSizing(floor=1, ceiling=6, start_concurrency=2)
    (pool_a, claims_a), (pool_b, claims_b) = replicas(backend, store, sizing)
    observer = PoolDemand(store, sizing)
    sizes: list[tuple[int, int]] = []
    put = store.pool_put

    async def put_and_check(entry: PoolEntry) -> None:
        await put(entry)
        sizes.append((len(await store.pool_entries()), (await observer.target()).size))

    monkeypatch.setattr(store, "pool_put", put_and_check)
    loops = [asyncio.create_task(pool.run()) for pool in (pool_a, pool_b)]
    try:
        await wait_for_async(lambda: has_entries(store, 1), timeout=10)
        sessions = []
        for burst in range(3):  # each replica's share of a burst, the pools refilling meanwhile
            sessions += await asyncio.gather(*(claims.ensure(f"b{burst}-{i}", "alice")
                                               for i, claims in enumerate([claims_a, claims_b] * 2)))
        target = await observer.target()
        assert (target.size, target.cause, target.claims) == (6, "max", 12)
        await wait_for_async(lambda: has_entries(store, 6), timeout=10)
    finally:
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
    assert all(ready <= target for ready, target in sizes), sizes
    # Every sandbox started serves a session or waits in the pool: none was started and
    # thrown away because both replicas refilled at once.
    routed = {route.sandbox_id for route in sessions}
    pooled = {entry.sandbox.sandbox_id for entry in await store.pool_entries()}
    assert len(routed) == 12 and len(pooled) == 6
    assert {s.sandbox_id for s in await backend.list()} == routed | pooled and backend.deletes == 0


async def test_when_claims_stop_the_pool_falls_back_to_its_floor_oldest_first_never_a_claimed_one(
        store: RoutingStore) -> None:
    backend = MemoryBackend()
    sizing = PoolSizing(floor=1, ceiling=4, start_concurrency=3)
    (pool_a, claims_a), (pool_b, _) = replicas(backend, store, sizing, window_seconds=1.0)
    sessions = [await claims_a.ensure(f"s{i}", "alice") for i in range(5)]
    status = await pool_b.status()
    assert (status["target"], status["reason"]) == (4, "capped at max (5 claims in the last 1 s)")
    assert await pool_a.refill() == 4
    grown = await store.pool_entries()

    await wait_for_async(lambda: at_floor(pool_b), timeout=10)
    # Both replicas trim at once while a new session takes a sandbox from the surplus.
    *_, taken = await asyncio.gather(pool_a.refill(), pool_b.refill(), store.pool_take())
    assert taken is not None
    left = {entry.sandbox.sandbox_id for entry in await store.pool_entries()}
    alive = {s.sandbox_id for s in await backend.list()}
    assert taken.sandbox.sandbox_id in alive, "a claimed sandbox was removed"
    assert len(left) <= 1 and alive == {route.sandbox_id for route in sessions} | left | {taken.sandbox.sandbox_id}
    created = {entry.sandbox.sandbox_id: entry.sandbox.created_at for entry in grown}
    removed, kept = set(created) - left - {taken.sandbox.sandbox_id}, left & set(created)  # (else refilled since)
    assert all(created[gone] < created[newer] for gone in removed for newer in kept), "the oldest go first"
    await pool_b.refill()
    assert len(await store.pool_entries()) == 1


async def at_floor(pool: WarmPool) -> bool:
    return (await pool.status())["cause"] == "floor"


async def has_entries(store: RoutingStore, count: int) -> bool:
    return len(await store.pool_entries()) >= count


async def test_a_lost_sandbox_is_replaced_on_the_same_volume_once(store: RoutingStore, scope: str) -> None:
    backend = MemoryBackend()
    gateway = Scoped(scope, backend, store)
    route = await gateway.provisioner().ensure("s1", "alice")
    assert route.sandbox_id is not None
    backend.kill(route.sandbox_id)
    replaced = await asyncio.gather(*(gateway.provisioner().replace(route) for _ in range(5)))
    assert len({r.sandbox_id for r in replaced}) == 1
    assert replaced[0].sandbox_id != route.sandbox_id and replaced[0].volume == route.volume
    assert backend.creates == 2


async def test_the_reaper_removes_idle_sandboxes_once_and_keeps_volumes(store: RoutingStore, scope: str) -> None:
    backend = MemoryBackend()
    gateway = Scoped(scope, backend, store)
    idle = await gateway.provisioner().ensure("idle", "alice")
    busy = await gateway.provisioner().ensure("busy", "bob")
    await store.put(replace(idle, last_activity=time.time() - 100))
    await store.put(replace(busy, last_activity=time.time() - 100))
    await store.touch("bob/busy")
    reapers = [gateway.reaper(idle_timeout_seconds=10) for _ in range(3)]
    reaped = await asyncio.gather(*(reaper.sweep() for reaper in reapers))
    assert sorted(sum(reaped, [])) == [idle.sandbox_id]
    assert idle.volume in backend.volumes
    after = await store.get("alice/idle")
    assert after is not None and after.sandbox_id is None and after.state == "released"
    again = await gateway.provisioner().ensure("idle", "alice")
    assert again.volume == idle.volume and again.sandbox_id not in (None, idle.sandbox_id)


async def test_reconcile_readopts_known_removes_orphans_and_releases_the_lost(store: RoutingStore,
                                                                              scope: str) -> None:
    backend = MemoryBackend()
    gateway = Scoped(scope, backend, store)
    known = await gateway.provisioner().ensure("known", "alice")
    lost = await gateway.provisioner().ensure("lost", "carol")
    assert lost.sandbox_id is not None
    backend.kill(lost.sandbox_id)
    orphan = await backend.create(new_spec(ENV, "orphan", "bob"))
    busy_orphan = await backend.create(new_spec(ENV, "being-provisioned", "bob"))
    pooled = new_spec(ENV)
    await store.pool_put(PoolEntry(await backend.create(pooled), pooled.token))
    lock = await store.locks.acquire(provisioning_lock("bob", "being-provisioned"), 30)
    assert lock is not None
    result = await reconcile(backend, store, gateway.shared())
    assert sorted(result.adopted) == sorted([known.sandbox_id, pooled.sandbox_id])
    assert result.removed == [orphan.sandbox_id]
    assert result.released == [lost.sandbox_id]
    assert {s.sandbox_id for s in await backend.list()} == {known.sandbox_id, pooled.sandbox_id,
                                                            busy_orphan.sandbox_id}
    assert (await store.get("carol/lost")) is not None and (await store.get("carol/lost")).sandbox_id is None  # type: ignore[union-attr]
    assert all(v.sandbox_id != lost.sandbox_id for v in await store.shared_volumes("carol"))


async def test_retention_deletes_unused_sessions_whole_once_and_a_bounded_number_per_sweep(
        store: RoutingStore, scope: str, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = MemoryBackend()
    gateway = Scoped(scope, backend, store)
    routes = [await gateway.provisioner().ensure(f"old{i}", f"tenant{i}") for i in range(3)]
    fresh = await gateway.provisioner().ensure("fresh", "alice")
    for route in routes:
        await store.put(replace(route, last_activity=time.time() - 100))
    monkeypatch.setattr(reaper_module, "RETENTION_BATCH", 2)
    sweepers = [gateway.retention(ttl_seconds=10) for _ in range(3)]
    first = sum(await asyncio.gather(*(sweeper.sweep() for sweeper in sweepers)), [])
    assert len(first) == 2, "one sweep at a time, at most RETENTION_BATCH sessions"
    second = await sweepers[0].sweep()
    assert sorted(first + second) == sorted(route.key for route in routes)
    for route in routes:
        assert await store.get(route.key) is None and route.volume not in backend.volumes
        assert route.sandbox_id not in {s.sandbox_id for s in await backend.list()}
    assert await store.get(fresh.key) == fresh and fresh.volume in backend.volumes
    assert await gateway.retention(ttl_seconds=0).sweep() == [], "0 keeps sessions forever"


@pytest.mark.stores
async def test_each_sandbox_gets_a_store_credential_granted_its_session_on_assignment(redis_url: str,
                                                                                      scope: str) -> None:
    installation = f"t{secrets.token_hex(4)}"
    conversations = StoredConversations(redis_url, installation)
    backend = MemoryBackend()
    credentialed = CredentialedBackend(backend, conversations)
    store = MemoryRoutingStore()
    gateway = Scoped(scope, credentialed, store, conversations=conversations)
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        pool, demand = gateway.fixed_pool(1)
        await pool.refill()
        (pooled,) = await store.pool_entries()
        user = sandbox_user(installation, pooled.sandbox.sandbox_id)
        url = backend.spec_of(pooled.sandbox.sandbox_id).env["AGENT_SESSION_STORE"]
        assert url != redis_url and user in url
        pooled_acl = await admin.acl_getuser(user)
        assert pooled_acl is not None and "research-agent" not in str(pooled_acl["keys"]), \
            "a pooled sandbox reaches no session yet"

        claimed = await gateway.provisioner(demand).ensure("s1", "alice")
        assert claimed.sandbox_id == pooled.sandbox.sandbox_id
        assert conversations.stored_id("alice", "s1") in " ".join((await admin.acl_getuser(user))["keys"])
        fresh = await gateway.provisioner(demand).ensure("s2", "bob")  # started for its session
        fresh_user = sandbox_user(installation, str(fresh.sandbox_id))
        assert conversations.stored_id("bob", "s2") in " ".join((await admin.acl_getuser(fresh_user))["keys"])

        await credentialed.delete(str(claimed.sandbox_id))
        assert await admin.acl_getuser(user) is None, "the credential goes with its sandbox"
        await backend.delete(str(fresh.sandbox_id))  # behind the wrapper's back: an orphaned credential
        assert await credentialed.remove_orphan_credentials() == [fresh.sandbox_id]
        assert await admin.acl_getuser(fresh_user) is None
    finally:
        await admin.aclose()
        await credentialed.aclose()
        await conversations.aclose()


async def test_without_the_store_no_sandbox_starts_and_nothing_is_left(scope: str) -> None:
    conversations = StoredConversations("redis://127.0.0.1:1/0", "down")  # nothing listens on port 1
    backend = MemoryBackend()
    credentialed = CredentialedBackend(backend, conversations)
    store = MemoryRoutingStore()
    try:
        with pytest.raises(ProvisioningFailed, match="session store"):
            await Scoped(scope, credentialed, store, conversations=conversations).provisioner().ensure("s1", "alice")
        assert await backend.list() == [] and backend.creates == 0
        assert await store.routes() == [] and await store.shared_volumes("alice") == []
    finally:
        await conversations.aclose()
