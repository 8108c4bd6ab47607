"""Durable sessions end to end: real servers, the real SDK and CLI, the local
model, and real Redis and PostgreSQL behind ``AGENT_SESSION_STORE``.

A "fresh server" below is a new server process on a new, empty data dir: a
sandbox that has never seen the session, so whatever it knows of the session
comes from the store. Each test uses its own session ids (Redis) or its own
database (Postgres), so tests never see each other's sessions.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from httpx_sse import connect_sse
from psycopg import sql

from harness.processes import descendants, free_port
from hosting.contract import STORE_PROJECT_KEY, durable_session_id
from tests.support import ROOT
from tests.support.servers import agent_env, ready, workspace_of
from tests.support.stores import RestartableServer, restartable_postgres, restartable_redis
from tests.support.turns import Turn

pytestmark = [pytest.mark.e2e, pytest.mark.stores]

RECALL = "What value did I ask you to remember?"
NOTHING = "You have not asked me to remember any value."
TURN_TIMEOUT = 240.0
BACKENDS = ["redis", "postgres"]


# -- helpers -------------------------------------------------------------


def new_id(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}"


def new_value(label: str) -> str:
    return f"{label}{uuid.uuid4().hex[:8]}"


def remembered(value: str) -> str:
    return f"You asked me to remember {value}."


def completed(turn: Turn) -> Turn:
    """Assert a normal turn: session first, one result, done last, no error."""
    assert turn.types[0] == "session", turn.types
    assert turn.types[-1] == "done", turn.types
    assert turn.of("error") == [], turn.of("error")
    assert turn.result["is_error"] is False, turn.result
    return turn


def session_event(turn: Turn) -> dict[str, Any]:
    (event,) = turn.of("session")
    return event


def turn(server: Any, session_id: str, prompt: str) -> Turn:
    """One turn over real HTTP, like ``conftest.post_turn`` but heartbeat-proof.

    After the first event, httpx-sse turns each ``: ping`` heartbeat into an
    event with empty data (it keeps the last event id, so the blank line
    after the comment dispatches); those are skipped here. Restores that wait
    on a down store can take longer than a heartbeat interval.
    """
    events = []
    with httpx.Client(timeout=TURN_TIMEOUT) as client, connect_sse(
        client, "POST", f"{server.base_url}/sessions/{session_id}/messages", json={"prompt": prompt}
    ) as source:
        assert source.response.status_code == 200, source.response.read()
        for sse in source.iter_sse():
            if sse.data:
                events.append({"event": sse.event, "id": sse.id, "data": json.loads(sse.data)})
    return Turn(events)


def stop(server: Any) -> None:
    """SIGTERM: the server drains, closes its CLIs (flushing their mirrors) and exits 0."""
    assert server.kill(signal.SIGTERM) == 0, server.log()


def bound(data_dir: Path) -> set[str]:
    return {p.stem for p in (data_dir / "sessions").glob("*.json")}


def requests_since(local_model: Any, since: int) -> list[str]:
    """The message histories (as JSON text) of the model requests numbered above ``since``."""
    recent = httpx.get(f"{local_model.base_url}/local/requests", params={"since": since}).json()["recent"]
    return [json.dumps(r["messages"]) for r in recent]


def describe(server: Any, session_id: str) -> httpx.Response:
    return httpx.get(f"{server.base_url}/sessions/{session_id}", timeout=120)


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A store URL per backend: the shared Redis, or a fresh database on the shared Postgres."""
    if request.param == "redis":
        yield request.getfixturevalue("redis_url")
        return
    base: str = request.getfixturevalue("postgres_url")
    name = f"durable_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield base.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(params=BACKENDS)
def restartable_store(request: pytest.FixtureRequest) -> Iterator[RestartableServer]:
    """A store of its own per backend, which the test may stop and restart on the same port."""
    with (restartable_redis if request.param == "redis" else restartable_postgres)() as server:
        yield server


@pytest.fixture
def store_server(start_server: Any, tmp_path: Path) -> Any:
    """Factory: ``store_server(url, name, **env)`` starts a server on data dir ``tmp_path/name``."""

    def start(url: str, name: str, **env: str) -> Any:
        data_dir = tmp_path / name
        assert not data_dir.exists(), "every server gets its own, empty data dir"
        return start_server(data_dir=data_dir, AGENT_SESSION_STORE=url, **env)

    return start


# -- 1. cross-process resume ---------------------------------------------


@pytest.mark.timeout(600)
def test_a_fresh_server_resumes_the_session_with_its_whole_history(store_url, store_server, local_model):
    session, value = new_id("resume"), new_value("X")
    a = store_server(store_url, "a")
    first = completed(turn(a, session, f"Remember this value: {value}"))
    assert session_event(first)["resumed"] is False
    stop(a)

    b = store_server(store_url, "b")
    assert bound(b.data_dir) == set()
    assert describe(b, session).json()["has_history"] is True  # known to B through the store only
    since = local_model.requests_total()
    second = completed(turn(b, session, RECALL))

    assert remembered(value) in second.text
    assert second.result["text"] == second.text
    # The model was sent the whole conversation, not just the new prompt.
    sent = requests_since(local_model, since)
    assert any(f"Remember this value: {value}" in m and RECALL in m for m in sent), sent
    # B now holds the session under the id every sandbox derives from the public id.
    assert workspace_of(b.data_dir, session).name == durable_session_id(session)
    assert bound(b.data_dir) == {session}


@pytest.mark.timeout(600)
def test_the_session_event_of_a_restored_session_says_resumed(store_url, store_server):
    session, value = new_id("resumed"), new_value("X")
    a = store_server(store_url, "a")
    completed(turn(a, session, f"Remember this value: {value}"))
    stop(a)

    b = store_server(store_url, "b")
    second = completed(turn(b, session, RECALL))
    assert remembered(value) in second.text  # it *was* resumed...
    assert session_event(second)["resumed"] is True  # ...and the stream must say so


@pytest.mark.timeout(300)
def test_a_server_with_a_store_pre_starts_no_cli(redis_url, store_server):
    """A pre-started CLI's session id is fixed at spawn, so with a store it could never be
    handed out: the server starts none, and says so to the gateway's wait for its pool."""
    server = store_server(redis_url, "pool", AGENT_PREWARM="2")
    status = ready(server.base_url)
    assert (status["prewarm_target"], status["prewarmed"]) == (0, 0)
    session, value = new_id("pool"), new_value("P")
    completed(turn(server, session, f"Remember this value: {value}"))  # seconds in which a pool would fill
    assert ready(server.base_url)["prewarmed"] == 0
    assert len(descendants(server.process.pid)) == 1  # the session's warm CLI only
    assert workspace_of(server.data_dir, session).name == durable_session_id(session)


# -- 2. concurrent sessions on one store ---------------------------------


@pytest.mark.timeout(900)
def test_concurrent_sessions_on_one_store_do_not_mix(store_url, store_server):
    servers = [store_server(store_url, "a1"), store_server(store_url, "a2")]
    values = {new_id(f"mix{n}"): new_value(f"V{n}x") for n in range(4)}
    outcomes: dict[str, list[Any]] = {session: [] for session in values}

    def converse(server: Any, session: str, value: str) -> None:
        try:
            outcomes[session].append(turn(server, session, f"Remember this value: {value}"))
            outcomes[session].append(turn(server, session, RECALL))
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            outcomes[session].append(exc)

    threads = [threading.Thread(target=converse, args=(servers[n % 2], session, value))
               for n, (session, value) in enumerate(values.items())]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(2 * TURN_TIMEOUT + 60)
        assert not thread.is_alive()
    for session, value in values.items():
        remember, recall = outcomes[session]
        completed(remember)
        assert remembered(value) in completed(recall).text
    for server in servers:
        stop(server)

    c = store_server(store_url, "c")
    recalled: dict[str, list[Any]] = {session: [] for session in values}

    def recall_on_c(session: str) -> None:
        try:
            recalled[session].append(turn(c, session, RECALL))
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            recalled[session].append(exc)

    threads = [threading.Thread(target=recall_on_c, args=(session,)) for session in values]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TURN_TIMEOUT + 60)
        assert not thread.is_alive()
    for session, value in values.items():
        (answer,) = recalled[session]
        text = completed(answer).text
        assert remembered(value) in text
        assert session_event(answer)["session_id"] == session
        others = [v for s, v in values.items() if s != session]
        assert not any(other in text for other in others), text


# -- 3. DELETE reaches the store -----------------------------------------


@pytest.mark.timeout(600)
def test_delete_removes_the_session_from_the_store_too(store_url, store_server):
    deleted, kept = new_id("deleted"), new_id("kept")
    a = store_server(store_url, "a")
    completed(turn(a, deleted, f"Remember this value: {new_value('D')}"))
    completed(turn(a, kept, f"Remember this value: {new_value('K')}"))
    assert httpx.delete(f"{a.base_url}/sessions/{deleted}", timeout=120).status_code == 204
    assert describe(a, deleted).status_code == 404
    stop(a)

    b = store_server(store_url, "b")
    # A stored session B has never seen is described from the store.
    stored = describe(b, kept)
    assert stored.status_code == 200
    assert stored.json()["has_history"] is True and stored.json()["busy"] is False
    # The deleted one is gone everywhere.
    assert describe(b, deleted).status_code == 404
    fresh = completed(turn(b, deleted, RECALL))
    assert session_event(fresh)["resumed"] is False
    assert NOTHING in fresh.text

    # A sandbox that never held a session can delete it from the store.
    assert httpx.delete(f"{b.base_url}/sessions/{kept}", timeout=120).status_code == 204
    assert describe(b, kept).status_code == 404
    assert httpx.delete(f"{b.base_url}/sessions/{kept}", timeout=120).status_code == 404


# -- 4. TTL ---------------------------------------------------------------


@pytest.mark.timeout(600)
def test_a_session_idle_past_the_ttl_is_forgotten(store_url, store_server):
    """Redis expires the keys itself; Postgres purges on an append, at most once per
    interval per process (the first append of a process purges), so on Postgres a
    fresh server's turn on another session comes first."""
    session, value = new_id("ttl"), new_value("T")
    a = store_server(store_url, "a", AGENT_SESSION_TTL_SECONDS="2")
    completed(turn(a, session, f"Remember this value: {value}"))
    stop(a)  # its CLI's last mirror write is behind us: the idle clock has started

    time.sleep(3.5)
    b = store_server(store_url, "b", AGENT_SESSION_TTL_SECONDS="2")
    if store_url.startswith("postgres"):
        completed(turn(b, new_id("purger"), "Hello"))
    assert describe(b, session).status_code == 404
    forgotten = completed(turn(b, session, RECALL))
    assert session_event(forgotten)["resumed"] is False
    assert NOTHING in forgotten.text


# -- 5. store outage during turns ----------------------------------------


def stored_entries(redis_store_url: str, session_id: str) -> list[dict[str, Any]]:
    """The main transcript the Redis store holds for a public session id (read behind the adapter)."""
    with redis.Redis.from_url(redis_store_url, decode_responses=True) as client:
        raw = client.lrange(f"agent:{STORE_PROJECT_KEY}:{durable_session_id(session_id)}:main", 0, -1)
    return [json.loads(r) for r in raw]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("warm_sessions", ["32", "0"], ids=["warm-cli", "cli-per-turn"])
def test_a_store_outage_never_breaks_a_turn_and_the_store_catches_up(warm_sessions, store_server, local_model):
    session, x1, x2 = new_id("outage"), new_value("X1x"), new_value("X2x")
    with restartable_redis() as store:
        a = store_server(store.url, "a", AGENT_WARM_SESSIONS=warm_sessions)
        completed(turn(a, session, f"Remember this value: {x1}"))
        assert ready(a.base_url)["store_failures"] == 0
        before_outage = len(stored_entries(store.url, session))
        assert before_outage > 0

        store.stop()
        during = completed(turn(a, session, f"Remember this value: {x2}"))
        assert session_event(during)["resumed"] is True
        assert f"I will remember {x2}" in during.text
        failures = ready(a.base_url)["store_failures"]
        assert failures >= 1

        store.start()
        assert len(stored_entries(store.url, session)) == before_outage  # the outage turn is missing
        completed(turn(a, session, "Say hello."))  # the next turn catches the store up
        assert ready(a.base_url)["store_failures"] == failures
        stop(a)

        entries = stored_entries(store.url, session)
        uuids = [e["uuid"] for e in entries if e.get("uuid")]
        assert len(uuids) == len(set(uuids)), "catch-up stored an entry twice"

        b = store_server(store.url, "b")
        since = local_model.requests_total()
        recalled = completed(turn(b, session, RECALL))
        assert remembered(x2) in recalled.text
        sent = requests_since(local_model, since)
        assert any(x1 in m and x2 in m and RECALL in m for m in sent), sent


def local_entries(server: Any, session_id: str) -> list[dict[str, Any]]:
    (transcript,) = workspace_of(server.data_dir, session_id).glob(f"config/projects/*/{durable_session_id(session_id)}.jsonl")
    return [json.loads(line) for line in transcript.read_text().splitlines() if line.strip()]


def canonical(entry: dict[str, Any]) -> str:
    return json.dumps(entry, sort_keys=True)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("warm_sessions", ["32", "0"], ids=["warm-cli", "cli-per-turn"])
def test_the_store_never_holds_an_entry_twice(warm_sessions, redis_url, store_server):
    session = new_id("exact")
    a = store_server(redis_url, "a", AGENT_WARM_SESSIONS=warm_sessions)
    for n in range(3):
        completed(turn(a, session, f"Remember this value: {new_value(f'E{n}x')}"))
    stop(a)
    local, stored = local_entries(a, session), stored_entries(redis_url, session)
    # The whole conversation is in the store...
    assert {e["uuid"] for e in local if e.get("uuid")} <= {e["uuid"] for e in stored if e.get("uuid")}
    # ...and nothing in it more often than in the transcript it mirrors.
    extra = Counter(map(canonical, stored)) - Counter(map(canonical, local))
    assert not extra, sorted({json.loads(e).get("type") for e in extra})


@pytest.mark.timeout(600)
def test_a_torn_last_transcript_line_does_not_brick_the_session(redis_url, store_server, start_server):
    session, value = new_id("torn"), new_value("T")
    a = store_server(redis_url, "a")
    completed(turn(a, session, f"Remember this value: {value}"))
    stop(a)
    (transcript,) = workspace_of(a.data_dir, session).glob("config/projects/*/*.jsonl")
    with transcript.open("a") as handle:
        handle.write('{"type": "user", "uuid": "cut-sh')  # the server died mid-write

    again = start_server(data_dir=a.data_dir, AGENT_SESSION_STORE=redis_url, AGENT_PREWARM="0")
    assert remembered(value) in completed(turn(again, session, RECALL)).text


# -- 6. store down when a resume needs it --------------------------------


@pytest.mark.timeout(900)
def test_a_resume_while_the_store_is_down_fails_retryably_and_runs_nothing(restartable_store, store_server,
                                                                         local_model):
    session, value = new_id("down"), new_value("R")
    a = store_server(restartable_store.url, "a")
    completed(turn(a, session, f"Remember this value: {value}"))
    stop(a)

    restartable_store.stop()
    b = store_server(restartable_store.url, "b")  # starts anyway: the store is only needed per session
    since = local_model.requests_total()
    failed = turn(b, session, RECALL)
    assert failed.types == ["session", "error", "done"], failed.types
    (error,) = failed.of("error")
    assert error["code"] == "store_unavailable" and error["retryable"] is True, error
    assert local_model.requests_total() == since  # nothing reached the model

    restartable_store.start()
    retried = completed(turn(b, session, RECALL))
    assert remembered(value) in retried.text


@pytest.mark.timeout(900)
def test_a_failed_restore_leaves_nothing_bound(restartable_store, store_server):
    session, value = new_id("unbound"), new_value("U")
    a = store_server(restartable_store.url, "a")
    completed(turn(a, session, f"Remember this value: {value}"))
    stop(a)

    restartable_store.stop()
    b = store_server(restartable_store.url, "b")
    failed = turn(b, session, RECALL)
    assert failed.of("error")[0]["code"] == "store_unavailable"
    # Nothing bound, so B still cannot tell whether the session exists: only the store can.
    described = describe(b, session)
    assert (bound(b.data_dir), described.status_code) == (set(), 503), described.text


# -- 7. DELETE while the store is down -----------------------------------


@pytest.mark.timeout(900)
def test_delete_while_the_store_is_down_is_refused_and_changes_nothing(restartable_store, store_server):
    session, value = new_id("keep"), new_value("K")
    a = store_server(restartable_store.url, "a")
    completed(turn(a, session, f"Remember this value: {value}"))
    workspace = workspace_of(a.data_dir, session)
    transcript = next(workspace.glob("config/projects/*/*.jsonl"))

    restartable_store.stop()
    refused = httpx.delete(f"{a.base_url}/sessions/{session}", timeout=120)
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"].isdigit()
    assert "store" in refused.json()["detail"]
    assert bound(a.data_dir) == {session} and transcript.exists()

    restartable_store.start()
    assert remembered(value) in completed(turn(a, session, RECALL)).text
    stop(a)
    b = store_server(restartable_store.url, "b")
    assert remembered(value) in completed(turn(b, session, RECALL)).text


# -- 8. a bad store URL --------------------------------------------------


@pytest.mark.parametrize("url", ["mysql://user:hunter2@db.example/x", "postgresql+psycopg://user:hunter2@db/x",
                                 "localhost:6379"])
def test_a_bad_store_url_stops_the_server_at_start_up(url, local_model, tmp_path):
    env = agent_env(local_model, tmp_path / "data", AGENT_SESSION_STORE=url, PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-m", "hosting.server"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "AGENT_SESSION_STORE" in output
    assert "Traceback" not in output
    assert "hunter2" not in output  # the URL may carry a password: it is not echoed
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
