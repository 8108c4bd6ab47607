"""Two gateway replicas on one Redis, as real processes with real sandboxes: the warm pool
stays at its target however the replicas race, the reaper removes each idle sandbox once,
and a replica killed mid-turn loses nothing: the turn finishes in its sandbox and the client
re-attaches through the other replica.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from tests.support.gateways import ALICE, Gateways, auth
from tests.support.polling import wait_for
from tests.support.turns import event_order, post_turn

pytestmark = [pytest.mark.e2e, pytest.mark.stores]

RECALL = "What value did I ask you to remember?"


@pytest.mark.timeout(600)
def test_ten_new_sessions_on_each_replica_never_grow_the_pool_past_its_target(local_gateways: Gateways,
                                                                              redis_url: str) -> None:
    target = 2
    replicas = [local_gateways.start(GATEWAY_REDIS_URL=redis_url, GATEWAY_WARM_POOL=str(target),
                                     GATEWAY_PROVISION_TIMEOUT_SECONDS="300") for _ in range(2)]
    replicas[1].wait_pool_full()
    pool_sizes: list[int] = []
    done = threading.Event()

    def watch_pool() -> None:
        while not done.is_set():
            try:
                pool_sizes.append(len(replicas[0].pool()["sandboxes"]))
            except httpx.TransportError:
                pass  # a busy replica: sample again
            time.sleep(0.1)

    watcher = threading.Thread(target=watch_pool)
    watcher.start()
    sessions = [(replica.base_url, f"burst-{n}-{i}") for n, replica in enumerate(replicas) for i in range(10)]
    try:
        with ThreadPoolExecutor(len(sessions)) as workers:
            turns = list(workers.map(lambda s: post_turn(s[0], s[1], f"Remember this value: {s[1]}",
                                                         headers=auth(ALICE), timeout=300), sessions))
        replicas[0].wait_pool_full()
    finally:
        done.set()
        watcher.join()
    assert all(t.types[-1] == "done" and "error" not in t.types for t in turns)
    assert max(pool_sizes) <= target, pool_sizes

    # Every sandbox ever started serves a session or waits in the pool: none was started
    # twice for one session or started and thrown away because two replicas refilled.
    routed = {replicas[0].route(session)["sandbox_id"] for _, session in sessions}
    pooled = set(replicas[0].pool()["sandboxes"])
    started = {log.stem for log in (replicas[0].data_dir / "sandboxes").glob("*.log")}
    assert len(routed) == len(sessions) and len(pooled) == target
    assert started == routed | pooled, started - routed - pooled


@pytest.mark.timeout(300)
def test_the_reapers_of_two_replicas_remove_each_idle_sandbox_once(local_gateways: Gateways, redis_url: str) -> None:
    replicas = [local_gateways.start(GATEWAY_REDIS_URL=redis_url, GATEWAY_WARM_POOL="0",
                                     GATEWAY_IDLE_TIMEOUT_SECONDS="3") for _ in range(2)]
    sessions = [f"idle-{n}" for n in range(4)]
    sandboxes = set()
    for n, session in enumerate(sessions):
        assert post_turn(replicas[n % 2].base_url, session, f"Remember this value: V{n}",
                         headers=auth(ALICE)).types[-1] == "done"
        sandboxes.add(replicas[0].route(session)["sandbox_id"])  # read at once: it may be reaped soon
    assert None not in sandboxes
    wait_for(lambda: all(replicas[0].route(s)["state"] == "released" for s in sessions), timeout=60, interval=0.3)
    time.sleep(3)  # a few more reaper passes on both replicas
    reaped = [found for replica in replicas
              for found in re.findall(r"reaped idle sandbox (sbx-[0-9a-f]+)", replica.log())]
    assert sorted(reaped) == sorted(sandboxes), reaped  # each once, by one replica or the other
    assert replicas[0].sandboxes() == []
    assert f"You asked me to remember V{1}." in post_turn(replicas[0].base_url, "idle-1", RECALL,
                                                          headers=auth(ALICE)).text


@pytest.mark.docker
@pytest.mark.timeout(600)
def test_a_replica_killed_mid_turn_loses_nothing_the_client_reattaches_through_the_other(
        docker_gateways: Gateways, redis_url: str) -> None:
    # Docker only: a local sandbox ends with the gateway process that started it (PR_SET_PDEATHSIG).
    one = docker_gateways.start(GATEWAY_REDIS_URL=redis_url, GATEWAY_WARM_POOL="0")
    two = docker_gateways.start(GATEWAY_REDIS_URL=redis_url, GATEWAY_WARM_POOL="0")
    assert post_turn(one.base_url, "kept", "Remember this value: K9", headers=auth(ALICE)).types[-1] == "done"

    before: list[tuple[str, str, dict[str, Any]]] = []
    with httpx.Client(timeout=120) as client, connect_sse(
            client, "POST", f"{one.base_url}/sessions/kept/messages", headers=auth(ALICE),
            json={"prompt": "Tell me a long story [[slow:0.4]]"}) as source:
        try:
            for sse in source.iter_sse():
                if sse.data:
                    before.append((sse.event, sse.id, json.loads(sse.data)))
                    if len(before) == 3:
                        assert one.process is not None
                        os.killpg(one.process.pid, signal.SIGKILL)
        except httpx.TransportError:
            pass  # the replica died under the stream
    assert [kind for kind, _, _ in before][:3] == ["session", "text", "text"] and before[-1][0] != "done"

    after: list[tuple[str, str, dict[str, Any]]] = []
    with httpx.Client(timeout=120) as client, connect_sse(
            client, "GET", f"{two.base_url}/sessions/kept/events",
            headers={**auth(ALICE), "Last-Event-ID": before[-1][1]}) as source:
        assert source.response.status_code == 200
        after = [(sse.event, sse.id, json.loads(sse.data)) for sse in source.iter_sse() if sse.data]
    whole = before + after
    ids = [event_order(event_id) for _, event_id, _ in whole]
    assert [seq for _, seq in ids] == list(range(1, len(ids) + 1)) and len({turn for turn, _ in ids}) == 1
    assert whole[-2][0] == "result" and whole[-1][0] == "done" and "error" not in [k for k, _, _ in whole]
    assert "You asked me to remember K9." in post_turn(two.base_url, "kept", RECALL, headers=auth(ALICE)).text
