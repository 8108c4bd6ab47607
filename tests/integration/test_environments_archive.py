"""The environments orchestrator's archive ledger (which terminated sessions' files to remove
when), on a file and on a real Redis: the first end time kept, and outliving its process."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from hosting.environments.archive import ArchivedSessions, FileArchive, RedisArchive


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
