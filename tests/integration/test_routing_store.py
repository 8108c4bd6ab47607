"""The routing store's atomic steps, against both implementations (Redis for real): routes,
locks (and ``holding``), the warm pool's entries and its window of claims, and tenant scope's
shared volumes."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable

import pytest
import redis.asyncio as aioredis

from hosting.gateway.routing.protocols import RoutingStore
from hosting.gateway.routing.records import PoolEntry, Route, SharedVolume
from hosting.locks import Locks, MemoryLocks, RedisLocks, holding
from hosting.sandboxes.base import Sandbox
from tests.support.polling import wait_for_async


def pooled(n: int) -> PoolEntry:
    return PoolEntry(Sandbox(f"sbx-{n}", "memory", f"http://sbx-{n}", f"vol-{n}"), token=f"token-{n}")


@pytest.mark.stores
async def test_route_round_trip_touch_and_compare_and_release(store: RoutingStore) -> None:
    route = Route("s1", "alice", "vol-1").with_sandbox(Sandbox("sbx-1", "local", "http://a", "vol-1", pid=7), "tk")
    await store.put(route)
    assert route.key == "alice/s1" and await store.get("alice/s1") == route
    assert await store.get("bob/s1") is None, "another tenant's s1 is another session"
    await store.touch("alice/s1")
    assert (touched := await store.get("alice/s1")) is not None and touched.last_activity >= route.last_activity
    await store.touch("alice/nobody")
    assert await store.get("alice/nobody") is None
    assert not await store.release("alice/s1", "sbx-other")
    assert await store.release("alice/s1", "sbx-1")
    assert not await store.release("alice/s1", "sbx-1")
    released = await store.get("alice/s1")
    assert released is not None and released.sandbox_id is None and released.token is None and released.volume == "vol-1"
    assert [r.session_id for r in await store.routes()] == ["s1"]
    await store.delete("alice/s1")
    assert await store.get("alice/s1") is None and await store.routes() == []


@pytest.mark.stores
async def test_a_lock_is_released_only_by_its_holder_and_expires(store: RoutingStore) -> None:
    token = await store.locks.acquire("provision:s1", 0.3)
    assert token is not None
    assert await store.locks.acquire("provision:s1", 0.3) is None
    assert not await store.locks.release("provision:s1", "not-the-holder")
    assert await store.locks.acquire("provision:s1", 0.3) is None
    newer = await wait_for_async(lambda: store.locks.acquire("provision:s1", 5), timeout=5)  # once the first expired
    assert not await store.locks.release("provision:s1", token), "an expired holder must not release the new one"
    assert await store.locks.release("provision:s1", newer)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.stores)])
async def locks(request: pytest.FixtureRequest) -> AsyncIterator[Locks]:
    """Each lock implementation: in memory, and Redis for real (own key prefix per test)."""
    if request.param == "memory":
        yield MemoryLocks()
        return
    connection = aioredis.Redis.from_url(request.getfixturevalue("redis_url"))
    yield RedisLocks(connection, f"t{secrets.token_hex(4)}:lock:")
    await connection.aclose()


async def test_holding_tells_whether_it_holds_and_releases_however_the_block_ends(locks: Locks) -> None:
    async with holding(locks, "l", 5) as held:
        assert held
        async with holding(locks, "l", 5) as again:
            assert not again, "held elsewhere: one try"
    with pytest.raises(RuntimeError):
        async with holding(locks, "l", 5) as held:
            assert held, "released on the way out"
            raise RuntimeError
    entered = asyncio.Event()

    async def hold_until_cancelled() -> None:
        async with holding(locks, "l", 5) as held:
            assert held, "released when the block raised"
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(hold_until_cancelled())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    token = await locks.acquire("l", 5)
    assert token is not None, "released when the block was cancelled"
    assert await locks.release("l", token)


async def test_holding_waits_up_to_wait_seconds_for_the_holder(locks: Locks) -> None:
    token = await locks.acquire("w", 5)
    assert token is not None
    started = time.monotonic()
    async with holding(locks, "w", 5, wait_seconds=0.3) as held:
        assert not held
    assert 0.1 <= time.monotonic() - started < 2, "asked again, then gave up"

    async def release_soon() -> None:
        await asyncio.sleep(0.2)
        assert await locks.release("w", token)

    releasing = asyncio.create_task(release_soon())
    async with holding(locks, "w", 5, wait_seconds=5) as held:
        assert held, "taken once its holder let go"
    await releasing


async def test_holding_leaves_alone_a_lock_taken_after_its_own_lapsed(locks: Locks) -> None:
    async with holding(locks, "x", 0.2) as held:
        assert held
        await asyncio.sleep(0.3)
        newer = await locks.acquire("x", 5)
        assert newer is not None, "lapsed"
    assert await locks.acquire("x", 5) is None, "the newer holder still holds it"
    assert await locks.release("x", newer)


@pytest.mark.stores
async def test_each_pooled_sandbox_goes_to_one_taker(store: RoutingStore) -> None:
    for n in range(5):
        await store.pool_put(pooled(n))
    taken = await asyncio.gather(*(store.pool_take() for _ in range(12)))
    got = [entry.sandbox.sandbox_id for entry in taken if entry is not None]
    assert sorted(got) == [f"sbx-{n}" for n in range(5)]
    assert all(entry.token == f"token-{entry.sandbox.sandbox_id[4:]}" for entry in taken if entry is not None)
    await store.pool_put(pooled(9))
    assert [await store.pool_remove("sbx-9"), await store.pool_remove("sbx-9")] == [True, False]
    assert await store.pool_entries() == []


@pytest.mark.stores
async def test_recorded_events_all_count_until_they_leave_the_window(store: RoutingStore) -> None:
    """The warm pool's claims: every one counts (no limit refuses any), each for the window's length."""
    for _ in range(12):
        await store.record_rate("pool-claims", 0.5)
    assert await store.count_rate("pool-claims", 0.5) == 12
    assert await store.count_rate("other-claims", 0.5) == 0
    await wait_for_async(lambda: _is_zero(store.count_rate("pool-claims", 0.5)), timeout=5)
    await store.record_rate("pool-claims", 0.5)
    assert await store.count_rate("pool-claims", 0.5) == 1


async def _is_zero(count: Awaitable[int]) -> bool:
    return await count == 0


@pytest.mark.stores
async def test_shared_volumes_are_kept_per_tenant_whole(store: RoutingStore) -> None:
    sandbox = Sandbox("sbx-1", "local", "http://a", "vol-a", tenant="alice", pid=7)
    alices = SharedVolume("alice", "vol-a", ("s1", "s2"), sandbox, "tk", purge=("old",))
    empty = SharedVolume("alice", "vol-b")
    bobs = SharedVolume("bob", "vol-c", ("s1",))
    for volume in (alices, empty, bobs):
        await store.put_shared_volume(volume)
    assert sorted(await store.shared_tenants()) == ["alice", "bob"]
    assert sorted(await store.shared_volumes("alice"), key=lambda v: v.volume) == [alices, empty]
    assert await store.shared_volumes("bob") == [bobs] and await store.shared_volumes("carol") == []
    left = alices.unseated("s1", purge=True).without_sandbox()
    await store.put_shared_volume(left)
    assert left.seats == ("s2",) and left.purge == ("old", "s1") and left.token is None
    assert sorted(await store.shared_volumes("alice"), key=lambda v: v.volume) == [left, empty]
    await store.remove_shared_volume("bob", "vol-c")
    assert await store.shared_volumes("bob") == [] and await store.shared_tenants() == ["alice"]
