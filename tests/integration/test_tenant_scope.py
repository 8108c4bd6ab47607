"""Tenant scope's logic (``GATEWAY_SANDBOX_SCOPE=tenant``) on the in-memory backend, with both
routing stores (Redis for real): where new sessions are seated, what a lost or idle shared
sandbox does to its sessions, what deleting one does to its neighbours, and whose sessions a
shared sandbox's store credential reaches. End to end, with real servers and turns:
``tests/e2e/test_gateway_tenant_scope.py``."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest
import redis.asyncio as aioredis

from hosting.gateway.conversations import CredentialedBackend, StoredConversations
from hosting.gateway.provisioning import Provisioner
from hosting.gateway.quotas import QuotaExceeded, Quotas, TenantLimits
from hosting.gateway.routing.memory import MemoryRoutingStore
from hosting.gateway.routing.protocols import RoutingStore
from hosting.gateway.routing.records import Route
from hosting.sandboxes.base import Sandbox, SandboxSpec
from hosting.sandboxes.memory import MemoryBackend
from hosting.stores.access import sandbox_user
from tests.support.scopes import ENV, Scoped


class SlowBackend(MemoryBackend):
    """Takes a moment to create, as every real engine does."""

    async def create(self, spec: SandboxSpec) -> Sandbox:
        await asyncio.sleep(0.05)
        return await super().create(spec)


def tenant_scope(store: RoutingStore, sessions_per_sandbox: int, backend: MemoryBackend | None = None) -> Scoped:
    return Scoped("tenant", backend or MemoryBackend(), store, sessions_per_sandbox)


async def seat_all(gateway: Scoped, tenant: str, *session_ids: str) -> list[Route]:
    return [await gateway.provisioner().ensure(session_id, tenant) for session_id in session_ids]


async def make_idle(store: RoutingStore, *routes: Route) -> None:
    for route in routes:
        current = await store.get(route.key)
        assert current is not None
        await store.put(replace(current, last_activity=time.time() - 100))


def always(answer: bool) -> Callable[[str, str], Awaitable[bool]]:
    async def running_turns(address: str, token: str) -> bool:
        return answer

    return running_turns


async def test_two_tenants_never_share_and_an_eleventh_session_opens_a_second_sandbox(store: RoutingStore) -> None:
    gateway = tenant_scope(store, sessions_per_sandbox=8)
    alices = await seat_all(gateway, "alice", *(f"s{i}" for i in range(11)))
    (bobs,) = await seat_all(gateway, "bob", "s0")
    first, second = alices[0].sandbox_id, alices[8].sandbox_id
    assert {r.sandbox_id for r in alices[:8]} == {first} and {r.sandbox_id for r in alices[8:]} == {second}
    assert second != first and len({r.volume for r in alices}) == 2
    assert bobs.sandbox_id not in (first, second) and bobs.volume not in {r.volume for r in alices}
    assert gateway.backend.creates == 3
    for sandbox_id, tenant in ((first, "alice"), (second, "alice"), (bobs.sandbox_id, "bob")):
        spec = gateway.backend.spec_of(str(sandbox_id))
        assert (spec.tenant, spec.session_id, spec.session_capacity) == (tenant, None, 8)
        assert spec.server_env(host="h", port=1, data_dir="d")["AGENT_PREWARM"] == "2"
    seats = sorted(len(v.seats) for v in await store.shared_volumes("alice"))
    assert seats == [3, 8] and [v.seats for v in await store.shared_volumes("bob")] == [("s0",)]
    assert all(r.epoch > 0 for r in alices) and len({r.key for r in alices}) == 11, "a route and epoch per session"


async def test_new_sessions_arriving_together_fill_a_sandbox_before_another_opens(store: RoutingStore) -> None:
    gateway = tenant_scope(store, sessions_per_sandbox=3, backend=SlowBackend())
    routes = await asyncio.gather(*(gateway.provisioner().ensure(f"s{i}", "alice") for i in range(6)))
    by_sandbox = {r.sandbox_id: [x for x in routes if x.sandbox_id == r.sandbox_id] for r in routes}
    assert sorted(len(sessions) for sessions in by_sandbox.values()) == [3, 3]
    assert gateway.backend.creates == 2


async def test_a_lost_shared_sandbox_releases_all_its_sessions_and_one_replacement_serves_them(
        store: RoutingStore) -> None:
    gateway = tenant_scope(store, sessions_per_sandbox=3)
    a, b, c = await seat_all(gateway, "alice", "a", "b", "c")
    assert a.sandbox_id is not None and a.sandbox_id == b.sandbox_id == c.sandbox_id
    gateway.backend.kill(a.sandbox_id)
    replaced = await asyncio.gather(gateway.provisioner().replace(a), gateway.provisioner().replace(b))
    assert len({r.sandbox_id for r in replaced}) == 1 and replaced[0].sandbox_id != a.sandbox_id
    untouched = await store.get(c.key)
    assert untouched is not None and untouched.state == "released", "every session on a lost sandbox is released"
    (joined,) = await seat_all(gateway, "alice", "c")
    assert joined.sandbox_id == replaced[0].sandbox_id and {r.volume for r in (*replaced, joined)} == {a.volume}
    assert gateway.backend.creates == 2


async def test_the_reaper_spares_a_shared_sandbox_while_any_of_its_sessions_is_active(store: RoutingStore) -> None:
    gateway = tenant_scope(store, sessions_per_sandbox=3)
    a, b = await seat_all(gateway, "alice", "a", "b")
    await make_idle(store, a)
    assert await gateway.reaper(idle_timeout_seconds=10).sweep() == [], "b is active"
    await make_idle(store, b)
    shared = gateway.shared()
    assert shared is not None
    assert await shared.reap_idle(10, always(True)) == [], "a turn running on it (one a client left)"
    assert (await store.get(a.key)).state == "assigned"
    await make_idle(store, a, b)
    reapers = [gateway.reaper(idle_timeout_seconds=10) for _ in range(3)]
    assert sum(await asyncio.gather(*(reaper.sweep() for reaper in reapers)), []) == [a.sandbox_id]
    assert {(await store.get(r.key)).state for r in (a, b)} == {"released"}
    assert a.volume in gateway.backend.volumes
    again = await seat_all(gateway, "alice", "b", "a")
    assert {r.volume for r in again} == {a.volume} and len({r.sandbox_id for r in again}) == 1
    assert again[0].sandbox_id != a.sandbox_id


async def test_deleting_a_session_leaves_its_neighbours_and_the_last_takes_the_volume(store: RoutingStore) -> None:
    gateway = tenant_scope(store, sessions_per_sandbox=3)
    a, b = await seat_all(gateway, "alice", "a", "b")
    shared = gateway.shared()
    assert shared is not None and a.sandbox_id is not None
    assert await shared.forget(a, erased=True)
    assert await store.get(a.key) is None and await store.get(b.key) == b
    assert [v.seats for v in await store.shared_volumes("alice")] == [("b",)]
    assert await gateway.backend.exists(a.sandbox_id) and a.volume in gateway.backend.volumes
    assert await shared.forget(b, erased=True)
    assert await store.shared_volumes("alice") == [] and await store.shared_tenants() == []
    assert not await gateway.backend.exists(a.sandbox_id) and a.volume not in gateway.backend.volumes


async def test_retention_deletes_a_session_on_its_running_sandbox_and_spares_its_neighbours(
        store: RoutingStore) -> None:
    gateway = tenant_scope(store, sessions_per_sandbox=3)
    old, busy, fresh = await seat_all(gateway, "alice", "old", "busy", "fresh")
    await make_idle(store, old, busy)
    gateway.erasures.busy.add("busy")
    assert await gateway.retention(ttl_seconds=10).sweep() == ["alice/old"]
    assert gateway.erasures.erased == [(old.sandbox_id, "old")], "its files are deleted by the sandbox holding them"
    assert await store.get(busy.key) is not None, "a session whose turn runs is not swept"
    assert await store.get(fresh.key) == fresh and await gateway.backend.exists(str(fresh.sandbox_id))


async def test_a_session_deleted_while_its_volume_sleeps_is_erased_before_the_next_sandbox_serves(
        store: RoutingStore) -> None:
    gateway = tenant_scope(store, sessions_per_sandbox=3)
    a, b = await seat_all(gateway, "alice", "a", "b")
    await make_idle(store, a, b)
    assert await gateway.reaper(idle_timeout_seconds=10).sweep() == [a.sandbox_id]
    shared = gateway.shared()
    assert shared is not None and await shared.forget(a, erased=False)
    assert [v.purge for v in await store.shared_volumes("alice")] == [("a",)]
    (new_a,) = await seat_all(gateway, "alice", "a")
    assert new_a.volume != a.volume, "a new session of the same id is never seated beside the old one's files"
    (b_again,) = await seat_all(gateway, "alice", "b")
    assert b_again.volume == a.volume and (b_again.sandbox_id, "a") in gateway.erasures.erased
    assert next(v.purge for v in await store.shared_volumes("alice") if v.volume == a.volume) == ()


async def test_a_failed_join_of_a_new_session_frees_its_seat(store: RoutingStore) -> None:
    gateway = tenant_scope(store, sessions_per_sandbox=3)
    (a,) = await seat_all(gateway, "alice", "a")
    await make_idle(store, a)
    await gateway.reaper(idle_timeout_seconds=10).sweep()
    gateway.backend.fail_next_create("engine said no")
    with pytest.raises(Exception, match="engine said no"):
        await gateway.provisioner().ensure("b", "alice")
    assert await store.get("alice/b") is None
    assert [v.seats for v in await store.shared_volumes("alice")] == [("a",)]


async def test_the_sandbox_quota_counts_a_tenants_sessions_with_a_sandbox_not_the_sandboxes(
        store: RoutingStore) -> None:
    gateway = tenant_scope(store, sessions_per_sandbox=8)
    quotas = Quotas(store, TenantLimits(max_sandboxes=2, max_turns=0, turns_per_minute=0))
    provisioner = Provisioner(gateway.backend, store, ENV, timeout_seconds=10, quotas=quotas, shared=gateway.shared())
    s1 = await provisioner.ensure("s1", "alice")
    await provisioner.ensure("s2", "alice")
    with pytest.raises(QuotaExceeded):
        await provisioner.ensure("s3", "alice")
    assert await store.get("alice/s3") is None and [v.seats for v in await store.shared_volumes("alice")] == [
        ("s1", "s2")], "a refused session takes no seat"
    assert (await provisioner.ensure("s1", "alice")).sandbox_id == s1.sandbox_id, "a session with a sandbox is served"
    assert await store.count_sandboxes("alice") == 2 and gateway.backend.creates == 1


@pytest.mark.stores
async def test_a_shared_sandboxs_store_credential_reaches_its_volumes_sessions_and_no_others(redis_url: str) -> None:
    installation = f"t{secrets.token_hex(4)}"
    conversations = StoredConversations(redis_url, installation)
    backend = MemoryBackend()
    credentialed = CredentialedBackend(backend, conversations)
    store = MemoryRoutingStore()
    gateway = Scoped("tenant", credentialed, store, sessions_per_sandbox=2, conversations=conversations)
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)

    async def reach(route: Route) -> str:
        acl = await admin.acl_getuser(sandbox_user(installation, str(route.sandbox_id)))
        return " ".join(acl["keys"]) if acl is not None else ""

    try:
        s1, s2, s3 = await seat_all(gateway, "alice", "s1", "s2", "s3")
        (b1,) = await seat_all(gateway, "bob", "s1")
        assert s1.sandbox_id == s2.sandbox_id != s3.sandbox_id
        shared_keys = await reach(s1)
        for route, reached in ((s1, True), (s2, True), (s3, False), (b1, False)):
            assert (conversations.stored_id(route.tenant, route.session_id) in shared_keys) is reached, route
        shared = gateway.shared()
        assert shared is not None and await shared.forget(s2, erased=True)
        assert conversations.stored_id("alice", "s2") not in await reach(s1), "a deleted session leaves the grant"
        assert conversations.stored_id("alice", "s1") in await reach(s1)
    finally:
        await admin.aclose()
        await credentialed.aclose()
        await conversations.aclose()
