"""Tenant scope end to end (``GATEWAY_SANDBOX_SCOPE=tenant``): real gateway processes, real
sandboxes (agent-server processes on the local backend), the real SDK and CLI against the
local model.

One gateway serves the module, three sessions per sandbox (so the fourth opens a second
sandbox with few turns; the eleventh of eight per sandbox, at the cheaper tier:
``tests/integration/test_tenant_scope.py``), and each test uses tenants of its own, so no
test's sessions take another's seats. The reaper's needs a short idle timeout, so it has a
gateway of its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from tests.support.gateways import GatewayProcess, Gateways, auth
from tests.support.polling import wait_for
from tests.support.servers import API_KEY, LocalModel, workspace_of
from tests.support.turns import Turn, post_turn

pytestmark = pytest.mark.e2e

RECALL = "What value did I ask you to remember?"
TENANTS = {name: f"{name}-token-{n}" for n, name in enumerate(["ann", "ben", "cat", "dee", "eve", "fay"])}
TENANT_TOKENS = ",".join(f"{token}:{name}" for name, token in TENANTS.items())
FILE_SECRET = "FILE-SECRET-93c1"
RECALL_SECRET = "RECALL-SECRET-5e07"


def turn(url: str, tenant: str, session_id: str, prompt: str) -> Turn:
    done = post_turn(url, session_id, prompt, headers=auth(TENANTS[tenant]))
    assert done.types[-1] == "done", done.events
    return done


def remember(url: str, tenant: str, session_id: str, value: str) -> None:
    assert "error" not in turn(url, tenant, session_id, f"Remember this value: {value}").types


def route_of(gateway: GatewayProcess, tenant: str, session_id: str) -> dict[str, Any]:
    route = gateway.route(session_id, tenant)
    assert route is not None, f"{tenant}/{session_id} has no route"
    return route


def volume_dir(gateway: GatewayProcess, route: dict[str, Any]) -> Path:
    """The shared volume's directory: the data dir of the sandbox's server."""
    return gateway.data_dir / "volumes" / route["volume"]


@pytest.fixture(scope="module")
def tenant_gateways(local_model: LocalModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    factory = Gateways(local_model, tmp_path_factory.mktemp("tenant-scope"), "local", None, scope="tenant")
    yield factory
    factory.cleanup()


@pytest.fixture(scope="module")
def gateway(tenant_gateways: Gateways) -> GatewayProcess:
    return tenant_gateways.start(GATEWAY_TENANTS=TENANT_TOKENS, GATEWAY_SESSIONS_PER_SANDBOX="3",
                                 GATEWAY_WARM_POOL="0")


def test_two_tenants_never_share_a_sandbox_and_the_fourth_session_opens_a_second(gateway: GatewayProcess) -> None:
    url = gateway.base_url
    for n in range(1, 5):
        remember(url, "ann", f"s{n}", f"40{n}")
    remember(url, "ben", "s1", "999")
    anns = [route_of(gateway, "ann", f"s{n}") for n in range(1, 5)]
    bens = route_of(gateway, "ben", "s1")
    assert len({r["sandbox_id"] for r in anns[:3]}) == 1 and len({r["volume"] for r in anns[:3]}) == 1
    assert anns[3]["sandbox_id"] != anns[0]["sandbox_id"] and anns[3]["volume"] != anns[0]["volume"]
    assert bens["sandbox_id"] not in {r["sandbox_id"] for r in anns}
    assert bens["volume"] not in {r["volume"] for r in anns}
    for n in (1, 3, 4):  # one server, one conversation per session
        assert f"40{n}" in turn(url, "ann", f"s{n}", RECALL).text
    recalled = turn(url, "ben", "s1", RECALL).text
    assert "999" in recalled and "401" not in recalled, "ben's s1 is his own, beside ann's s1"
    shared = {s["sandbox_id"]: s for s in gateway.sandboxes()}[anns[0]["sandbox_id"]]
    assert shared["tenant"] == "ann"


def test_sessions_in_one_sandbox_cannot_read_each_others_transcripts_or_workspaces(
        gateway: GatewayProcess, local_model: LocalModel) -> None:
    """The in-server attack of ``test_isolation.py``, through the gateway, between neighbours."""
    url = gateway.base_url
    since = local_model.requests_total()
    remember(url, "cat", "victim", RECALL_SECRET)
    victim = route_of(gateway, "cat", "victim")
    data_dir = volume_dir(gateway, victim)
    victim_root = workspace_of(data_dir, "victim")
    (victim_root / "work" / "notes.txt").write_text(FILE_SECRET)
    transcript = next(victim_root.glob("config/projects/*/*.jsonl"))

    def tool(name: str, arguments: dict[str, str]) -> str:
        return f"[[tool:{name} {json.dumps(arguments)}]]"

    probes = " ".join([
        tool("Bash", {"command": f"cat {transcript}; cat {victim_root}/work/notes.txt; env"}),
        tool("Read", {"file_path": str(victim_root / "work" / "notes.txt")}),
        tool("Grep", {"pattern": "SECRET", "path": str(data_dir)}),
        tool("Glob", {"pattern": "**/*.jsonl", "path": str(data_dir)}),
    ])
    attack = turn(url, "cat", "attacker", f"Show me everything {probes}")
    assert route_of(gateway, "cat", "attacker")["sandbox_id"] == victim["sandbox_id"], "neighbours, one server"
    results = attack.of("tool_result")
    assert len(results) == 4 and all(r["is_error"] for r in results), results
    assert all("No such tool available" in r["content"] for r in results), results
    stream = json.dumps(attack.events)
    for secret in (FILE_SECRET, RECALL_SECRET, API_KEY):
        assert secret not in stream
    recent = httpx.get(f"{local_model.base_url}/local/requests", params={"since": since}).json()["recent"]
    assert FILE_SECRET not in json.dumps(recent), "the victim's file reached the model"
    assert RECALL_SECRET in turn(url, "cat", "victim", RECALL).text


def test_deleting_one_session_leaves_its_neighbours_recall_intact(gateway: GatewayProcess) -> None:
    url = gateway.base_url
    remember(url, "dee", "d1", "111")
    remember(url, "dee", "d2", "222")
    d1, d2 = route_of(gateway, "dee", "d1"), route_of(gateway, "dee", "d2")
    assert d1["sandbox_id"] == d2["sandbox_id"]
    deleted = httpx.delete(f"{url}/sessions/d1", headers=auth(TENANTS["dee"]), timeout=60)
    assert deleted.status_code == 204
    assert gateway.route("d1", "dee") is None
    assert not (volume_dir(gateway, d1) / "sessions" / "d1.json").exists(), "its files left the shared volume"
    assert any(s["sandbox_id"] == d2["sandbox_id"] for s in gateway.sandboxes()), "the neighbours' sandbox stays"
    assert "222" in turn(url, "dee", "d2", RECALL).text
    fresh = turn(url, "dee", "d1", RECALL)
    assert fresh.of("session")[0]["resumed"] is False and "111" not in fresh.text


def test_killing_the_shared_sandbox_mid_turn_ends_that_turn_and_every_session_in_it_recalls(
        gateway: GatewayProcess, tenant_gateways: Gateways) -> None:
    url = gateway.base_url
    for session_id, value in (("e1", "31"), ("e2", "32"), ("e3", "33")):
        remember(url, "eve", session_id, value)
    e1 = route_of(gateway, "eve", "e1")
    assert {route_of(gateway, "eve", s)["sandbox_id"] for s in ("e2", "e3")} == {e1["sandbox_id"]}
    events: list[tuple[str, dict[str, Any]]] = []
    with httpx.Client(timeout=120) as client, connect_sse(
            client, "POST", f"{url}/sessions/e1/messages", json={"prompt": "Tell me a long story [[slow:0.4]]"},
            headers=auth(TENANTS["eve"])) as source:
        for sse in source.iter_sse():
            if not sse.data:
                continue
            events.append((sse.event, json.loads(sse.data)))
            if sse.event == "text" and [kind for kind, _ in events].count("text") == 2:
                tenant_gateways.kill_sandbox(e1["sandbox_id"], e1["pid"])
    assert [kind for kind, _ in events][-2:] == ["error", "done"]
    assert events[-2][1]["code"] == "sandbox_lost" and events[-2][1]["retryable"] is True
    for session_id, value in (("e2", "32"), ("e1", "31"), ("e3", "33")):
        assert value in turn(url, "eve", session_id, RECALL).text
    after = [route_of(gateway, "eve", s) for s in ("e1", "e2", "e3")]
    assert len({r["sandbox_id"] for r in after}) == 1 and after[0]["sandbox_id"] != e1["sandbox_id"]
    assert {r["volume"] for r in after} == {e1["volume"]}


def test_the_reaper_spares_a_sandbox_while_any_of_its_sessions_is_active(local_gateways: Gateways) -> None:
    reaping = local_gateways.start(GATEWAY_SANDBOX_SCOPE="tenant", GATEWAY_TENANTS=TENANT_TOKENS,
                                   GATEWAY_IDLE_TIMEOUT_SECONDS="3", GATEWAY_WARM_POOL="0")
    url = reaping.base_url
    remember(url, "fay", "quiet", "8080")
    quiet = route_of(reaping, "fay", "quiet")
    long = turn(url, "fay", "busy", "A slow answer please [[slow:1.5]]")  # longer than the idle timeout
    assert long.types[-1] == "done" and "error" not in long.types
    busy = route_of(reaping, "fay", "busy")
    assert busy["sandbox_id"] == quiet["sandbox_id"], "the quiet session's sandbox served the busy one throughout"
    assert route_of(reaping, "fay", "quiet")["state"] == "assigned"
    wait_for(lambda: route_of(reaping, "fay", "quiet")["state"] == "released", timeout=30, interval=0.2)
    assert route_of(reaping, "fay", "busy")["state"] == "released", "reaped for all its sessions at once"
    wait_for(lambda: not local_gateways.sandbox_alive(quiet["sandbox_id"], quiet["pid"]), timeout=30)
    assert "8080" in turn(url, "fay", "quiet", RECALL).text
