"""Sessions at speed, safely: warm CLIs, pre-started CLIs, one turn at a time,
interrupt, disconnects, eviction, graceful drain and crash cleanup."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest

from harness.processes import alive, descendants
from hosting.client import (
    AgentClient,
    AuthenticationError,
    NotReadyError,
    PayloadTooLargeError,
    ResultEvent,
    SessionBusyError,
    SessionEvent,
    TextEvent,
    TurnError,
)
from tests.support.polling import wait_for
from tests.support.servers import ready
from tests.support.turns import post_turn

pytestmark = pytest.mark.e2e

RECALL = "What value did I ask you to remember?"
LONG_SLOW = "[[slow:0.2]] " + " ".join(f"word{n}" for n in range(60))


def background_turn(base_url: str, session_id: str, prompt: str) -> tuple[threading.Thread, list]:
    """Run a turn on a thread; ``box`` gets its Turn, or the transport error if the server died."""
    box: list = []

    def run() -> None:
        try:
            box.append(post_turn(base_url, session_id, prompt))
        except httpx.TransportError as exc:
            box.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def test_second_turn_while_one_runs_gets_409_with_retry_after(start_server, local_model):
    server = start_server()
    thread, box = background_turn(server.base_url, "busy", "Remember this value: b1 [[delay:2]]")
    wait_for(lambda: httpx.get(f"{server.base_url}/sessions/busy").json().get("busy") if
             httpx.get(f"{server.base_url}/sessions/busy").status_code == 200 else False)
    before = local_model.requests_total()
    response = httpx.post(f"{server.base_url}/sessions/busy/messages", json={"prompt": "Remember this value: b2"})
    assert response.status_code == 409 and response.headers["retry-after"].isdigit()
    assert "already running" in response.json()["detail"]
    assert httpx.delete(f"{server.base_url}/sessions/busy").status_code == 409
    thread.join(60)
    assert local_model.requests_total() == before + 1  # only the delayed first turn's request
    assert box[0].types[-2:] == ["result", "done"]
    assert "You asked me to remember b1." in post_turn(server.base_url, "busy", RECALL).text


def test_a_client_that_disconnects_does_not_lose_its_turn(start_server):
    server = start_server()
    with httpx.Client(timeout=30) as client, client.stream(
        "POST", f"{server.base_url}/sessions/gone/messages", json={"prompt": "Remember this value: g7 [[delay:1.5]]"}
    ) as response:
        first = next(response.iter_lines())
        assert first.startswith("id: 1") or first.startswith("event: session")
    # The turn keeps running without its client, then completes.
    wait_for(lambda: not httpx.get(f"{server.base_url}/sessions/gone").json()["busy"])
    turn = post_turn(server.base_url, "gone", RECALL)
    assert turn.types[-2:] == ["result", "done"]
    assert "You asked me to remember g7." in turn.text


def test_interrupt_stops_a_slow_stream_and_the_session_stays_usable(start_server):
    server = start_server()
    base = server.base_url
    assert httpx.post(f"{base}/sessions/never/interrupt").status_code == 404
    post_turn(base, "intr", "Remember this value: i5")
    idle = httpx.post(f"{base}/sessions/intr/interrupt")  # nothing running: not the 409 of a busy session
    assert (idle.status_code, idle.json()["code"], "retry-after" in idle.headers) == (409, "no_turn_running", False)

    events: list[str] = []
    interrupted = False
    started = time.monotonic()
    with httpx.Client(timeout=60) as client, client.stream(
        "POST", f"{base}/sessions/intr/messages", json={"prompt": LONG_SLOW}
    ) as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                events.append(line.removeprefix("event: "))
            if events.count("text") == 2 and not interrupted:
                interrupted = True
                assert httpx.post(f"{base}/sessions/intr/interrupt").json() == {"session_id": "intr", "interrupted": True}
            if line.startswith("data: ") and events[-1] == "error":
                error = json.loads(line.removeprefix("data: "))
    assert time.monotonic() - started < 8  # the full stream would take 12 s
    assert events[-1] == "done" and "error" in events
    assert error["code"] == "interrupted" and error["retryable"] is True
    assert "You asked me to remember i5." in post_turn(base, "intr", RECALL).text


def test_eviction_past_the_cap_then_recall_from_the_transcript(start_server):
    server = start_server(AGENT_WARM_SESSIONS="1", AGENT_PREWARM="0")
    base = server.base_url
    post_turn(base, "ev-a", "Remember this value: aa1")
    post_turn(base, "ev-b", "Remember this value: bb2")
    assert ready(base)["live_sessions"] == 1
    # One CLI: ev-b's (the evicted one may take a moment to exit after it is closed).
    wait_for(lambda: len(descendants(server.process.pid)) == 1, timeout=15)
    assert httpx.get(f"{base}/sessions/ev-a").json()["live"] is False
    assert "You asked me to remember aa1." in post_turn(base, "ev-a", RECALL).text
    assert "You asked me to remember bb2." in post_turn(base, "ev-b", RECALL).text


def test_idle_sessions_are_closed_after_the_timeout_and_resume_later(start_server):
    server = start_server(AGENT_IDLE_TIMEOUT_SECONDS="0.5", AGENT_PREWARM="0")
    post_turn(server.base_url, "idle", "Remember this value: id9")
    wait_for(lambda: ready(server.base_url)["live_sessions"] == 0, timeout=10)
    wait_for(lambda: not descendants(server.process.pid), timeout=10)
    assert "You asked me to remember id9." in post_turn(server.base_url, "idle", RECALL).text


def test_warm_sessions_off_spawns_a_cli_per_turn(start_server):
    server = start_server(AGENT_WARM_SESSIONS="0", AGENT_PREWARM="0")
    post_turn(server.base_url, "cold", "Remember this value: c0")
    assert ready(server.base_url)["live_sessions"] == 0 and not descendants(server.process.pid)
    assert "You asked me to remember c0." in post_turn(server.base_url, "cold", RECALL).text


def test_prestarted_clis_serve_new_sessions_and_refill(start_server, local_model):
    model_requests, token_counts = local_model.requests_total(), local_model.token_counts()
    server = start_server(AGENT_PREWARM="2")
    base = server.base_url
    status = wait_for(lambda: (s := ready(base))["prewarmed"] == 2 and s, timeout=120)  # pre-starts wait for spare CPU
    assert status["prewarm_target"] == 2 and status["ready"] is True
    assert local_model.requests_total() == model_requests  # priming a CLI calls no model
    pooled = descendants(server.process.pid)
    assert len(pooled) == 2
    post_turn(base, "fresh", "Remember this value: p2")
    assert descendants(server.process.pid) >= pooled - set()  # the pooled CLI now serves "fresh"
    wait_for(lambda: ready(base)["prewarmed"] == 2, timeout=120)
    assert "You asked me to remember p2." in post_turn(base, "fresh", RECALL).text
    assert "You have not asked me to remember any value." in post_turn(base, "other", RECALL).text
    wait_for(lambda: ready(base)["prewarmed"] == 2, timeout=120)
    assert local_model.token_counts() == token_counts  # neither priming nor turns count tokens upstream


def test_sigterm_drains_running_turns_cuts_the_rest_by_the_deadline_and_exits_0_without_orphans(start_server):
    """The grace is a deadline for the whole shutdown: a turn that fits finishes, one that
    does not is cut (its stream ends with a retryable ``error`` and ``done``), every CLI is
    stopped, and the process exits 0 by the deadline (Cloud Run's SIGKILL comes at 10 s)."""
    grace = 8.0
    server = start_server(AGENT_PREWARM="1", AGENT_SHUTDOWN_GRACE_SECONDS=str(grace))
    base = server.base_url
    # Pre-started CLIs start with spare CPU only: not waited for, but stopped with the rest if started.
    post_turn(base, "warm", "hello")
    thread, box = background_turn(base, "inflight", "Remember this value: t3 [[delay:2]]")
    cut_thread, cut_box = background_turn(base, "cut", LONG_SLOW)  # streams for 12 s: longer than the grace
    wait_for(lambda: ready(base)["running_turns"] == 2)
    # the warm session's CLI and the running turns' (started once each turn is admitted), and any pre-started one
    wait_for(lambda: len(descendants(server.process.pid)) >= 3, timeout=15)
    clis = descendants(server.process.pid)
    exited: list[float] = []  # when the process ended, seen by a thread of its own
    waiter = threading.Thread(target=lambda: (server.process.wait(60), exited.append(time.monotonic())))
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    waiter.start()

    refused = wait_for(lambda: (r := httpx.post(f"{base}/sessions/late/messages", json={"prompt": "hi"})).status_code == 503
                       and r)
    assert refused.headers["retry-after"] and refused.json()["detail"]
    not_ready = httpx.get(f"{base}/ready")
    assert not_ready.status_code == 503 and not_ready.json()["ready"] is False

    async def client_sees_503() -> None:
        async with AgentClient(base, session_id="late") as agent:
            with pytest.raises(NotReadyError) as caught:
                await agent.arun("hi")
            assert caught.value.retry_after is not None

    asyncio.run(client_sees_503())
    waiter.join(60)
    assert server.process.returncode == 0
    stopped_after = exited[0] - signalled
    # The deadline plus what an exiting interpreter may take on a loaded machine: within Cloud Run's 10 s.
    assert stopped_after < grace + 2.0, f"exited {stopped_after:.1f} s after SIGTERM, grace {grace:.0f} s"
    thread.join(10)
    cut_thread.join(10)
    assert box[0].types[-2:] == ["result", "done"]
    assert "Noted: I will remember t3." in box[0].text
    cut = cut_box[0]
    assert cut.types[-2:] == ["error", "done"] and "result" not in cut.types, cut.types
    assert cut.of("error")[0]["code"] == "shutting_down" and cut.of("error")[0]["retryable"] is True
    wait_for(lambda: not alive(clis), timeout=5)  # their guard kills any CLI still closing as the server exits


def test_sigkill_leaves_no_cli_and_the_next_start_serves_every_session(start_server, tmp_path):
    data_dir = tmp_path / "data"
    first = start_server(data_dir=data_dir, AGENT_PREWARM="2")
    wait_for(lambda: ready(first.base_url)["prewarmed"] == 2, timeout=120)  # pre-starts wait for spare CPU
    for n in range(3):
        post_turn(first.base_url, f"kill-{n}", f"Remember this value: k{n}")
    wait_for(lambda: ready(first.base_url)["prewarmed"] == 2, timeout=90)  # pooled CLIs must die too
    thread, _ = background_turn(first.base_url, "kill-mid", "Remember this value: km [[delay:3]]")
    wait_for(lambda: ready(first.base_url)["running_turns"] == 1)
    clis = descendants(first.process.pid)
    assert len(clis) >= 5  # three warm, one running, one still pooled
    first.kill(signal.SIGKILL)
    thread.join(30)
    wait_for(lambda: not alive(clis), timeout=10)

    second = start_server(data_dir=data_dir, AGENT_PREWARM="0")
    for n in range(3):
        assert f"You asked me to remember k{n}." in post_turn(second.base_url, f"kill-{n}", RECALL).text


def test_python_client_against_a_live_server(start_server):
    server = start_server(AGENT_AUTH_TOKEN="client-token")

    async def scenario() -> None:
        async with AgentClient(server.base_url, token="client-token", session_id="py-1") as agent:
            assert "Noted: I will remember pc4." in await agent.arun("Remember this value: pc4")
            events = [event async for event in agent.astream(RECALL)]
            assert isinstance(events[0], SessionEvent) and events[0].resumed
            assert "".join(e.text for e in events if type(e) is TextEvent) == "You asked me to remember pc4."
            assert any(isinstance(e, ResultEvent) for e in events) and events[-1].data == {"v": 1}
            with pytest.raises(TurnError) as failed:
                await agent.arun("fail [[error:529]]")
            assert failed.value.event.code == "overloaded" and failed.value.event.retryable

            slow = asyncio.create_task(agent.arun(LONG_SLOW))
            await asyncio.sleep(1.5)
            with pytest.raises(SessionBusyError) as busy:
                await agent.arun("again")
            assert busy.value.retry_after is not None
            assert await agent.interrupt() is True
            with pytest.raises(TurnError) as interrupted:
                await slow
            assert interrupted.value.event.code == "interrupted"
            assert await agent.interrupt() is False, "no turn running: not SessionBusyError"
            with pytest.raises(PayloadTooLargeError):
                await agent.arun("x" * 300_000)
            assert (await agent.get_session())["has_history"] is True
            await agent.delete_session()
        async with AgentClient(server.base_url, token="wrong") as stranger:
            with pytest.raises(AuthenticationError):
                await stranger.arun("hi")

    asyncio.run(scenario())


def test_client_reads_base_url_and_token_from_env(start_server, monkeypatch):
    server = start_server(AGENT_AUTH_TOKEN="env-token")
    monkeypatch.setenv("AGENT_BASE_URL", server.base_url)
    monkeypatch.setenv("AGENT_AUTH_TOKEN", "env-token")

    async def scenario() -> str:
        async with AgentClient() as agent:
            return await agent.arun("hello from env")

    assert "Local model answer to: hello from env" in asyncio.run(scenario())
