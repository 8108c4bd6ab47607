"""A turn in flight: the events it produced, kept for whoever listens and re-attaches.

The turn runs as its own task, so a client that disconnects mid-turn does not
cancel it: the turn completes and is recorded, and the next turn sees a
consistent history. Its events stay in a log (bounded) so a client that lost
its connection can re-attach (``GET /sessions/{id}/events``) and read on from
the last event id it saw: every event after it exactly once, then the live
turn to its ``done``.

Event ids are ``<turn>-<seq>``: ``turn`` is a number that grows with every turn
of a session (milliseconds since the epoch at its start, bumped past the
previous turn's), ``seq`` counts from 1 within the turn. So an id is unique in
its session, also across server restarts, and says which turn it belongs to.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from hosting.errors import ErrorCode, HostingError
from hosting.wire import WireEvent

MAX_TURN_EVENTS = 20_000
"""Events kept per turn for re-attaching; a longer turn keeps its newest ones only."""

LAST_TURNS_KEPT = 500
"""Finished turns kept (the last one of each session, least recently finished dropped first)."""

EVENT_ID = re.compile(r"(\d{1,20})-(\d{1,20})")


def parse_event_id(value: str) -> tuple[int, int]:
    """``"<turn>-<seq>"`` → ``(turn, seq)``; :class:`ValueError` for anything else."""
    match = EVENT_ID.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"not an event id of this server: {value[:80]!r} (expected <turn>-<seq>)")
    return int(match[1]), int(match[2])


class ReplayGone(HostingError):
    """The events after the requested id were dropped (a turn longer than :data:`MAX_TURN_EVENTS`)."""

    code = ErrorCode.EVENTS_GONE

    @property
    def detail(self) -> str:
        return f"{self.args[0]}; read the session's history instead"


@dataclass(frozen=True)
class Numbered:
    """A wire event with its place in the session's stream."""

    id: str
    event: WireEvent


class Turn:
    """One turn of one session: its events in order, readable from any point while it
    runs and after it ended."""

    def __init__(self, session_id: str, number: int) -> None:
        self.session_id = session_id
        self.number = number
        self.interrupt_requested = False
        self._announced = False
        self._log: deque[Numbered] = deque(maxlen=MAX_TURN_EVENTS)
        self._emitted = 0
        self._finished = False
        self._readers = 0
        self._grew = asyncio.Event()  # replaced after every event: a broadcast to every reader

    @property
    def finished(self) -> bool:
        return self._finished

    def emit(self, event: WireEvent) -> None:
        if not self._announced:
            self.announce(resumed=False)
        self._append(event)

    def announce(self, *, resumed: bool) -> None:
        """Emit the ``session`` event, which is always first; later calls do nothing."""
        if not self._announced:
            self._announced = True
            self._append(WireEvent("session", {"session_id": self.session_id, "resumed": resumed}))

    def finish(self) -> None:
        """Close the stream with ``done``; later calls do nothing."""
        if not self._finished:
            self._append(WireEvent("done"))
            self._finished = True
            self._wake()

    def _append(self, event: WireEvent) -> None:
        self._emitted += 1
        self._log.append(Numbered(f"{self.number}-{self._emitted}", event))
        self._wake()

    def _wake(self) -> None:
        self._grew.set()
        self._grew = asyncio.Event()

    def replay(self, after_seq: int = 0) -> AsyncIterator[Numbered]:
        """:meth:`events` after checking, before anything is streamed, that they can be had:
        :class:`ValueError` for a position this turn never reached, :class:`ReplayGone` for
        one whose successors were dropped."""
        if after_seq > self._emitted:
            raise ValueError(f"event {self.number}-{after_seq} was never sent")
        first_kept = self._emitted - len(self._log) + 1
        if after_seq + 1 < first_kept:
            raise ReplayGone(f"events before {self.number}-{first_kept} of this turn are no longer kept")
        return self.events(after_seq)

    async def events(self, after_seq: int = 0) -> AsyncIterator[Numbered]:
        """The events after ``after_seq`` (0: all), then each new one as it comes, until ``done``.
        :class:`ReplayGone` if a reader fell so far behind that its next event was dropped."""
        next_seq = after_seq + 1
        self._readers += 1
        try:
            while True:
                first_kept = self._emitted - len(self._log) + 1
                if next_seq < first_kept:
                    raise ReplayGone(f"events before {self.number}-{first_kept} of this turn are no longer kept")
                for index in range(next_seq - first_kept, len(self._log)):
                    yield self._log[index]
                next_seq = self._emitted + 1
                if self._finished:
                    return
                await self._grew.wait()
        finally:
            self._readers -= 1
            self._wake()

    async def read_out(self) -> None:
        """Wait until the turn has finished and every reader has taken its last event (the
        stream's ``done`` is handed to the connection before the reader asks for more), so a
        server shutting down closes no connection before its stream has ended."""
        while not (self._finished and self._readers == 0):
            await self._grew.wait()


class TurnLog:
    """The running or last finished turn of each session, for re-attaching, and the
    turn numbers that keep event ids growing."""

    def __init__(self) -> None:
        self._turns: OrderedDict[str, Turn] = OrderedDict()

    def new_turn(self, session_id: str) -> Turn:
        previous = self._turns.get(session_id)
        number = int(time.time() * 1000)
        if previous is not None:
            number = max(number, previous.number + 1)
        return Turn(session_id, number)

    def started(self, turn: Turn) -> None:
        self._turns[turn.session_id] = turn
        self._turns.move_to_end(turn.session_id)
        finished = [sid for sid, kept in self._turns.items() if kept.finished]
        for session_id in finished[:max(0, len(finished) - LAST_TURNS_KEPT)]:
            del self._turns[session_id]

    def latest(self, session_id: str) -> Turn | None:
        return self._turns.get(session_id)

    def reattach(self, session_id: str, after: str | None) -> AsyncIterator[Numbered] | None:
        """What a client re-attaching after event ``after`` reads: the rest of that turn, or
        all of the session's latest turn if ``after`` is from an earlier one (or ``None``).
        ``None``: nothing to re-attach to. :class:`ValueError` for an id that is not one of
        this session's (malformed, or newer than its latest turn); :class:`ReplayGone`."""
        turn = self._turns.get(session_id)
        if turn is None:
            return None
        if after is None:
            return turn.replay()
        number, seq = parse_event_id(after)
        if number > turn.number:
            raise ValueError(f"event {after} is not from a turn this server knows")
        return turn.replay(seq if number == turn.number else 0)

    def forget(self, session_id: str) -> None:
        self._turns.pop(session_id, None)
