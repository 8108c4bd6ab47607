"""Retention of local sessions, end to end: real servers, the real SDK and CLI, the local
model, and (for the local cache) real Redis and PostgreSQL behind ``AGENT_SESSION_STORE``.

Short TTLs and sweeps keep these fast: a session idle for a second is "old".
"""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import pytest

from tests.support.polling import wait_for
from tests.support.servers import bound_sessions, workspace_dirs, workspace_of
from tests.support.turns import Turn, post_turn

pytestmark = pytest.mark.e2e

RECALL = "What value did I ask you to remember?"
NOTHING = "You have not asked me to remember any value."


def completed(turn: Turn) -> Turn:
    assert turn.types[0] == "session" and turn.types[-2:] == ["result", "done"], turn.events
    assert turn.of("error") == [], turn.of("error")
    return turn


def resumed(turn: Turn) -> bool:
    (event,) = turn.of("session")
    return event["resumed"]


def test_idle_sessions_are_removed_and_live_or_running_ones_kept(start_server):
    server = start_server(AGENT_SESSION_TTL_SECONDS="1", AGENT_SESSION_SWEEP_SECONDS="0.3",
                          AGENT_WARM_SESSIONS="1", AGENT_PREWARM="0")
    base, data_dir = server.base_url, server.data_dir
    completed(post_turn(base, "idle", "Remember this value: i1"))
    idle_workspace = workspace_of(data_dir, "idle")
    completed(post_turn(base, "warm", "Remember this value: w1"))  # the warm cap is 1: "idle" has no CLI now
    running: list[Turn] = []
    thread = threading.Thread(target=lambda: running.append(post_turn(base, "running", "Remember this value: r1 "
                                                                      "[[delay:6]]")))
    thread.start()
    try:
        # The binding goes a moment before the workspace is moved aside: wait for both.
        wait_for(lambda: "idle" not in bound_sessions(data_dir) and not idle_workspace.exists(), timeout=20)
        assert idle_workspace.name not in workspace_dirs(data_dir)
        time.sleep(2)  # past the TTL and several sweeps for the other two as well
        # One has a live CLI, the other a turn running: both are kept.
        assert {"warm", "running"} <= bound_sessions(data_dir)
        assert httpx.get(f"{base}/sessions/running").json()["busy"] is True
        # (Asked now: once "running" ends, its CLI takes the one warm place, and "warm" is due too.)
        assert "You asked me to remember w1." in completed(post_turn(base, "warm", RECALL)).text
    finally:
        thread.join(60)
    completed(running[0])

    again = completed(post_turn(base, "idle", RECALL))
    assert resumed(again) is False and NOTHING in again.text  # a new conversation under the old id
    assert "Traceback" not in server.log()


@pytest.mark.stores
@pytest.mark.parametrize("backend", ["redis", "postgres"])
def test_with_a_store_an_evicted_local_copy_is_restored_with_recall(start_server, request, backend):
    url = request.getfixturevalue(f"{backend}_url")
    server = start_server(AGENT_SESSION_STORE=url, AGENT_LOCAL_CACHE_SECONDS="1", AGENT_SESSION_SWEEP_SECONDS="0.5",
                          AGENT_WARM_SESSIONS="0", AGENT_PREWARM="0")
    session, value = f"cache-{uuid.uuid4().hex[:8]}", f"C{uuid.uuid4().hex[:6]}"
    completed(post_turn(server.base_url, session, f"Remember this value: {value}"))
    workspace = workspace_of(server.data_dir, session)
    wait_for(lambda: session not in bound_sessions(server.data_dir) and not workspace.exists(), timeout=20)
    assert httpx.get(f"{server.base_url}/sessions/{session}").json()["has_history"] is True  # in the store

    recall = completed(post_turn(server.base_url, session, RECALL))
    assert resumed(recall) is True and f"You asked me to remember {value}." in recall.text
    assert "Traceback" not in server.log()
