"""Retention of local sessions and the disk budget: what keeps the data volume from filling.

- **Retention.** A session whose last turn ended more than ``AGENT_SESSION_TTL_SECONDS``
  ago is removed from local disk (binding and workspace) by a periodic sweep. With a
  SessionStore, the local copy of a session idle for ``AGENT_LOCAL_CACHE_SECONDS`` goes
  sooner: the store restores it on the session's next turn.
- **Budget.** With a store, a volume over its budget (``disk.py``) gets room made by
  evicting local copies of idle sessions, least recently used first. Without one,
  nothing is deleted to make room: new sessions are refused (HTTP 507) until there is.

Short of the TTL, a local copy goes only while the store provably holds every entry of
its transcript. Nothing is removed while a turn runs on the session or a CLI holds it
(the server's own bookkeeping, ``in_use``, and the cross-process workspace lock), and a
removal is one synchronous step on the event loop (binding unlinked, workspace renamed
into the trash) with the files deleted in a thread afterwards: a turn arriving at any
moment finds the session whole or gone, and starts fresh (or restores it) if gone.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from claude_agent_sdk import SessionStore

from hosting.errors import StoreUnavailable
from hosting.server.disk import Disk, DiskState, usage
from hosting.server.durable import store_holds
from hosting.server.workspaces import Workspace, WorkspaceStore

logger = logging.getLogger("hosting.server.retention")

SWEEP_BATCH = 100
"""Most sessions (and as many unbound workspaces) one sweep removes; when more are due,
the next sweep follows after :data:`SWEEP_AGAIN_SECONDS` instead of a whole interval."""

SWEEP_AGAIN_SECONDS = 1.0

FIRST_SWEEP_SECONDS = 60.0
"""The first sweep waits this long (or the sweep interval, if shorter): start-up is busy
starting CLIs, and nothing left by the last run is urgent."""

BUDGET_CHECK_SECONDS = 5.0
"""With a store, how often the volume is checked against the budget between requests."""

ORPHAN_GRACE_SECONDS = 3600.0
"""An unbound workspace is removed once unchanged this long: binding a new one takes
microseconds, so only a crash (or a failed first turn) leaves one this old."""


class Due(enum.Enum):
    EXPIRED = "expired"
    """Past the TTL: the conversation is over (the store expires its copy too)."""
    LOCAL_COPY = "local copy"
    """Idle past the local cache time: the store keeps the conversation."""


@dataclass(frozen=True)
class Retention:
    """When a local session is due for removal."""

    ttl_seconds: float | None
    local_cache_seconds: float | None
    """Only with a store; ``None``: local copies go at the TTL or under budget pressure."""

    def due(self, last_turn: float, now: float) -> Due | None:
        idle = now - last_turn
        if self.ttl_seconds is not None and idle >= self.ttl_seconds:
            return Due.EXPIRED
        if self.local_cache_seconds is not None and idle >= self.local_cache_seconds:
            return Due.LOCAL_COPY
        return None

    def sweep_order(self, last_turns: Iterable[tuple[str, float]], now: float) -> list[tuple[str, float, Due]]:
        """The sessions due for removal, least recently used first."""
        due = [(session_id, last, reason) for session_id, last in last_turns
               if (reason := self.due(last, now)) is not None]
        return sorted(due, key=lambda item: item[1])


def least_recent_first(last_turns: Iterable[tuple[str, float]]) -> list[tuple[str, float]]:
    return sorted(last_turns, key=lambda item: item[1])


class Upkeep:
    """Runs retention and the disk budget for one server, inside its event loop.

    ``in_use(session_id, sdk_session_id)`` is the session manager's answer to "may this
    be removed now": ``True`` while a turn runs on the session or a CLI of this process
    holds its workspace (``session_id`` is ``None`` for an unbound workspace).
    """

    def __init__(self, workspaces: WorkspaceStore, disk: Disk, store: SessionStore | None, retention: Retention,
                 sweep_seconds: float, in_use: Callable[[str | None, str], bool]) -> None:
        self._workspaces = workspaces
        self._disk = disk
        self._store = store
        self._retention = retention
        self._sweep_seconds = sweep_seconds
        self._in_use = in_use
        self._evicting = asyncio.Lock()
        self._unevictable: dict[str, float] = {}  # session -> last turn when the store lacked part of it

    async def run(self) -> None:
        """Sweep every ``sweep_seconds`` (sooner while more is due) and, with a store,
        keep the volume within its budget."""
        loop = asyncio.get_running_loop()
        await self._disk.measure()
        next_sweep = loop.time() + min(self._sweep_seconds, FIRST_SWEEP_SECONDS)
        while True:
            wait = next_sweep - loop.time()
            await asyncio.sleep(max(0.0, min(wait, BUDGET_CHECK_SECONDS) if self._store is not None else wait))
            try:
                if self._store is not None:
                    await self.make_room()
                if loop.time() >= next_sweep:
                    finished = await self.sweep()
                    next_sweep = loop.time() + (self._sweep_seconds if finished
                                                else min(self._sweep_seconds, SWEEP_AGAIN_SECONDS))
            except Exception:  # noqa: BLE001 - upkeep must outlive one bad pass
                logger.exception("disk upkeep failed; trying again later")
                next_sweep = loop.time() + self._sweep_seconds

    async def make_room(self) -> DiskState:
        """The volume against the budget, after evicting local copies of idle stored sessions
        (least recently used first, at most :data:`SWEEP_BATCH` a pass) if it was over."""
        state = await self._disk.check()
        if not state.over or self._store is None:
            return state
        async with self._evicting:
            state = await self._disk.check()
            evicted = 0
            if state.over:
                stamped = await asyncio.to_thread(self._workspaces.last_turns)
                candidates = [(session_id, last) for session_id, last in least_recent_first(stamped)
                              if self._unevictable.get(session_id) != last]
                for session_id, last in candidates[:SWEEP_BATCH]:
                    if await self._remove(session_id, last, local_copy=True):
                        evicted += 1
                        state = await self._disk.check()
                        if not state.over:
                            break
            if evicted:
                logger.info("disk budget: evicted %d idle local session copies (the store keeps them)%s", evicted,
                            "; still over: " + state.describe() if state.over else "")
        return state

    async def sweep(self) -> bool:
        """One bounded retention pass; ``False`` when more was due than one pass removes."""
        now = time.time()
        stamped = await asyncio.to_thread(self._workspaces.last_turns)
        self._unevictable = {session_id: last for session_id, last in stamped
                             if self._unevictable.get(session_id) == last}
        due = self._retention.sweep_order(stamped, now)
        removed = {reason: 0 for reason in Due}
        for session_id, last, reason in due[:SWEEP_BATCH]:
            exact = self._workspaces.last_turn(session_id)
            if exact is None:
                continue
            if exact > last:  # a binding from before turn stamps: its transcript knows better
                self._workspaces.stamp(session_id, exact)
                reason_now = self._retention.due(exact, now)
                if reason_now is None:
                    continue
                reason, last = reason_now, exact
            if await self._remove(session_id, last, local_copy=reason is Due.LOCAL_COPY):
                removed[reason] += 1
        orphans = await asyncio.to_thread(self._workspaces.orphans, now - ORPHAN_GRACE_SECONDS)
        cleared = 0
        for root in orphans[:SWEEP_BATCH]:
            if not self._in_use(None, root.name) and (moved := self._workspaces.take_orphan(root)) is not None:
                await self.discard(moved)
                cleared += 1
        for leftover in await asyncio.to_thread(self._workspaces.trash):
            await self.discard(leftover)
        if any(removed.values()) or cleared:
            logger.info("retention: removed %d sessions idle past AGENT_SESSION_TTL_SECONDS, %d local copies "
                        "idle past AGENT_LOCAL_CACHE_SECONDS (the store keeps them), %d unbound workspaces",
                        removed[Due.EXPIRED], removed[Due.LOCAL_COPY], cleared)
        await self._disk.measure()
        return len(due) <= SWEEP_BATCH and len(orphans) <= SWEEP_BATCH

    async def _remove(self, session_id: str, stamped: float, *, local_copy: bool) -> bool:
        """Remove a session unless it is in use or (``local_copy``) the store does not hold all
        of it; ``stamped`` is its binding's mtime as listed, remembered when the store fell short
        so that the session is not asked about again until it has had another turn."""
        record = self._workspaces.get(session_id)
        if record is None or self._in_use(session_id, record.workspace.sdk_session_id):
            return False
        if local_copy:
            last = self._workspaces.last_turn(session_id)
            if not await self._stored(record.workspace):
                self._unevictable[session_id] = stamped
                return False
            # The store was asked in the meantime: a turn may have run or be running since.
            if self._workspaces.last_turn(session_id) != last or self._in_use(session_id,
                                                                              record.workspace.sdk_session_id):
                return False
        removed = self._workspaces.unbind(session_id, unless_held=True)
        if removed is None:
            return False
        await self.discard(removed)
        return True

    async def discard(self, removed: Path) -> None:
        """Delete what a removal moved aside, off the event loop, and take it off the disk's estimate."""
        self._disk.forget(await asyncio.to_thread(self._purge, removed))

    def _purge(self, removed: Path) -> int:
        size = usage(removed)
        self._workspaces.purge(removed)
        return size

    async def _stored(self, workspace: Workspace) -> bool:
        """Whether the store holds every entry of the session's local transcript."""
        if self._store is None or workspace.mirror_gap_marker.exists():
            return False
        transcript = workspace.transcript()
        if transcript is None:
            return True  # nothing local to lose
        try:
            return await store_holds(self._store, transcript, workspace.sdk_session_id)
        except (OSError, StoreUnavailable):
            return False
