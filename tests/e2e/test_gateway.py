"""The gateway end to end: real gateway processes, real sandboxes (agent-server processes or
Docker containers), the real SDK and CLI against the local model, real Redis.

The tests that depend on how sandboxes run take the ``gateways`` fixture and run on both
backends; those about backend-agnostic logic use the local backend only. Those whose behaviour
the sandbox scope changes (provisioning, replacement, reaping, deletion, reconciliation) take
``scoped_gateways`` and run in tenant scope too, on the local backend; a sandbox killed
mid-turn ends its stream the same way in either scope (in tenant scope, with its neighbours:
``test_gateway_tenant_scope.py``).
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from harness.processes import descendants
from tests.support import ROOT
from tests.support.gateways import ADMIN, ALICE, BOB, Gateways, auth
from tests.support.polling import wait_for
from tests.support.turns import Turn, event_order, post_turn

pytestmark = pytest.mark.e2e

RECALL = "What value did I ask you to remember?"


def turn(base_url: str, session_id: str, prompt: str, token: str = ALICE) -> Turn:
    return post_turn(base_url, session_id, prompt, headers=auth(token))


def _answers(url: str, session_id: str, token: str) -> list[tuple[str, int, str, bytes]]:
    """What every route of a session answers a tenant, without a turn: status, type, body."""
    answers = []
    for method, path in (("GET", ""), ("DELETE", ""), ("POST", "/interrupt"), ("GET", "/events")):
        got = httpx.request(method, f"{url}/sessions/{session_id}{path}", headers=auth(token), timeout=30)
        answers.append((f"{method} {path}", got.status_code, got.headers.get("content-type", ""), got.content))
    return answers


def assert_no_turn_running(url: str, session_id: str) -> None:
    """Interrupt with no turn running: 409 told apart from a busy session's by its code."""
    idle = httpx.post(f"{url}/sessions/{session_id}/interrupt", headers=auth(ALICE), timeout=30)
    assert (idle.status_code, idle.json()["code"], "retry-after" in idle.headers) == (409, "no_turn_running", False)


def test_two_tenants_on_one_id_have_two_conversations_and_cannot_see_each_other(scoped_gateways: Gateways) -> None:
    gateways = scoped_gateways
    gateway = gateways.start()
    url = gateway.base_url
    unused = _answers(url, "trip-1", BOB)
    assert [status for _, status, _, _ in unused] == [404, 404, 404, 404]

    first = turn(url, "trip-1", "Remember this value: 4471")
    assert first.types[0] == "session" and first.types[-1] == "done" and "error" not in first.types
    assert "4471" in turn(url, "trip-1", RECALL).text
    assert _answers(url, "trip-1", BOB) == unused, "bob learns nothing of alice's trip-1, byte for byte"

    bobs = turn(url, "trip-1", "Remember this value: 9090", token=BOB)
    assert bobs.of("session")[0]["resumed"] is False, "bob's trip-1 is a new conversation"
    assert "9090" in (recalled := turn(url, "trip-1", RECALL, token=BOB).text) and "4471" not in recalled
    assert "4471" in (recalled := turn(url, "trip-1", RECALL).text) and "9090" not in recalled

    assert_no_turn_running(url, "trip-1")  # the sandbox's answer, relayed
    described = httpx.get(f"{url}/sessions/trip-1", headers=auth(ALICE), timeout=30)
    assert described.status_code == 200 and described.json()["has_history"] is True
    both = gateway.admin("sessions/trip-1")
    assert both.status_code == 409 and "?tenant=" in both.json()["detail"]
    route, bobs_route = gateway.route("trip-1", "alice"), gateway.route("trip-1", "bob")
    assert route is not None and route["tenant"] == "alice" and route["state"] == "assigned"
    assert bobs_route is not None and bobs_route["sandbox_id"] != route["sandbox_id"]
    assert bobs_route["volume"] != route["volume"]
    assert set(route) >= {"session_id", "tenant", "sandbox_id", "backend", "address", "state", "last_activity"}
    assert route["backend"] == gateways.backend
    assert ("pid" in route) == (gateways.backend == "local")

    deleted = httpx.delete(f"{url}/sessions/trip-1", headers=auth(ALICE), timeout=60)
    assert deleted.status_code == 204
    assert gateway.route("trip-1", "alice") is None
    assert gateway.route("trip-1") == gateway.route("trip-1", "bob"), "one tenant uses the id now"
    assert not gateways.sandbox_alive(route["sandbox_id"], route.get("pid"))
    assert _answers(url, "trip-1", ALICE) == unused, "a deleted session answers like an unknown one"
    fresh = turn(url, "trip-1", RECALL)
    assert fresh.of("session")[0]["resumed"] is False and "4471" not in fresh.text
    assert "9090" in turn(url, "trip-1", RECALL, token=BOB).text, "alice's delete left bob's trip-1 alone"


def test_refusals_happen_before_anything_is_provisioned(local_gateways: Gateways) -> None:
    """Every case in process (tests/unit/test_gateway_refusals.py); here one per behaviour, for real."""
    gateway = local_gateways.start()
    url = gateway.base_url
    before = {s["sandbox_id"] for s in gateway.sandboxes()}
    post = f"{url}/sessions/s-1/messages"
    assert httpx.post(post, json={"prompt": "hi"}, headers=auth("wrong")).status_code == 401
    assert httpx.post(f"{url}/sessions/bad.id/messages", json={"prompt": "hi"}, headers=auth(ALICE)).status_code == 400
    big = json.dumps({"prompt": "x" * 300_000}).encode()

    def chunks() -> Any:
        for start in range(0, len(big), 16384):
            yield big[start:start + 16384]

    chunked = httpx.post(post, content=chunks(), headers={**auth(ALICE), "content-type": "application/json"})
    assert chunked.status_code == 413
    assert gateway.route("s-1") is None
    assert {s["sandbox_id"] for s in gateway.sandboxes()} == before
    assert "must-not-leak" not in gateway.log() and ALICE not in gateway.log()


def test_without_tenants_the_gateway_refuses_to_start(local_gateways: Gateways) -> None:
    env = {k: v for k, v in local_gateways.env().items() if k != "GATEWAY_TENANTS"}
    proc = subprocess.run([sys.executable, "-m", "hosting.gateway"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "no tenant configured" in proc.stderr and "Traceback" not in proc.stderr


def _race(urls: list[str], session_id: str, count: int) -> list[tuple[int, str]]:
    """``count`` simultaneous first turns, alternating over ``urls``: (status, text)."""
    barrier = threading.Barrier(count)

    def one(i: int) -> tuple[int, str]:
        with httpx.Client(timeout=180) as client:
            barrier.wait()
            with connect_sse(client, "POST", f"{urls[i % len(urls)]}/sessions/{session_id}/messages",
                             json={"prompt": f"Remember this value: v{i}x"}, headers=auth(ALICE)) as source:
                if source.response.status_code != 200:
                    source.response.read()
                    return source.response.status_code, source.response.text
                return 200, "".join(json.loads(e.data).get("text", "") for e in source.iter_sse()
                                    if e.data and e.event == "text")

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def _assert_one_sandbox_one_conversation(gateways: Gateways, urls: list[str], results: list[tuple[int, str]]) -> None:
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 409}, results
    assert statuses.count(200) >= 1
    accepted = [i for i, (status, _) in enumerate(results) if status == 200]
    session_sandboxes = [s for s in httpx.get(f"{urls[0]}/admin/sandboxes", headers=auth(ADMIN)).json()["sandboxes"]
                         if s["session_id"] == "race"]
    route = httpx.get(f"{urls[0]}/admin/sessions/race", headers=auth(ADMIN)).json()
    claimed_from_pool = not session_sandboxes
    assert claimed_from_pool or [s["sandbox_id"] for s in session_sandboxes] == [route["sandbox_id"]]
    echo = turn(urls[-1], "race", "[[echo-request]]")
    for i in accepted:
        assert f"v{i}x" in echo.text, f"accepted turn {i} is missing from the conversation"
    for i in set(range(len(results))) - set(accepted):
        assert f"v{i}x" not in echo.text, f"refused turn {i} reached the model"


def test_twenty_simultaneous_first_turns_make_one_sandbox(local_gateways: Gateways) -> None:
    gateway = local_gateways.start()
    before = {s["sandbox_id"] for s in gateway.sandboxes()}
    results = _race([gateway.base_url], "race", 20)
    _assert_one_sandbox_one_conversation(local_gateways, [gateway.base_url], results)
    after = {s["sandbox_id"] for s in gateway.sandboxes()}
    route = gateway.route("race")
    assert route is not None
    new = after - before - {route["sandbox_id"]}
    assert new <= set(gateway.pool()["sandboxes"]), "only pool refills may have started besides the session's"


@pytest.mark.stores
def test_twenty_first_turns_across_two_replicas_on_redis(local_gateways: Gateways, redis_url: str) -> None:
    one = local_gateways.start(GATEWAY_REDIS_URL=redis_url)
    two = local_gateways.start(GATEWAY_REDIS_URL=redis_url)
    results = _race([one.base_url, two.base_url], "race", 20)
    _assert_one_sandbox_one_conversation(local_gateways, [one.base_url, two.base_url], results)
    route_one, route_two = one.route("race"), two.route("race")
    assert route_one is not None and route_one == route_two
    pool_ids = set(one.pool()["sandboxes"])
    session_ids = {route_one["sandbox_id"]}
    others = {s["sandbox_id"] for s in one.sandboxes()} - pool_ids - session_ids
    assert not others, f"sandboxes that are neither pooled nor the session's: {others}"


def test_a_killed_sandbox_is_replaced_and_the_conversation_resumes(scoped_gateways: Gateways) -> None:
    gateways = scoped_gateways
    gateway = gateways.start()
    url = gateway.base_url
    turn(url, "k-1", "Remember this value: 9182")
    route = gateway.route("k-1")
    assert route is not None
    gateways.kill_sandbox(route["sandbox_id"], route.get("pid"))
    wait_for(lambda: not gateways.sandbox_alive(route["sandbox_id"], route.get("pid")))
    again = turn(url, "k-1", RECALL)
    assert "9182" in again.text and again.of("session")[0]["resumed"] is True
    replaced = gateway.route("k-1")
    assert replaced is not None and replaced["sandbox_id"] != route["sandbox_id"]
    assert replaced["volume"] == route["volume"]


def test_a_sandbox_killed_mid_turn_ends_the_stream_with_sandbox_lost(gateways: Gateways) -> None:
    gateway = gateways.start()
    url = gateway.base_url
    turn(url, "m-1", "Remember this value: 5530")
    route = gateway.route("m-1")
    assert route is not None
    events: list[tuple[str, str, dict[str, Any]]] = []
    with httpx.Client(timeout=120) as client, connect_sse(
        client, "POST", f"{url}/sessions/m-1/messages", json={"prompt": "Tell me a long story [[slow:0.4]]"},
        headers=auth(ALICE),
    ) as source:
        for sse in source.iter_sse():
            if not sse.data:
                continue
            events.append((sse.event, sse.id, json.loads(sse.data)))
            if sse.event == "text" and len([e for e in events if e[0] == "text"]) == 2:
                gateways.kill_sandbox(route["sandbox_id"], route.get("pid"))
    kinds = [kind for kind, _, _ in events]
    assert kinds[-2:] == ["error", "done"], kinds
    error = events[-2][2]
    assert error["code"] == "sandbox_lost" and error["retryable"] is True and error["v"] == 1
    ids = [event_order(event_id) for _, event_id, _ in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert "5530" in turn(url, "m-1", RECALL).text


def test_first_turns_claim_warm_sandboxes_and_the_pool_refills(scoped_gateways: Gateways) -> None:
    gateways = scoped_gateways
    gateway = gateways.start(GATEWAY_WARM_POOL="2")
    pooled = set(gateway.pool()["sandboxes"])
    assert len(pooled) == 2
    turn(gateway.base_url, "w-1", "Remember this value: 1")
    first = gateway.route("w-1")
    assert first is not None and first["sandbox_id"] in pooled
    gateway.wait_pool_full()
    refilled = set(gateway.pool()["sandboxes"])
    assert first["sandbox_id"] not in refilled and len(refilled) == 2

    dead = sorted(refilled)[0]
    info = next(s for s in gateway.sandboxes() if s["sandbox_id"] == dead)
    gateways.kill_sandbox(dead, info.get("pid"))
    wait_for(lambda: not gateways.sandbox_alive(dead, info.get("pid")))
    for i in range(2, 4):
        turn(gateway.base_url, f"w-{i}", "Remember this value: 2")
        route = gateway.route(f"w-{i}")
        assert route is not None and route["sandbox_id"] != dead, "a dead pooled sandbox was handed out"


def sandbox_status(route: dict[str, Any]) -> dict[str, Any]:
    """``GET /ready`` of a local sandbox's server, with the token from its environment."""
    environ = Path(f"/proc/{route['pid']}/environ").read_bytes().split(b"\0")
    token = next(entry.split(b"=", 1)[1].decode() for entry in environ if entry.startswith(b"AGENT_AUTH_TOKEN="))
    return httpx.get(f"{route['address']}/ready", headers=auth(token), timeout=10).json()


def test_without_a_pool_a_sandbox_starts_on_demand_with_one_cli_for_its_session(local_gateways: Gateways) -> None:
    gateway = local_gateways.start(GATEWAY_WARM_POOL="0")
    assert gateway.pool()["sandboxes"] == []
    first = turn(gateway.base_url, "d-1", "Remember this value: 77")
    route = gateway.route("d-1")
    assert route is not None
    # A sandbox holds one session (AGENT_SESSION_CAPACITY=1): no CLI is started that no session would take.
    assert (sandbox_status(route)["prewarm_target"], sandbox_status(route)["prewarmed"]) == (0, 0)
    wait_for(lambda: len(descendants(route["pid"])) == 1 and sandbox_status(route)["live_clis"] == 1)
    assert "77" in first.text + turn(gateway.base_url, "d-1", RECALL).text
    assert gateway.pool()["sandboxes"] == []


def test_the_reaper_removes_idle_sandboxes_but_never_a_streaming_one(scoped_gateways: Gateways) -> None:
    gateways = scoped_gateways
    gateway = gateways.start(GATEWAY_IDLE_TIMEOUT_SECONDS="3", GATEWAY_WARM_POOL="0")
    url = gateway.base_url
    turn(url, "r-1", "Remember this value: 6061")
    route = gateway.route("r-1")
    assert route is not None
    wait_for(lambda: (gateway.route("r-1") or {}).get("state") == "released", timeout=30, interval=0.2)
    wait_for(lambda: not gateways.sandbox_alive(route["sandbox_id"], route.get("pid")), timeout=30)
    assert_no_turn_running(url, "r-1")  # the gateway's own answer: no sandbox, so no turn
    assert "6061" in turn(url, "r-1", RECALL).text

    started = time.monotonic()
    long = turn(url, "r-1", "A slow answer please [[slow:1.5]]")
    assert time.monotonic() - started > 6, "the turn must stream longer than the idle timeout"
    assert long.types[-1] == "done" and "error" not in long.types


@pytest.mark.stores
def test_a_restarted_gateway_readopts_sandboxes_and_removes_orphans(scoped_gateways: Gateways, redis_url: str) -> None:
    gateways = scoped_gateways
    gateway = gateways.start(GATEWAY_REDIS_URL=redis_url)
    turn(gateway.base_url, "g-1", "Remember this value: 3141")
    route = gateway.route("g-1")
    assert route is not None
    assert gateway.terminate() == 0
    if gateways.backend == "local":
        # Local sandboxes are children of the gateway (parent-death signal): gone with it.
        wait_for(lambda: not gateways.sandbox_alive(route["sandbox_id"], route.get("pid")))
    orphan = _start_orphan(gateways)
    restarted = gateways.start(GATEWAY_REDIS_URL=redis_url)
    ids = {s["sandbox_id"] for s in restarted.sandboxes()}
    assert orphan not in ids, "a sandbox the routing store does not know must be removed"
    if gateways.backend == "docker":
        assert route["sandbox_id"] in ids and restarted.route("g-1") == route, "a known sandbox is re-adopted"
    assert "3141" in turn(restarted.base_url, "g-1", RECALL).text
    if gateways.backend == "docker":
        assert (restarted.route("g-1") or {})["sandbox_id"] == route["sandbox_id"]


def _start_orphan(gateways: Gateways) -> str:
    """A sandbox of this installation that no routing store knows (as if its gateway died
    between starting it and recording it)."""
    import asyncio

    from hosting.gateway.provisioning import new_spec
    from hosting.gateway.settings import GatewaySettings
    from hosting.sandboxes.settings import open_backend

    settings = GatewaySettings.from_env(gateways.env())
    backend = open_backend(settings.sandboxes)

    async def create() -> str:
        sandbox = await backend.create(new_spec(settings.sandbox_env, "orphan-1", "alice"))
        await backend.aclose()
        return sandbox.sandbox_id

    sandbox_id = asyncio.run(create())
    assert re.fullmatch(r"sbx-[0-9a-f]{16}", sandbox_id)
    return sandbox_id
