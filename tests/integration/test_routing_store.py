"""The routing store's atomic steps, against both implementations (Redis for real): routes,
the provisioning lock and the warm pool's entries."""

from __future__ import annotations

import asyncio

import pytest

from hosting.gateway.routes import PoolEntry, Route, RouteStore
from hosting.sandboxes.base import Sandbox
from tests.support.polling import wait_for_async


def pooled(n: int) -> PoolEntry:
    return PoolEntry(Sandbox(f"sbx-{n}", "memory", f"http://sbx-{n}", f"vol-{n}"), token=f"token-{n}")


@pytest.mark.stores
async def test_route_round_trip_touch_and_compare_and_release(store: RouteStore) -> None:
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
async def test_a_lock_is_released_only_by_its_holder_and_expires(store: RouteStore) -> None:
    token = await store.acquire("provision:s1", 0.3)
    assert token is not None
    assert await store.acquire("provision:s1", 0.3) is None
    assert not await store.release_lock("provision:s1", "not-the-holder")
    assert await store.acquire("provision:s1", 0.3) is None
    newer = await wait_for_async(lambda: store.acquire("provision:s1", 5), timeout=5)  # once the first expired
    assert not await store.release_lock("provision:s1", token), "an expired holder must not release the new one"
    assert await store.release_lock("provision:s1", newer)


@pytest.mark.stores
async def test_each_pooled_sandbox_goes_to_one_taker(store: RouteStore) -> None:
    for n in range(5):
        await store.pool_put(pooled(n))
    taken = await asyncio.gather(*(store.pool_take() for _ in range(12)))
    got = [entry.sandbox.sandbox_id for entry in taken if entry is not None]
    assert sorted(got) == [f"sbx-{n}" for n in range(5)]
    assert all(entry.token == f"token-{entry.sandbox.sandbox_id[4:]}" for entry in taken if entry is not None)
    await store.pool_put(pooled(9))
    assert [await store.pool_remove("sbx-9"), await store.pool_remove("sbx-9")] == [True, False]
    assert await store.pool_entries() == []
