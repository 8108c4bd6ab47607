"""Unit tests of when the server starts CLIs: the start limit and the pool's refill rules.

The CLI start itself is replaced by a recorder (these are rules about ordering,
not about the CLI); the end-to-end tests in test_live_sessions.py start real CLIs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hosting.config import Settings
from hosting.server.sessions import LiveSession, SessionManager
from hosting.server.workspaces import WorkspaceStore


class Starts:
    """Stands in for ``LiveSession.connect``: counts starts, the most at once, and can hold them."""

    def __init__(self) -> None:
        self.running = 0
        self.most_at_once = 0
        self.started: list[str] = []
        self.release = asyncio.Event()
        self.release.set()

    async def connect(self, live: LiveSession) -> None:
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        self.started.append(live.workspace.sdk_session_id)
        try:
            await self.release.wait()
            await asyncio.sleep(0.05)
        finally:
            self.running -= 1
        live.connected = True


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

    async def close(live: LiveSession) -> None:
        live.connected = False

    monkeypatch.setattr(LiveSession, "connect", connect)
    monkeypatch.setattr(LiveSession, "prime", no_prime)
    monkeypatch.setattr(LiveSession, "close", close)
    return recorder


def manager(tmp_path: Path, **settings: int) -> tuple[SessionManager, WorkspaceStore]:
    store = WorkspaceStore(tmp_path)
    store.ensure_writable()
    return SessionManager(Settings(data_dir=tmp_path, **settings), store), store


@pytest.mark.parametrize("limit", [1, 2])
async def test_at_most_the_configured_number_of_clis_start_at_once(tmp_path, starts, limit):
    sessions, store = manager(tmp_path, max_starting_clis=limit, prewarm=0)
    lives = [sessions._open(store.new_workspace()) for _ in range(5)]
    await asyncio.gather(*(sessions._connect(live, for_turn=True) for live in lives))
    assert len(starts.started) == 5 and starts.most_at_once == limit


async def test_the_pool_waits_for_spare_cpu(tmp_path, starts):
    sessions, _ = manager(tmp_path, prewarm=2)
    sessions._spare_cpu = spare = FixedSpareCpu(0.5)
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
    sessions._spare_cpu = FixedSpareCpu(2.0)
    first, second = (sessions._open(store.new_workspace()) for _ in range(2))
    starts.release.clear()  # the first turn's CLI start hangs, holding the only slot
    turns = [asyncio.create_task(sessions._connect(first, for_turn=True))]
    await sessions.start()
    await asyncio.sleep(1.0)  # the pool filler has had every chance to queue for the slot
    turns.append(asyncio.create_task(sessions._connect(second, for_turn=True)))
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
