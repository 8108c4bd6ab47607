"""Unit tests of retention, the disk budget and full-disk handling: the pure rules, the
workspace moves, and the session manager's bookkeeping around them.

The CLI is replaced by the recorders of test_cli_starts.py (these are rules about what
may be removed or refused, not about the CLI), the disk by a stand-in where the rule
under test is "over the budget"; tests/e2e/test_retention.py and tests/e2e/test_disk_full.py
run the same paths end to end on real servers, real CLIs and a real small volume.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from claude_agent_sdk import InMemorySessionStore

import hosting.server.sessions as sessions_module
from hosting.client import AgentClient, StorageFullError
from hosting.contract import durable_session_id
from hosting.server.disk import FULL_BELOW_BYTES, MIN_FREE_BYTES, Disk, DiskState, StorageFull, free_floor, out_of_space
from hosting.server.durable import store_holds, store_key
from hosting.server.retention import Due, Retention
from hosting.server.sessions import SessionManager
from hosting.server.settings import Settings
from hosting.server.workspaces import WorkspaceStore, drop_torn_tail, turn_recorded
from hosting.settings_env import ConfigError
from tests.unit.test_cli_starts import ONE_GIB_BOX, manager, replies, run_turn, starts  # noqa: F401 - fixtures

MiB = 2**20
GiB = 2**30
DAY = 24 * 3600.0


# -- settings ------------------------------------------------------------------


def test_retention_and_budget_settings_default_and_override():
    default = Settings.from_env({})
    assert (default.session_ttl_seconds, default.session_sweep_seconds) == (30 * DAY, 3600.0)
    assert default.local_cache_seconds == DAY and default.disk_budget_bytes is None
    custom = Settings.from_env({"AGENT_SESSION_TTL_SECONDS": "0", "AGENT_SESSION_SWEEP_SECONDS": "0.5",
                                "AGENT_LOCAL_CACHE_SECONDS": "0", "AGENT_DISK_BUDGET_BYTES": str(GiB)})
    assert (custom.session_ttl_seconds, custom.session_sweep_seconds) == (None, 0.5)
    assert custom.local_cache_seconds is None and custom.disk_budget_bytes == GiB


@pytest.mark.parametrize("name, value", [("AGENT_SESSION_SWEEP_SECONDS", "0"), ("AGENT_DISK_BUDGET_BYTES", "-1"),
                                         ("AGENT_DISK_BUDGET_BYTES", "5G"), ("AGENT_LOCAL_CACHE_SECONDS", "soon")])
def test_bad_retention_settings_name_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


# -- the budget ------------------------------------------------------------------


def test_the_default_budget_keeps_a_tenth_of_the_volume_and_at_least_256_mib_free():
    assert free_floor(5 * GiB, None) == GiB // 2
    assert free_floor(GiB, None) == MIN_FREE_BYTES == 256 * MiB
    five = DiskState(total=5 * GiB, free=GiB, floor=free_floor(5 * GiB, None), budget=None, used=None)
    assert not five.over and five.report()["disk_over_budget"] is False
    tight = DiskState(total=5 * GiB, free=GiB // 2 - 1, floor=free_floor(5 * GiB, None), budget=None, used=None)
    assert tight.over and not tight.full and "below the 512 MiB this server keeps free" in tight.describe()


def test_an_explicit_budget_caps_the_data_dir_and_a_nearly_empty_volume_is_still_full():
    assert free_floor(40 * MiB, 8 * MiB) == FULL_BELOW_BYTES
    within = DiskState(total=40 * MiB, free=30 * MiB, floor=FULL_BELOW_BYTES, budget=8 * MiB, used=7 * MiB)
    assert not within.over
    over = DiskState(total=40 * MiB, free=30 * MiB, floor=FULL_BELOW_BYTES, budget=8 * MiB, used=9 * MiB)
    assert over.over and not over.full and "budget of 8.0 MiB" in over.describe()
    full = DiskState(total=40 * MiB, free=MiB, floor=FULL_BELOW_BYTES, budget=8 * MiB, used=MiB)
    assert full.over and full.full
    no_inodes = DiskState(total=40 * MiB, free=30 * MiB, floor=FULL_BELOW_BYTES, budget=None, used=None,
                          inodes_free=3)
    assert no_inodes.full and no_inodes.over and "3 free inodes" in no_inodes.describe()


async def test_between_measures_the_data_dir_size_is_estimated_from_the_free_space(tmp_path, monkeypatch):
    volume = {"free": 30 * MiB}
    data_dir = {"size": MiB}
    disk = Disk(tmp_path, budget=8 * MiB)
    monkeypatch.setattr(disk, "_volume", lambda: (40 * MiB, volume["free"], None))
    walks = []
    monkeypatch.setattr("hosting.server.disk.usage", lambda root: walks.append(root) or data_dir["size"])
    assert (await disk.check()).used == MiB and len(walks) == 1  # measured once to begin with
    volume["free"] -= 2 * MiB  # the server wrote 2 MiB: it shows at once, without a walk
    assert disk.state().used == 3 * MiB and not disk.state().over
    volume["free"] -= 6 * MiB  # someone else wrote 6 MiB
    assert (await disk.check()).over and len(walks) == 1  # measured moments ago: the estimate stands
    monkeypatch.setattr("hosting.server.disk.MEASURE_AGAIN_SECONDS", 0.0)
    data_dir["size"] = 3 * MiB
    assert not (await disk.check()).over and len(walks) == 2  # over, so measured again before acting
    volume["free"] += 6 * MiB  # the other writer deleted its 6 MiB: never below the last measure
    assert disk.state().used == 3 * MiB
    disk.forget(2 * MiB)  # the server deleted 2 MiB...
    volume["free"] += 2 * MiB  # ...which the volume now has free
    assert disk.state().used == MiB
    monkeypatch.setattr("hosting.server.disk.MEASURE_EVERY_SECONDS", 0.0)
    await disk.check()
    assert len(walks) == 3  # and now and then, over or not
    assert Disk(tmp_path, budget=None).state().used is None  # no budget, nothing to measure


def test_a_full_disk_is_recognised_through_the_exception_chain():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("the CLI failed") from exc
    except RuntimeError as wrapped:
        assert out_of_space(wrapped)
    assert out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not out_of_space(OSError(errno.EACCES, "Permission denied"))


# -- retention rules ---------------------------------------------------------------


def test_retention_windows_and_order():
    now = 1000 * DAY
    local_only = Retention(ttl_seconds=30 * DAY, local_cache_seconds=None)
    assert local_only.due(now - 31 * DAY, now) is Due.EXPIRED and local_only.due(now - 29 * DAY, now) is None
    stored = Retention(ttl_seconds=30 * DAY, local_cache_seconds=DAY)
    assert stored.due(now - 2 * DAY, now) is Due.LOCAL_COPY and stored.due(now - 31 * DAY, now) is Due.EXPIRED
    assert Retention(ttl_seconds=None, local_cache_seconds=None).due(0, now) is None  # TTL 0: keep forever
    order = stored.sweep_order([("new", now), ("old", now - 40 * DAY), ("mid", now - 3 * DAY)], now)
    assert order == [("old", now - 40 * DAY, Due.EXPIRED), ("mid", now - 3 * DAY, Due.LOCAL_COPY)]


# -- transcripts on a full disk ------------------------------------------------------------


def test_a_turn_missing_from_the_transcript_or_cut_short_is_not_recorded(tmp_path):
    transcript = tmp_path / "t.jsonl"
    transcript.write_bytes(b'{"uuid": "u1"}\n')
    offset = transcript.stat().st_size
    with transcript.open("ab") as handle:
        handle.write(b'{"uuid": "u2"}\n{"uuid": "u3"}\n')
    assert turn_recorded(transcript, offset, "u3") and turn_recorded(transcript, offset, None)
    assert not turn_recorded(transcript, offset, "u4")  # the reply never reached it
    assert not turn_recorded(None, 0, "u1")
    with transcript.open("ab") as handle:
        handle.write(b'{"uuid": "u4", "message": "cut sh')
    assert not turn_recorded(transcript, offset, "u4")
    drop_torn_tail(transcript, chunk=8)
    assert transcript.read_bytes() == b'{"uuid": "u1"}\n{"uuid": "u2"}\n{"uuid": "u3"}\n'
    drop_torn_tail(transcript)  # whole lines: unchanged
    assert transcript.read_bytes().endswith(b'"u3"}\n')


# -- workspaces -----------------------------------------------------------------------


def _store(tmp_path: Path) -> WorkspaceStore:
    store = WorkspaceStore(tmp_path)
    store.ensure_writable()
    return store


def test_removal_unbinds_then_moves_the_workspace_out_of_sight(tmp_path):
    store = _store(tmp_path)
    record = store.bind("gone", store.new_workspace())
    (record.workspace.work_dir / "notes.txt").write_text("x")
    moved = store.unbind("gone", unless_held=True)
    assert moved is not None and moved.parent == tmp_path / "trash" and (moved / "work" / "notes.txt").exists()
    assert store.get("gone") is None and not record.workspace.root.exists()
    store.purge(moved)
    assert store.trash() == [] and store.unbind("gone") is None


def test_a_workspace_a_process_holds_is_not_removed(tmp_path):
    store = _store(tmp_path)
    record = store.bind("held", store.new_workspace())
    lock = record.workspace.try_lock()
    assert lock is not None
    try:
        assert store.unbind("held", unless_held=True) is None
        assert store.get("held") == record and record.workspace.root.exists()
    finally:
        record.workspace.unlock(lock)
    assert store.unbind("held", unless_held=True) is not None


def test_orphans_are_old_unbound_workspaces_and_a_held_one_stays(tmp_path):
    store = _store(tmp_path)
    store.bind("bound", store.new_workspace())
    old, fresh, held = store.new_workspace(), store.new_workspace(), store.new_workspace()
    past = time.time() - 7200
    for workspace in (old, held):
        os.utime(workspace.root, (past, past))
    assert set(store.orphans(time.time() - 3600)) == {old.root, held.root}
    lock = held.try_lock()
    assert lock is not None
    os.utime(held.root, (past, past))
    try:
        assert store.take_orphan(held.root) is None
        moved = store.take_orphan(old.root)
        assert moved is not None and not old.root.exists() and fresh.root.exists()
    finally:
        held.unlock(lock)


def test_the_last_turn_is_the_stamp_or_a_later_transcript(tmp_path):
    store = _store(tmp_path)
    record = store.bind("s", store.new_workspace())
    store.stamp("s", 1000.0)
    assert dict(store.last_turns())["s"] == 1000.0 and store.last_turn("s") == 1000.0
    transcript = record.workspace.config_dir / "projects" / "p" / f"{record.workspace.sdk_session_id}.jsonl"
    transcript.parent.mkdir(parents=True)
    transcript.write_text("{}\n")
    os.utime(transcript, (2000.0, 2000.0))
    assert store.last_turn("s") == 2000.0  # a binding made before stamps existed


def test_a_workspace_that_cannot_be_made_leaves_nothing(tmp_path, monkeypatch):
    store = _store(tmp_path)
    real_mkdir = Path.mkdir

    def mkdir(path: Path, *args: Any, **kwargs: Any) -> None:
        if path.name == "config":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(OSError):
        store.new_workspace()
    assert list((tmp_path / "workspaces").iterdir()) == []


# -- the session manager ----------------------------------------------------------------


class FakeDisk:
    """Stands in for :class:`Disk`: over the budget while ``over()`` says so."""

    def __init__(self, over: Any) -> None:
        self.over = over

    def state(self) -> DiskState:
        over = self.over()
        return DiskState(total=40 * MiB, free=30 * MiB, floor=FULL_BELOW_BYTES, budget=8 * MiB,
                         used=9 * MiB if over else MiB)

    async def check(self) -> DiskState:
        return self.state()

    async def measure(self) -> None:
        return None

    def forget(self, size: int) -> None:
        return None


def with_disk(monkeypatch: pytest.MonkeyPatch, over: Any) -> None:
    monkeypatch.setattr(sessions_module, "Disk", lambda data_dir, budget: FakeDisk(over))


def age(store: WorkspaceStore, session_id: str, seconds: float) -> None:
    store.stamp(session_id, time.time() - seconds)


async def test_the_sweep_removes_idle_sessions_but_never_a_running_or_live_one(tmp_path, replies, starts):
    sessions, store = manager(tmp_path, warm_sessions=1, prewarm=0, session_ttl_seconds=60)
    for session_id in ("idle", "warm"):  # the warm cap is 1: "idle" has no CLI any more
        await run_turn(sessions, session_id)
    running = asyncio.create_task(run_turn(sessions, "running", "hold"))
    await asyncio.sleep(0.2)
    idle_root = store.get("idle").workspace.root  # type: ignore[union-attr]
    for session_id in ("idle", "warm", "running"):
        age(store, session_id, 120)
    assert await sessions._upkeep.sweep()
    assert store.get("idle") is None and not idle_root.exists()
    assert store.get("warm") is not None and store.get("running") is not None
    replies.hold("hold").set()
    await running
    assert store.get("running") is not None  # its turn just ended: stamped
    events = await run_turn(sessions, "idle")  # a removed session's id starts afresh
    assert events[-2:] == ["result", "done"] and store.get("idle").workspace.root != idle_root  # type: ignore[union-attr]
    await sessions.close()


async def test_the_sweep_keeps_a_session_whose_turn_waits_for_a_cli(tmp_path, replies, starts):
    sessions, store = manager(tmp_path, box=ONE_GIB_BOX, warm_sessions=3, prewarm=0, session_ttl_seconds=60)
    await run_turn(sessions, "x")
    held = [asyncio.create_task(run_turn(sessions, sid, "hold")) for sid in ("a", "b", "c")]
    await asyncio.sleep(1.0)  # "c" took the CLI of "x", idle past its grace
    waiting = asyncio.create_task(run_turn(sessions, "x"))
    await asyncio.sleep(0.1)
    assert sessions.status()["queued_turns"] == 1
    age(store, "x", 120)
    await sessions._upkeep.sweep()
    assert store.get("x") is not None  # no CLI holds it, but a turn is on its way
    replies.hold("hold").set()
    assert (await waiting)[-2:] == ["result", "done"]
    await asyncio.gather(*held)
    await sessions.close()


async def test_a_sweep_does_bounded_work(tmp_path, replies, starts, monkeypatch):
    monkeypatch.setattr("hosting.server.retention.SWEEP_BATCH", 2)
    sessions, store = manager(tmp_path, warm_sessions=0, prewarm=0, session_ttl_seconds=60)
    for n in range(5):
        await run_turn(sessions, f"s{n}")
        age(store, f"s{n}", 120 + n)
    assert not await sessions._upkeep.sweep()  # more was due: sweep again soon
    assert len(store.last_turns()) == 3 and store.get("s4") is None and store.get("s3") is None  # oldest first
    assert not await sessions._upkeep.sweep() and await sessions._upkeep.sweep()
    assert store.last_turns() == []
    await sessions.close()


async def test_a_first_turn_that_cannot_bind_for_want_of_room_leaves_nothing(tmp_path, replies, starts, monkeypatch):
    sessions, store = manager(tmp_path, prewarm=0)

    def no_room(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(WorkspaceStore, "bind", no_room)
    with pytest.raises(StorageFull, match="No space left on device"):
        await run_turn(sessions, "new")
    assert list((tmp_path / "workspaces").iterdir()) == [] and list((tmp_path / "sessions").iterdir()) == []
    assert sessions.status()["running_turns"] == 0 and sessions.status()["live_clis"] == 0
    await sessions.close()


async def test_over_budget_without_a_store_new_sessions_are_refused_and_old_ones_run(tmp_path, replies, starts,
                                                                                     monkeypatch):
    over = {"now": False}
    with_disk(monkeypatch, lambda: over["now"])
    sessions, store = manager(tmp_path, prewarm=0)
    await run_turn(sessions, "old")
    over["now"] = True
    with pytest.raises(StorageFull, match="budget"):
        await run_turn(sessions, "new")
    assert store.get("new") is None
    assert (await run_turn(sessions, "old"))[-2:] == ["result", "done"]
    assert sessions.status()["disk_over_budget"] is True and store.get("old") is not None  # nothing deleted
    await sessions.close()


def stored_manager(tmp_path: Path, store: InMemorySessionStore, **settings: Any) -> tuple[SessionManager, WorkspaceStore]:
    workspaces = WorkspaceStore(tmp_path)
    workspaces.ensure_writable()
    return SessionManager(Settings(data_dir=tmp_path, prewarm=0, warm_sessions=0, **settings), workspaces, store), \
        workspaces


async def test_over_budget_with_a_store_idle_copies_go_least_recently_used_first(tmp_path, replies, starts,
                                                                                 monkeypatch):
    workspaces_seen: dict[str, WorkspaceStore] = {}
    with_disk(monkeypatch, lambda: len(workspaces_seen["store"].last_turns()) > 2)
    sessions, workspaces = stored_manager(tmp_path, InMemorySessionStore())
    workspaces_seen["store"] = workspaces
    for n, session_id in enumerate(("a", "b", "c")):
        await run_turn(sessions, session_id)
        age(workspaces, session_id, 100 - n)  # "a" the least recently used
    state = await sessions._upkeep.make_room()
    assert not state.over and {s for s, _ in workspaces.last_turns()} == {"b", "c"}
    assert (await run_turn(sessions, "a"))[-2:] == ["result", "done"]  # a copy can always come back
    await sessions.close()


async def test_a_local_copy_goes_only_while_the_store_holds_all_of_it(tmp_path):
    store = InMemorySessionStore()
    transcript = tmp_path / "t.jsonl"
    entries = [{"type": "user", "uuid": "u1"}, {"type": "assistant", "uuid": "u2"}, {"type": "mode"}]
    transcript.write_text("".join(json.dumps(e) + "\n" for e in entries))
    key = store_key("sdk-1")
    await store.append(key, entries[:1])
    assert not await store_holds(store, transcript, "sdk-1")  # the mirror dropped a batch
    await store.append(key, entries[1:])
    assert await store_holds(store, transcript, "sdk-1")


async def test_a_turn_during_a_removal_finds_a_whole_new_workspace(tmp_path, replies, starts, monkeypatch):
    sessions, workspaces = stored_manager(tmp_path, InMemorySessionStore(), session_ttl_seconds=60)
    await run_turn(sessions, "s")
    root = workspaces.get("s").workspace.root  # type: ignore[union-attr]
    assert root.name == durable_session_id("s")  # a removal and a new turn share the path
    (root / "work" / "old.txt").write_text("from before")
    age(workspaces, "s", 120)
    purging, release = threading.Event(), threading.Event()
    real_purge = WorkspaceStore.purge

    def slow_purge(path: Path) -> None:
        purging.set()
        release.wait(10)
        real_purge(path)

    monkeypatch.setattr(WorkspaceStore, "purge", staticmethod(slow_purge))
    sweep = asyncio.create_task(sessions._upkeep.sweep())
    await asyncio.to_thread(purging.wait, 10)
    assert (await run_turn(sessions, "s"))[-2:] == ["result", "done"]
    assert root.exists() and not (root / "work" / "old.txt").exists()  # fresh, not half-deleted
    release.set()
    await sweep
    assert root.exists() and workspaces.get("s") is not None and workspaces.trash() == []
    await sessions.close()


# -- the client ------------------------------------------------------------------------


async def test_the_client_raises_storage_full_on_507():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(507, json={"detail": "the data volume is full"}, headers={"Retry-After": "30"})

    async with AgentClient("http://agent", transport=httpx.MockTransport(handler)) as agent:
        with pytest.raises(StorageFullError) as refused:
            await agent.arun("hi")
    assert refused.value.status == 507 and refused.value.retry_after == 30.0
    assert refused.value.detail == "the data volume is full"
