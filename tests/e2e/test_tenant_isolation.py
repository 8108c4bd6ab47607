"""Tenants behind one gateway cannot reach each other's conversations, even when the
routes are lost or a sandbox is compromised (real gateway and servers, real Redis and
PostgreSQL, the local model).

- Lost routes lose nothing and leak nothing: alice and bob both use ``trip``; the
  gateway is replaced (routes in memory), or the routing Redis is flushed; each tenant's
  next turn resumes *its own* conversation from the session store.
- A sandbox holds a store credential for its own session only: the one in its
  environment cannot read or write another session's entries, and the gateway's own
  store URL is in no sandbox's environment.
- Routes and stored conversations from before session ids were per tenant keep working
  for their owner.
- Retention: a session unused past ``GATEWAY_SESSION_TTL_SECONDS`` is deleted whole; one
  with a running turn stays.

All but the upgrade from before per-tenant ids run in both sandbox scopes (``scope``): in
tenant scope too, each tenant's sessions are on sandboxes of their own.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from hosting.contract import STORE_PROJECT_KEY, durable_session_id
from hosting.stores import open_session_store
from tests.support.gateways import ALICE, BOB, GatewayProcess, Gateways, auth, open_turn
from tests.support.polling import wait_for
from tests.support.scopes import SCOPES
from tests.support.stores import running_redis
from tests.support.turns import post_turn

pytestmark = pytest.mark.e2e

RECALL = "What value did I ask you to remember?"


def remember(url: str, session_id: str, value: str, token: str) -> None:
    turn = post_turn(url, session_id, f"Remember this value: {value}", headers=auth(token))
    assert "error" not in turn.types, turn.events


def recalled(url: str, session_id: str, token: str) -> str:
    turn = post_turn(url, session_id, RECALL, headers=auth(token))
    assert "error" not in turn.types, turn.events
    return turn.text


def sandbox_environment(gateway: GatewayProcess, session_id: str, tenant: str) -> dict[str, str]:
    """What the tenant's session's sandbox (a local server process) was started with."""
    route = gateway.route(session_id, tenant)
    assert route is not None and route["pid"]
    raw = Path(f"/proc/{route['pid']}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def stored(url: str, installation: str, tenant: str | None, session_id: str) -> list[dict[str, Any]]:
    """The entries the store holds for a session, read with the store's own (admin) URL."""
    sdk_id = durable_session_id(session_id, f"{installation}/{tenant}" if tenant else None)

    async def load() -> list[dict[str, Any]]:
        store = open_session_store(url, ttl_seconds=None)
        try:
            return list(await store.load({"project_key": STORE_PROJECT_KEY, "session_id": sdk_id}) or [])
        finally:
            await store.aclose()

    return asyncio.run(load())


def assert_bobs_credential_reaches_bobs_session_only(gateway: GatewayProcess, store_url: str, installation: str,
                                                     session: str) -> None:
    """Bob's sandbox's store credential, read from its environment, against alice's entries."""
    own_url = sandbox_environment(gateway, session, "bob")["AGENT_SESSION_STORE"]
    alices_before = stored(store_url, installation, "alice", session)
    assert alices_before and stored(store_url, installation, "bob", session)
    alice = {"project_key": STORE_PROJECT_KEY, "session_id": durable_session_id(session, f"{installation}/alice")}
    bob = {"project_key": STORE_PROJECT_KEY, "session_id": durable_session_id(session, f"{installation}/bob")}

    async def attack() -> tuple[list[Any] | None, list[Any] | None]:
        store = open_session_store(own_url, ttl_seconds=None)
        try:
            try:
                read: list[Any] | None = await store.load(alice)  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001 - refused outright is as good as nothing
                read = None
            for attempt in (store.append(alice, [{"type": "user", "uuid": str(uuid.uuid4())}]),  # type: ignore[arg-type]
                            store.fence(alice, 2**62), store.delete(alice)):  # type: ignore[arg-type]
                try:
                    await attempt
                except Exception:  # noqa: BLE001 - refused: the point
                    pass
            return read, await store.load(bob)  # type: ignore[arg-type]
        finally:
            await store.aclose()

    read, own = asyncio.run(attack())
    assert not read, "bob's sandbox read alice's conversation"
    assert own, "the credential does reach its own session"
    assert stored(store_url, installation, "alice", session) == alices_before, "alice's entries were changed"


@pytest.mark.parametrize("scope", SCOPES)
def test_a_replaced_gateway_resumes_each_tenants_own_conversation(local_gateways: Gateways, redis_url: str,
                                                                   scope: str) -> None:
    local_gateways.scope = scope
    store_url, session = redis_url, f"trip-{uuid.uuid4().hex[:6]}"
    first = local_gateways.start(AGENT_SESSION_STORE=store_url, GATEWAY_WARM_POOL="0")
    remember(first.base_url, session, "4471", ALICE)
    remember(first.base_url, session, "9090", BOB)

    alices, bobs = sandbox_environment(first, session, "alice"), sandbox_environment(first, session, "bob")
    assert alices["AGENT_SESSION_STORE"] not in (store_url, bobs["AGENT_SESSION_STORE"])
    for name, value in {**alices, **bobs}.items():
        assert store_url not in value, f"the gateway's store URL reached a sandbox in {name}"
    assert_bobs_credential_reaches_bobs_session_only(first, store_url, local_gateways.installation, session)

    first.stop()  # routes in memory: gone with it, and so are its sandboxes
    second = local_gateways.start(AGENT_SESSION_STORE=store_url, GATEWAY_WARM_POOL="0")
    assert second.route(session) is None
    assert "9090" in (text := recalled(second.base_url, session, BOB)) and "4471" not in text
    assert "4471" in (text := recalled(second.base_url, session, ALICE)) and "9090" not in text


@pytest.mark.parametrize("scope", SCOPES)
def test_a_flushed_routing_store_loses_nothing_and_leaks_nothing(local_gateways: Gateways, postgres_url: str,
                                                                 scope: str) -> None:
    local_gateways.scope = scope
    session = f"trip-{uuid.uuid4().hex[:6]}"
    with running_redis() as routes_url:
        gateway = local_gateways.start(AGENT_SESSION_STORE=postgres_url, GATEWAY_REDIS_URL=routes_url,
                                       GATEWAY_WARM_POOL="0")
        remember(gateway.base_url, session, "1234", ALICE)
        remember(gateway.base_url, session, "5678", BOB)
        assert_bobs_credential_reaches_bobs_session_only(gateway, postgres_url, local_gateways.installation, session)
        redis.Redis.from_url(routes_url).flushall()
        assert gateway.route(session) is None
        assert "5678" in (text := recalled(gateway.base_url, session, BOB)) and "1234" not in text
        assert "1234" in (text := recalled(gateway.base_url, session, ALICE)) and "5678" not in text


def test_routes_and_conversations_from_before_per_tenant_ids_keep_working_for_their_owner(
        local_gateways: Gateways, redis_url: str, postgres_url: str) -> None:
    session = f"old-{uuid.uuid4().hex[:6]}"
    env = {"AGENT_SESSION_STORE": postgres_url, "GATEWAY_REDIS_URL": redis_url, "GATEWAY_WARM_POOL": "0"}
    gateway = local_gateways.start(**env)
    remember(gateway.base_url, session, "2718", ALICE)
    route = gateway.route(session, "alice")
    assert route is not None
    gateway.stop()

    # Put the session back the way the previous release filed it: route keyed by the id alone,
    # conversation stored under the id alone; its volume is gone (as an emptyDir would be).
    installation = local_gateways.installation
    routing = redis.Redis.from_url(redis_url, decode_responses=True)
    prefix = f"gw:{installation}:"
    routing.rename(f"{prefix}route:alice/{session}", f"{prefix}route:{session}")
    routing.srem(f"{prefix}routes", f"alice/{session}")
    routing.sadd(f"{prefix}routes", session)

    async def refile() -> None:
        store = open_session_store(postgres_url, ttl_seconds=None)
        new = {"project_key": STORE_PROJECT_KEY, "session_id": durable_session_id(session, f"{installation}/alice")}
        old = {"project_key": STORE_PROJECT_KEY, "session_id": durable_session_id(session)}
        try:
            await store.append(old, await store.load(new) or [])  # type: ignore[arg-type]
            await store.delete(new)  # type: ignore[arg-type]
        finally:
            await store.aclose()

    asyncio.run(refile())
    volume = local_gateways.root / "gateway-data" / "volumes" / route["volume"]
    if volume.exists():
        import shutil

        shutil.rmtree(volume)

    upgraded = local_gateways.start(**env)
    assert routing.exists(f"{prefix}route:alice/{session}") and not routing.exists(f"{prefix}route:{session}")
    unknown = httpx.get(f"{upgraded.base_url}/sessions/{session}", headers=auth(BOB), timeout=30)
    assert unknown.status_code == 404
    assert "2718" in recalled(upgraded.base_url, session, ALICE)
    assert not stored(postgres_url, installation, None, session), "the copy under the id alone is gone"


@pytest.mark.parametrize("scope", SCOPES)
def test_a_session_past_its_ttl_is_gone_everywhere_and_one_with_a_running_turn_stays(
        local_gateways: Gateways, redis_url: str, scope: str) -> None:
    """The busy session is bob's, so that in tenant scope too the old one is alone on its
    volume and goes whole (a deleted session's neighbours: ``test_gateway_tenant_scope.py``)."""
    local_gateways.scope = scope
    old, busy = f"old-{uuid.uuid4().hex[:6]}", f"busy-{uuid.uuid4().hex[:6]}"
    gateway = local_gateways.start(AGENT_SESSION_STORE=redis_url, GATEWAY_WARM_POOL="0",
                                   GATEWAY_SESSION_TTL_SECONDS="4")
    remember(gateway.base_url, old, "7777", ALICE)
    route = gateway.route(old)
    assert route is not None and stored(redis_url, local_gateways.installation, "alice", old)
    with open_turn(gateway.base_url, busy, "[[delay:9]] Remember this value: 8888", token=BOB) as running:
        wait_for(lambda: gateway.route(old) is None, timeout=20)
        assert gateway.route(busy) is not None, "a session with a running turn is never swept"
        assert running.finish()[-1] == "done"
    assert not (local_gateways.root / "gateway-data" / "volumes" / route["volume"]).exists()
    assert not local_gateways.sandbox_alive(route["sandbox_id"], route["pid"])
    assert not stored(redis_url, local_gateways.installation, "alice", old)
    gone = httpx.get(f"{gateway.base_url}/sessions/{old}", headers=auth(ALICE), timeout=30)
    assert gone.status_code == 404, "a deleted session answers like an unknown one"
    assert "7777" not in recalled(gateway.base_url, old, ALICE)
