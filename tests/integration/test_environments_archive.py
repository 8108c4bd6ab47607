"""The environments orchestrator's shared state, on a file or in memory and on a real Redis: the
archive ledger (which terminated sessions' files to remove when: the first end time kept, and
outliving its process) and the per-session locks under the environment's keys."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from hosting.environments.archive import ArchivedSessions, FileArchive, RedisArchive
from hosting.environments.locks import open_session_locks


@pytest.fixture(params=["file", pytest.param("redis", marks=pytest.mark.stores)])
async def archive(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Callable[[], ArchivedSessions]]:
    """A factory: each call is a new ledger on the same file or Redis key (a restart, another orchestrator)."""
    environment = f"env_{secrets.token_hex(4)}"
    opened: list[ArchivedSessions] = []

    def open_archive() -> ArchivedSessions:
        made = (FileArchive(tmp_path / "archived-sessions.json") if request.param == "file"
                else RedisArchive(request.getfixturevalue("redis_url"), environment))
        opened.append(made)
        return made

    yield open_archive
    for made in opened:
        await made.aclose()


async def test_the_archive_keeps_the_first_end_time_and_outlives_its_process(
        archive: Callable[[], ArchivedSessions]) -> None:
    first = archive()
    assert await first.ended_before(1e12) == []
    await first.add("sesn_b", 200.0)
    await first.add("sesn_a", 100.0)
    await first.add("sesn_a", 300.0)  # ended again: still archived since 100
    assert await first.ended_before(150.0) == ["sesn_a"]
    assert await first.ended_before(100.0) == []

    restarted = archive()
    assert await restarted.ended_before(1e12) == ["sesn_a", "sesn_b"]
    await restarted.discard("sesn_a")
    await restarted.discard("sesn_never")
    assert await first.ended_before(1e12) == ["sesn_b"]


@pytest.mark.parametrize("where", ["memory", pytest.param("redis", marks=pytest.mark.stores)])
async def test_session_locks_exclude_per_session_under_the_environment_s_keys(
        request: pytest.FixtureRequest, where: str) -> None:
    environment = f"env_{secrets.token_hex(4)}"
    url = request.getfixturevalue("redis_url") if where == "redis" else None
    locks = open_session_locks(url, environment, ttl_seconds=60)
    # Another orchestrator of the environment (with Redis; in memory there is only one).
    other = open_session_locks(url, environment, ttl_seconds=60) if url else locks
    try:
        async with locks.holding("s", wait_seconds=0.1) as held:
            assert held
            async with other.holding("s", wait_seconds=0.1) as again:
                assert not again
            async with other.holding("t", wait_seconds=0) as elsewhere:
                assert elsewhere, "another session"
            if url is not None:
                connection = aioredis.Redis.from_url(url)
                assert await connection.exists(f"agent-environments:{environment}:lock:s")
                await connection.aclose()
        async with other.holding("s", wait_seconds=0) as after:
            assert after
    finally:
        await locks.aclose()
        await other.aclose()
