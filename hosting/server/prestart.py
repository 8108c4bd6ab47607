"""Pre-started CLIs: fresh ones kept waiting, so a new session's first turn skips the spawn.

``prewarm`` CLIs wait in a pool, each in its own new workspace, but never more than
sessions still to come: with ``session_capacity`` (``AGENT_SESSION_CAPACITY``) the pool
starts one only while the sessions the server holds and the CLIs waiting are fewer, so a
sandbox made for one session starts one CLI, for that session, and no second that no
session would take. The pool refills one CLI at a time, with spare CPU only and never
while a turn waits for its CLI, so refilling does not compete with turns in flight. A pre-started CLI is primed (asked
for a summary of its context usage: nothing is sent upstream) before it joins the pool.
Each holds a slot of the CLI budget (``admission.py``) and is the first to give it up
to a queued turn.

With a session store the pool holds none: the store files a
conversation under an SDK session id derived from its public id and tenant
(``durable.py``), which is known at the session's first request, and a CLI's session
id is fixed when it is spawned.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from hosting.server.admission import Admission
from hosting.server.box import SpareCpu
from hosting.server.disk import Disk
from hosting.server.live import CliFactory, LiveSession
from hosting.server.settings import Settings
from hosting.server.workspaces import Workspace, WorkspaceStore

logger = logging.getLogger("hosting.server.prestart")

REFILL_WINDOW_SECONDS = 0.25
"""The pool starts a CLI only if a whole core (or, on a machine or quota of less than two,
half of it) was spare over the last window of this length, and never while a turn waits
for its CLI (it must not take a turn's start slot)."""


def pool_target(prewarm: int, *, store: bool, capacity: int | None = None, sessions: int = 0) -> int:
    """How many pre-started CLIs the pool should hold now: ``prewarm``, but no more than the
    sessions still to come (``capacity``, ``None`` for no limit, less the ``sessions`` the
    server holds), and none with a session store (see the module's docstring)."""
    if store:
        return 0
    if capacity is None:
        return prewarm
    return max(0, min(prewarm, capacity - sessions))


class PrestartPool:
    """The pool of pre-started CLIs of one server process: it fills it, hands its CLIs to
    new sessions, and closes one when a queued turn needs the slot.

    ``sessions_held`` counts the sessions the server holds (asked only with a
    ``session_capacity``)."""

    def __init__(self, settings: Settings, workspaces: WorkspaceStore, cli_factory: CliFactory,
                 admission: Admission, disk: Disk, *, store: bool, sessions_held: Callable[[], int]) -> None:
        self._settings = settings
        self._store = store
        self._sessions_held = sessions_held
        self._workspaces = workspaces
        self._cli_factory = cli_factory
        self._admission = admission
        self._disk = disk
        self._spare_cpu = SpareCpu(settings.box)
        self._pool: deque[LiveSession] = deque()
        self._wanted = asyncio.Event()

    def __len__(self) -> int:
        return len(self._pool)

    @property
    def target(self) -> int:
        """How many CLIs the pool should hold now (:func:`pool_target`)."""
        capacity = self._settings.session_capacity
        held = self._sessions_held() if capacity is not None else 0
        return pool_target(self._settings.prewarm, store=self._store, capacity=capacity, sessions=held)

    def take(self) -> LiveSession | None:
        """The oldest pre-started CLI, for a new session (the pool refills); ``None`` if there is none."""
        live = self._pool.popleft() if self._pool else None
        self._wanted.set()
        return live

    def put_back(self, live: LiveSession) -> None:
        """Return a CLI that :meth:`take` gave for a session that could not be bound."""
        self._pool.appendleft(live)

    def refill(self) -> None:
        """Look at :attr:`target` again and fill up to it: a session was deleted, so one more may come."""
        self._wanted.set()

    async def give_one_up(self) -> bool:
        """Close the oldest pre-started CLI, freeing its slot for a queued turn; ``False`` if there is none."""
        if not self._pool:
            return False
        await self._close(self._pool.popleft())
        self._wanted.set()
        return True

    async def fill(self) -> None:
        """Keep the pool full while the server accepts turns (its background task)."""
        self._wanted.set()
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            while self._admission.accepting and len(self._pool) < self.target:
                if not await self._room_to_start():
                    continue
                self._admission.take_slot()
                live = self._open()
                if live is None:  # retry later
                    self._admission.free_slot()
                    await asyncio.sleep(5)
                    continue
                try:
                    await self._cli_factory.connect(live, for_turn=False)
                    await live.prime()
                except BaseException as exc:
                    await self._close(live)
                    if not isinstance(exc, Exception):  # cancelled: the server is closing
                        raise
                    logger.exception("could not pre-start a CLI")  # retry later; turns fall back to spawning
                    await asyncio.sleep(5)
                    continue
                if len(self._pool) >= self.target:  # a session came meanwhile and started its own CLI
                    await self._close(live)
                    continue
                self._pool.append(live)
                self._admission.signal_room()  # a queued turn of a new session may take it

    def _open(self) -> LiveSession | None:
        """A CLI in a new workspace, not started yet; ``None`` (logged) if it cannot be made."""
        workspace: Workspace | None = None
        try:
            workspace = self._workspaces.new_workspace()
            live = self._cli_factory.open(workspace)
        except OSError as exc:  # a full disk, say
            if workspace is not None:
                self._workspaces.discard(workspace)
            logger.warning("could not pre-start a CLI: %s", exc)
            return None
        if live is None:  # another process holds a workspace made just now: not ours to remove
            logger.warning("could not pre-start a CLI: workspace %s is locked by another process",
                           workspace.sdk_session_id)
        return live

    async def _room_to_start(self) -> bool:
        """Whether the pool may start a CLI now: it still wants one (a session may have come
        meanwhile), a slot of the budget is free and no turn queues for one, and see
        :data:`REFILL_WINDOW_SECONDS`."""
        self._spare_cpu.cores()  # start a fresh window
        await asyncio.sleep(REFILL_WINDOW_SECONDS)
        spare = self._spare_cpu.cores()
        if len(self._pool) >= self.target:
            return False
        if self._cli_factory.turns_starting or not self._admission.spare_room():
            return False
        if self._disk.state().over:  # its workspace would take room that sessions need
            return False
        return spare is None or spare >= min(1.0, self._spare_cpu.capacity / 2)

    async def close(self) -> None:
        """Close every pre-started CLI, all at once (the server is closing, by a deadline)."""
        pooled = list(self._pool)
        self._pool.clear()
        await asyncio.gather(*(self._close(live) for live in pooled))

    async def _close(self, live: LiveSession) -> None:
        """Close a pre-started CLI (freeing its slot) and remove its workspace, never bound to a session."""
        try:
            await self._admission.close(live)
        finally:
            self._workspaces.discard(live.workspace)
