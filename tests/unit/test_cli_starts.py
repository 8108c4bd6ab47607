"""Unit tests of when the server starts CLIs: the start limit, the pool's refill rules,
and the memory budget (turns queue for room instead of starting more CLIs than fit).

The CLI start itself is replaced by a recorder, and a turn by a scripted reply
(these are rules about ordering, not about the CLI); the end-to-end tests in
test_live_sessions.py and test_box_limits.py start real CLIs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from claude_agent_sdk import ClaudeSDKClient, ResultMessage

from hosting.server.admission import EVICTION_GRACE_SECONDS
from hosting.server.box import Box
from hosting.server.live import LiveSession
from hosting.server.prestart import pool_target
from hosting.server.sessions import NoRoom, NotAccepting, SessionManager
from hosting.server.settings import Settings
from hosting.server.workspaces import WorkspaceStore

ONE_GIB_BOX = Box(machine_memory=24 * 2**30, cpus=2, memory_limit=2**30)  # fits 3 CLIs


class Starts:
    """Stands in for ``LiveSession.connect``: counts starts, the most at once, and can hold them."""

    def __init__(self) -> None:
        self.running = 0
        self.most_at_once = 0
        self.started: list[str] = []
        self.closed: list[str] = []
        self.alive = 0
        self.most_alive = 0
        self.release = asyncio.Event()
        self.release.set()

    async def connect(self, live: LiveSession) -> None:
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        self.alive += 1
        self.most_alive = max(self.most_alive, self.alive)
        self.started.append(live.workspace.sdk_session_id)
        try:
            await self.release.wait()
            await asyncio.sleep(0.05)
        finally:
            self.running -= 1
        live.connected = True

    async def close(self, live: LiveSession) -> None:
        if live.connected:
            self.alive -= 1
            self.closed.append(live.workspace.sdk_session_id)
        live.connected = False


class FixedSpareCpu:
    capacity = 2.0

    def __init__(self, cores: float) -> None:
        self.value = cores

    def cores(self) -> float:
        return self.value


@pytest.fixture
def starts(monkeypatch: pytest.MonkeyPatch) -> Starts:
    recorder = Starts()

    async def connect(live: LiveSession) -> None:
        await recorder.connect(live)

    async def no_prime(live: LiveSession) -> None:
        return None

    real_close = LiveSession.close

    async def close(live: LiveSession) -> None:
        await recorder.close(live)
        await real_close(live)  # not connected any more: only unlocks the workspace

    monkeypatch.setattr(LiveSession, "connect", connect)
    monkeypatch.setattr(LiveSession, "prime", no_prime)
    monkeypatch.setattr(LiveSession, "close", close)
    return recorder


def manager(tmp_path: Path, **settings: Any) -> tuple[SessionManager, WorkspaceStore]:
    store = WorkspaceStore(tmp_path)
    store.ensure_writable()
    return SessionManager(Settings(data_dir=tmp_path, **settings), store), store


class Replies:
    """Stands in for a CLI's turn: a result at once, or, for a prompt starting with "hold",
    once ``hold(prompt)`` is set."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}

    def hold(self, prompt: str) -> asyncio.Event:
        return self.gates.setdefault(prompt, asyncio.Event())


@pytest.fixture
def replies(monkeypatch: pytest.MonkeyPatch, starts: Starts) -> Replies:
    scripted = Replies()

    async def query(client: ClaudeSDKClient, prompt: str, session_id: str = "default") -> None:
        client._prompt = prompt  # type: ignore[attr-defined]

    async def receive_response(client: ClaudeSDKClient) -> AsyncIterator[ResultMessage]:
        prompt = client._prompt  # type: ignore[attr-defined]
        if prompt.startswith("hold"):
            await scripted.hold(prompt).wait()
        yield ResultMessage(subtype="success", duration_ms=1, duration_api_ms=1, is_error=False, num_turns=1,
                            session_id="s", result="ok")

    monkeypatch.setattr(ClaudeSDKClient, "query", query)
    monkeypatch.setattr(ClaudeSDKClient, "receive_response", receive_response)
    return scripted


def sdk_id(store: WorkspaceStore, session_id: str) -> str:
    record = store.get(session_id)
    assert record is not None
    return record.workspace.sdk_session_id


async def run_turn(sessions: SessionManager, session_id: str, prompt: str = "hi") -> list[str]:
    """One whole turn; the event types it streamed."""
    turn = await sessions.start_turn(session_id, prompt)
    return [numbered.event.type async for numbered in turn.events()]


@pytest.mark.parametrize("limit", [1, 2])
async def test_at_most_the_configured_number_of_clis_start_at_once(tmp_path, starts, limit):
    sessions, store = manager(tmp_path, max_starting_clis=limit, prewarm=0)
    lives = [sessions._cli_factory.open(store.new_workspace()) for _ in range(5)]
    await asyncio.gather(*(sessions._cli_factory.connect(live, for_turn=True) for live in lives))
    assert len(starts.started) == 5 and starts.most_at_once == limit


@pytest.mark.parametrize("prewarm, store, capacity, sessions, target", [
    (4, False, None, 7, 4),  # no capacity: the pool holds AGENT_PREWARM
    (4, True, None, 0, 0),  # a pre-started CLI's session id is not the store's
    (1, False, 1, 0, 1),  # a one-session sandbox before its session
    (1, False, 1, 1, 0),  # ... and once it holds it: no second CLI
    (4, False, 3, 1, 2),  # never more than the sessions still to come
    (1, False, 3, 1, 1),
    (2, False, 3, 5, 0),  # more sessions than the capacity: none (they are still served)
    (2, True, 3, 0, 0),
])
def test_the_pool_holds_no_more_clis_than_sessions_to_come(prewarm, store, capacity, sessions, target):
    assert pool_target(prewarm, store=store, capacity=capacity, sessions=sessions) == target


async def test_a_one_session_server_pre_starts_one_cli_for_its_session_and_none_after(tmp_path, replies, starts):
    sessions, store = manager(tmp_path, prewarm=1, session_capacity=1)
    sessions._prestart._spare_cpu = FixedSpareCpu(2.0)
    await sessions.start()
    try:
        await until(lambda: sessions.status()["prewarmed"] == 1)
        assert sessions.status()["prewarm_target"] == 1
        await run_turn(sessions, "only")
        assert starts.started == [sdk_id(store, "only")]  # the pre-started CLI serves it
        await asyncio.sleep(1.0)  # the pool has had every chance to refill
        assert (sessions.status()["prewarmed"], sessions.status()["prewarm_target"], starts.alive) == (0, 0, 1)
        assert await sessions.delete("only")  # room for one more session: one more CLI
        await until(lambda: sessions.status()["prewarmed"] == 1)
    finally:
        await sessions.close()


async def test_a_cli_the_pool_started_while_the_last_session_came_is_closed(tmp_path, replies, starts):
    sessions, _ = manager(tmp_path, prewarm=1, session_capacity=1, max_starting_clis=2)
    sessions._prestart._spare_cpu = FixedSpareCpu(2.0)
    starts.release.clear()  # the pool's CLI is starting...
    await sessions.start()
    try:
        await until(lambda: starts.running == 1)
        turn = asyncio.create_task(run_turn(sessions, "only"))  # ...when the session comes, and starts its own
        await until(lambda: starts.running == 2)
        starts.release.set()
        await turn
        await until(lambda: starts.alive == 1)  # the session's; the pool's was not wanted any more
        assert sessions.status()["prewarmed"] == 0 and sessions.status()["prewarm_target"] == 0
    finally:
        await sessions.close()


async def test_the_pool_waits_for_spare_cpu(tmp_path, starts):
    sessions, _ = manager(tmp_path, prewarm=2)
    sessions._prestart._spare_cpu = spare = FixedSpareCpu(0.5)
    await sessions.start()
    try:
        await asyncio.sleep(1.0)
        assert starts.started == [] and sessions.status()["prewarmed"] == 0
        spare.value = 1.5
        for _ in range(50):
            if sessions.status()["prewarmed"] == 2:
                break
            await asyncio.sleep(0.1)
        assert sessions.status()["prewarmed"] == 2
    finally:
        await sessions.close()


async def test_the_pool_never_takes_a_start_slot_from_a_waiting_turn(tmp_path, starts):
    sessions, store = manager(tmp_path, prewarm=1, max_starting_clis=1)
    sessions._prestart._spare_cpu = FixedSpareCpu(2.0)
    first, second = (sessions._cli_factory.open(store.new_workspace()) for _ in range(2))
    starts.release.clear()  # the first turn's CLI start hangs, holding the only slot
    turns = [asyncio.create_task(sessions._cli_factory.connect(first, for_turn=True))]
    await sessions.start()
    await asyncio.sleep(1.0)  # the pool filler has had every chance to queue for the slot
    turns.append(asyncio.create_task(sessions._cli_factory.connect(second, for_turn=True)))
    await asyncio.sleep(0.1)
    try:
        starts.release.set()
        await asyncio.gather(*turns)
        for _ in range(50):
            if sessions.status()["prewarmed"] == 1:
                break
            await asyncio.sleep(0.1)
        assert sessions.status()["prewarmed"] == 1
        assert starts.started[:2] == [first.workspace.sdk_session_id, second.workspace.sdk_session_id]
    finally:
        await sessions.close()


async def test_a_new_cli_past_the_budget_replaces_the_least_recently_used_idle_one(tmp_path, replies, starts):
    sessions, store = manager(tmp_path, box=ONE_GIB_BOX, warm_sessions=3, prewarm=0)
    assert sessions._settings.cli_budget == 3
    for session_id in ("a", "b", "c", "a"):  # "b" is now the least recently used
        assert (await run_turn(sessions, session_id))[-2:] == ["result", "done"]
    assert starts.alive == 3
    await run_turn(sessions, "d")
    assert starts.closed == [sdk_id(store, "b")]
    assert starts.most_alive == 3 and sessions.status()["live_clis"] == 3
    await sessions.close()
    assert starts.alive == 0 and sessions.status()["live_clis"] == 0


async def test_a_turn_queues_until_a_cli_goes_idle(tmp_path, replies, starts):
    sessions, _ = manager(tmp_path, box=ONE_GIB_BOX, warm_sessions=3, prewarm=0)
    held = [asyncio.create_task(run_turn(sessions, sid, f"hold {sid}")) for sid in ("a", "b", "c")]
    await asyncio.sleep(0.3)
    waiting = asyncio.create_task(run_turn(sessions, "d"))
    await asyncio.sleep(0.3)
    assert not waiting.done() and sessions.status()["queued_turns"] == 1
    assert (await sessions.describe("d")) is None  # nothing made for a turn still queued
    replies.hold("hold b").set()
    assert (await waiting)[-2:] == ["result", "done"]
    assert starts.most_alive == 3 and sessions.status()["queued_turns"] == 0
    for sid in ("a", "c"):
        replies.hold(f"hold {sid}").set()
    await asyncio.gather(*held)
    await sessions.close()


async def test_past_the_queue_timeout_a_turn_is_refused_and_leaves_nothing(tmp_path, replies, starts):
    sessions, store = manager(tmp_path, box=ONE_GIB_BOX, warm_sessions=3, prewarm=0, queue_timeout_seconds=1)
    held = [asyncio.create_task(run_turn(sessions, sid, "hold")) for sid in ("a", "b", "c")]
    await asyncio.sleep(0.3)
    with pytest.raises(NoRoom):
        await run_turn(sessions, "late")
    assert store.get("late") is None and not (await sessions.describe("late"))
    assert sessions.status()["live_clis"] == 3 and sessions.status()["queued_turns"] == 0
    replies.hold("hold").set()
    await asyncio.gather(*held)
    await run_turn(sessions, "late")  # room again, once an idle CLI is past its grace
    await sessions.close()


async def test_queued_turns_are_served_in_arrival_order(tmp_path, replies, starts):
    sessions, store = manager(tmp_path, box=ONE_GIB_BOX, warm_sessions=3, prewarm=0)
    held = [asyncio.create_task(run_turn(sessions, sid, f"hold {sid}")) for sid in ("a", "b", "c")]
    await asyncio.sleep(0.3)
    first = asyncio.create_task(run_turn(sessions, "first", "hold first"))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(run_turn(sessions, "second", "hold second"))
    await asyncio.sleep(0.05)
    replies.hold("hold a").set()
    await asyncio.sleep(EVICTION_GRACE_SECONDS + 0.5)
    assert store.get("first") is not None and store.get("second") is None
    for prompt in ("hold b", "hold c", "hold first", "hold second"):
        replies.hold(prompt).set()
    await asyncio.gather(first, second, *held)
    assert starts.most_alive == 3
    await sessions.close()


async def test_a_queued_turn_leaves_a_session_its_cli_for_its_next_turn(tmp_path, replies, starts):
    sessions, store = manager(tmp_path, box=ONE_GIB_BOX, warm_sessions=3, prewarm=0)
    held = [asyncio.create_task(run_turn(sessions, sid, f"hold {sid}")) for sid in ("b", "c")]
    await run_turn(sessions, "a")
    waiting = asyncio.create_task(run_turn(sessions, "d"))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    assert (await run_turn(sessions, "a"))[-2:] == ["result", "done"]  # at once: its CLI is still there
    assert starts.started.count(sdk_id(store, "a")) == 1
    assert (await waiting)[-2:] == ["result", "done"]  # then "a" was idle long enough to make room
    assert starts.most_alive == 3
    for sid in ("b", "c"):
        replies.hold(f"hold {sid}").set()
    await asyncio.gather(*held)
    await sessions.close()


async def until(predicate: Any, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met")


async def test_the_pool_stays_within_the_budget_and_gives_way_to_turns(tmp_path, replies, starts):
    sessions, _ = manager(tmp_path, box=ONE_GIB_BOX, warm_sessions=1, prewarm=2)
    sessions._prestart._spare_cpu = FixedSpareCpu(2.0)
    await sessions.start()
    try:
        await until(lambda: sessions.status()["prewarmed"] == 2)
        for session_id in ("a", "b"):  # each served by a pre-started CLI; "a" is evicted past the warm cap
            await run_turn(sessions, session_id)
        await until(lambda: sessions.status()["prewarmed"] == 2)
        assert sessions.status()["live_clis"] == 3
        held = asyncio.create_task(run_turn(sessions, "b", "hold b"))
        await asyncio.sleep(0.1)
        resumed = await run_turn(sessions, "a")  # in a CLI of its own: a pre-started one makes room
        assert resumed[-2:] == ["result", "done"]
        await asyncio.sleep(1.0)
        assert sessions.status()["prewarmed"] == 1  # no room to refill while "a" and "b" hold theirs
        replies.hold("hold b").set()
        await held
        await until(lambda: sessions.status()["prewarmed"] == 2)
        assert starts.most_alive == 3
    finally:
        await sessions.close()


async def test_shutdown_refuses_queued_turns(tmp_path, replies, starts):
    sessions, _ = manager(tmp_path, box=ONE_GIB_BOX, warm_sessions=3, prewarm=0)
    held = [asyncio.create_task(run_turn(sessions, sid, "hold")) for sid in ("a", "b", "c")]
    await asyncio.sleep(0.3)
    waiting = asyncio.create_task(run_turn(sessions, "d"))
    await asyncio.sleep(0.1)
    sessions.stop_accepting()
    with pytest.raises(NotAccepting):
        await waiting
    replies.hold("hold").set()
    await asyncio.gather(*held)
    await sessions.close()
