"""Admission: which CLIs may be alive at once, and which idle one gives way.

- Every live CLI (warm, running, pre-started or starting) holds one of the
  ``cli_budget`` slots sized to the box's memory. A turn that needs a new CLI when
  none is free queues instead of pushing the box into reclaim: in arrival order it
  takes the slot of an idle CLI (least recently used first, then a pre-started one;
  see :data:`EVICTION_GRACE_SECONDS`), and past ``queue_timeout_seconds`` it is
  refused before anything is created.
- After a turn its CLI stays connected, up to ``warm_sessions`` of them (least
  recently used evicted first, idle ones closed after ``idle_timeout_seconds``), so a
  follow-up turn skips spawning the CLI and reloading the transcript. An evicted
  session loses nothing: its next turn resumes from its transcript.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable

from hosting.server.live import LiveSession
from hosting.server.settings import Settings

EVICTION_GRACE_SECONDS = 0.5
"""A queued turn closes an idle CLI only once it has been idle this long (a pre-started one
goes first): clients often send a session's next turn at once, and closing its CLI would
cost that turn a fresh start. Under 1 GiB, a burst of 25 new sessions of two turns each
took 31 s with 19 refusals (503) instead of 67 s with 47."""


class Verdict(enum.Enum):
    """What :meth:`Admission.admit` decided for a turn (the session manager turns a
    refusal into its HTTP error)."""

    SLOT_TAKEN = "a slot was taken for the turn's new CLI"
    CLI_READY = "the turn needs no new CLI: a warm or pre-started one is there for it"
    SHUTTING_DOWN = "the server is shutting down"
    NO_ROOM = "no slot came free within queue_timeout_seconds"


class Admission:
    """The CLI budget of one server process: its slots, the turns queued for one, the warm
    CLIs (the ones that give theirs up), and the CLIs being closed.

    A CLI that gives up its slot is closed through it (:meth:`close`), since that close is
    what frees the slot and wakes the queue; the pre-started pool (``prestart.py``) takes
    and frees its slots through it too.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.accepting = True
        """``False`` once the server is shutting down: nothing is admitted any more."""
        self._slots = 0  # held: live CLIs, CLIs starting, turns about to start one
        self._queue: deque[object] = deque()  # turns waiting for a slot, oldest first
        self._room_changed = asyncio.Event()  # replaced on each signal: a broadcast
        self._warm: OrderedDict[str, LiveSession] = OrderedDict()  # by session, least recently used first
        self._closing: dict[str, asyncio.Event] = {}  # workspaces whose CLI is being closed

    # -- slots -----------------------------------------------------------

    @property
    def slots_held(self) -> int:
        return self._slots

    @property
    def queued(self) -> int:
        """Turns waiting for a slot."""
        return len(self._queue)

    def stop(self) -> None:
        """Admit nothing more; queued turns are refused at once."""
        self.accepting = False
        self.signal_room()

    async def admit(self, needs_cli: Callable[[], bool], give_up_spare: Callable[[], Awaitable[bool]]) -> Verdict:
        """Wait for room for a turn's CLI.

        Turns that need a slot queue in arrival order. The first in line takes a free
        slot, or closes an idle CLI to free one (:meth:`_evict_one`); the others wait.
        ``needs_cli`` is asked again on every wake-up (a warm or pre-started CLI may have
        become the turn's meanwhile); ``give_up_spare`` closes a pre-started CLI, ``False``
        if there is none.
        """
        if not needs_cli():
            return Verdict.CLI_READY
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.queue_timeout_seconds
        ticket = object()
        self._queue.append(ticket)
        try:
            while True:
                if not self.accepting:
                    return Verdict.SHUTTING_DOWN
                if not needs_cli():
                    return Verdict.CLI_READY
                retry_in = float("inf")
                if self._queue[0] is ticket:
                    if self._slots < self._settings.cli_budget:
                        self._slots += 1
                        return Verdict.SLOT_TAKEN
                    retry_in = await self._evict_one(give_up_spare)
                    if not retry_in:
                        continue
                changed = self._room_changed
                try:
                    await asyncio.wait_for(changed.wait(), min(retry_in, deadline - loop.time()))
                except TimeoutError:
                    if loop.time() >= deadline:
                        return Verdict.NO_ROOM
        finally:
            self._queue.remove(ticket)
            self.signal_room()  # the next in line may act now

    async def _evict_one(self, give_up_spare: Callable[[], Awaitable[bool]]) -> float:
        """Close the least recently used warm CLI if it has been idle for
        :data:`EVICTION_GRACE_SECONDS`, else a pre-started one. ``0`` when one was closed,
        else how long until the warm one may be (infinite: none is warm)."""
        oldest = next(iter(self._warm.values()), None)
        age = time.monotonic() - oldest.last_used if oldest is not None else 0.0
        if oldest is not None and age >= EVICTION_GRACE_SECONDS:
            await self.close(self._warm.popitem(last=False)[1])
        elif not await give_up_spare():
            return EVICTION_GRACE_SECONDS - age if oldest is not None else float("inf")
        return 0.0

    def spare_room(self) -> bool:
        """Whether a CLI that no turn asked for (a pre-started one) may take a slot now:
        one is free and no turn queues for one."""
        return not self._queue and self._slots < self._settings.cli_budget

    def take_slot(self) -> None:
        self._slots += 1

    def free_slot(self) -> None:
        self._slots -= 1
        self.signal_room()

    def signal_room(self) -> None:
        """Wake every waiter: a slot was freed, a CLI went idle, or the server is closing."""
        self._room_changed.set()
        self._room_changed = asyncio.Event()

    # -- warm CLIs -------------------------------------------------------

    @property
    def warm_count(self) -> int:
        return len(self._warm)

    def is_warm(self, session_id: str) -> bool:
        return session_id in self._warm

    def take_warm(self, session_id: str) -> LiveSession | None:
        """The session's warm CLI, for its turn (no longer warm); ``None`` if it has none."""
        return self._warm.pop(session_id, None)

    async def release(self, session_id: str, live: LiveSession) -> list[LiveSession]:
        """Keep the CLI warm if allowed (else close it now, before the session's next turn
        can start); return the least recently used ones past the cap, for the caller to
        close once its turn has ended."""
        if not (live.healthy and self.accepting and self._settings.warm_sessions > 0):
            await self.close(live)
            return []
        live.last_used = time.monotonic()
        self._warm[session_id] = live
        self.signal_room()  # a queued turn may take its slot
        evicted = []
        while len(self._warm) > self._settings.warm_sessions:
            evicted.append(self._warm.popitem(last=False)[1])
        return evicted

    async def reap_idle(self) -> None:
        """Close warm CLIs idle for ``idle_timeout_seconds``, for as long as the server runs."""
        timeout = self._settings.idle_timeout_seconds
        while True:
            await asyncio.sleep(max(0.05, min(timeout / 4, 30.0)))
            cutoff = time.monotonic() - timeout
            for session_id in [sid for sid, live in self._warm.items() if live.last_used < cutoff]:
                live = self._warm.pop(session_id, None)  # a turn may have taken it meanwhile
                if live is not None:
                    await self.close(live)

    async def close_warm(self) -> None:
        """Close every warm CLI, all at once (the server is closing, by a deadline)."""
        warm = list(self._warm.values())
        self._warm.clear()
        await asyncio.gather(*(self.close(live) for live in warm))

    # -- closing ---------------------------------------------------------

    async def close(self, live: LiveSession) -> None:
        """Close a CLI and free its slot. Until it has exited its workspace stays locked,
        so a turn of the same session waits for it (:meth:`being_closed`)."""
        closed = self._closing[live.workspace.sdk_session_id] = asyncio.Event()
        try:
            await live.close()
        finally:
            del self._closing[live.workspace.sdk_session_id]
            closed.set()
            self.free_slot()

    def being_closed(self, sdk_session_id: str) -> asyncio.Event | None:
        """Set once the CLI of that workspace, being closed now, has exited; ``None`` if none is."""
        return self._closing.get(sdk_session_id)
