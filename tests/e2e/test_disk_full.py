"""A small data volume, filled: the disk budget, a full disk, and recovery, end to end.

Each test mounts a 40 MiB tmpfs as the server's data dir (root only; skipped
otherwise) and always unmounts it, after its servers are stopped. Real servers,
the real SDK and CLI, the local model; Redis for the store test.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hosting.server.disk import usage
from tests.support.polling import wait_for
from tests.support.servers import bound_sessions, workspace_dirs, workspace_of
from tests.support.turns import Turn, post_turn

pytestmark = pytest.mark.e2e

MiB = 2**20
RECALL = "What value did I ask you to remember?"
BUDGET = 8 * MiB


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A 40 MiB tmpfs to serve as a data dir. Request it before ``start_server``, so that the
    servers are stopped before it is unmounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs as the data dir needs root")
    mount = tmp_path / "data"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m,mode=0755", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
        if os.path.ismount(mount):
            subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(path: Path, size: int | None = None) -> None:
    """Write ``size`` bytes to ``path``, or (``None``) as many as the volume takes."""
    with open(path, "wb", buffering=0) as handle:
        if size is not None:
            handle.write(b"\0" * size)
            return
        for chunk in (MiB, 4096):
            try:
                while True:
                    handle.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC


def completed(turn: Turn) -> Turn:
    assert turn.types[0] == "session" and turn.types[-2:] == ["result", "done"], turn.events
    assert turn.of("error") == [], turn.of("error")
    return turn


def on_disk(data_dir: Path) -> tuple[set[str], set[str]]:
    return bound_sessions(data_dir), workspace_dirs(data_dir)


def refused_new_session(server: Any, session_id: str) -> dict[str, Any]:
    """POST a first turn that must be refused with 507, creating nothing; the JSON body."""
    before = on_disk(server.data_dir)
    response = httpx.post(f"{server.base_url}/sessions/{session_id}/messages", json={"prompt": "hi"}, timeout=60)
    assert response.status_code == 507, response.text
    assert response.headers["content-type"] == "application/json" and int(response.headers["retry-after"]) > 0
    assert on_disk(server.data_dir) == before  # no half-made workspace or binding
    refusals = [line for line in server.log().splitlines() if "refused (507)" in line and session_id in line]
    assert len(refusals) == 1, refusals  # one line, no traceback
    assert "Traceback" not in server.log()
    return response.json()


def ready(server: Any) -> httpx.Response:
    return httpx.get(f"{server.base_url}/ready", timeout=10)


@pytest.mark.timeout(300)
def test_a_full_volume_refuses_new_sessions_keeps_old_ones_and_recovers(small_volume, start_server):
    server = start_server(data_dir=small_volume, AGENT_DISK_BUDGET_BYTES=str(BUDGET), AGENT_PREWARM="0")
    status = ready(server).json()
    assert status["ready"] is True and status["disk_budget_bytes"] == BUDGET
    assert status["disk_total_bytes"] == 40 * MiB and status["disk_free_bytes"] > 30 * MiB
    completed(post_turn(server.base_url, "keep", "Remember this value: K1"))

    # 1. Over the budget: new sessions are refused, the existing one keeps working.
    fill(small_volume / "filler-in-budget", BUDGET + MiB)
    detail = refused_new_session(server, "new-1")["detail"]
    assert "budget" in detail and "existing sessions keep working" in detail.lower()
    not_ready = ready(server)
    assert not_ready.status_code == 503 and not_ready.json()["disk_over_budget"] is True
    assert "You asked me to remember K1." in completed(post_turn(server.base_url, "keep", RECALL)).text

    # 2. Room again: new sessions work.
    (small_volume / "filler-in-budget").unlink()
    wait_for(lambda: ready(server).status_code == 200, timeout=15)
    completed(post_turn(server.base_url, "new-2", "Remember this value: N2"))

    # 3. The volume filled up completely.
    fill(small_volume / "filler")
    assert "free" in refused_new_session(server, "new-3")["detail"]
    status = ready(server).json()
    assert status["ready"] is False and status["disk_free_bytes"] < status["disk_free_floor_bytes"]
    # A turn of an existing session whose transcript cannot be written ends with storage_full, never a success.
    transcript = next((workspace_of(small_volume, "keep") / "config").glob("projects/*/*.jsonl"))
    failed = post_turn(server.base_url, "keep", "Remember this value: K2 " + "padding " * 2000)
    assert failed.types[0] == "session" and failed.types[-2:] == ["error", "done"], failed.types
    (error,) = failed.of("error")
    assert error["code"] == "storage_full" and error["retryable"] is True
    assert transcript.read_bytes().endswith(b"\n")  # the torn line was cut
    assert "Traceback" not in server.log()
    assert sum("could not be saved" in line for line in server.log().splitlines()) == 1

    # 4. Space freed: new sessions work, old ones recall, and an acknowledged turn survives SIGKILL.
    (small_volume / "filler").unlink()
    wait_for(lambda: ready(server).status_code == 200, timeout=15)
    assert "You asked me to remember K" in completed(post_turn(server.base_url, "keep", RECALL)).text
    completed(post_turn(server.base_url, "after", "Remember this value: A3"))
    server.kill(signal.SIGKILL)
    restarted = start_server(data_dir=small_volume, AGENT_DISK_BUDGET_BYTES=str(BUDGET), AGENT_PREWARM="0")
    assert "You asked me to remember A3." in completed(post_turn(restarted.base_url, "after", RECALL)).text
    assert "You asked me to remember N2." in completed(post_turn(restarted.base_url, "new-2", RECALL)).text


@pytest.mark.stores
@pytest.mark.timeout(300)
def test_over_budget_with_a_store_evicts_idle_local_copies_least_recently_used_first(small_volume, start_server,
                                                                                    redis_url):
    server = start_server(data_dir=small_volume, AGENT_SESSION_STORE=redis_url, AGENT_DISK_BUDGET_BYTES=str(BUDGET),
                          AGENT_LOCAL_CACHE_SECONDS="0", AGENT_WARM_SESSIONS="0", AGENT_PREWARM="0")
    older, newer = f"lru-old-{os.getpid()}", f"lru-new-{os.getpid()}"
    completed(post_turn(server.base_url, older, "Remember this value: O1"))
    completed(post_turn(server.base_url, newer, "Remember this value: N1"))
    older_size = usage(workspace_of(small_volume, older))
    assert older_size > 16 * 1024

    # Just over the budget: evicting the least recently used session is enough.
    fill(small_volume / "filler", BUDGET - usage(small_volume) + 8 * 1024)
    wait_for(lambda: older not in bound_sessions(small_volume), timeout=30)
    assert newer in bound_sessions(small_volume)
    wait_for(lambda: ready(server).status_code == 200, timeout=15)
    recall = completed(post_turn(server.base_url, older, RECALL))  # restored from the store
    assert recall.of("session")[0]["resumed"] is True and "You asked me to remember O1." in recall.text

    # Far over: every idle local copy goes, and a new session is still refused.
    fill(small_volume / "filler-2", BUDGET)
    wait_for(lambda: not bound_sessions(small_volume), timeout=30)
    assert "budget" in refused_new_session(server, "lru-brand-new")["detail"]
    (small_volume / "filler-2").unlink()
    (small_volume / "filler").unlink()
    wait_for(lambda: ready(server).status_code == 200, timeout=15)
    assert "You asked me to remember N1." in completed(post_turn(server.base_url, newer, RECALL)).text
