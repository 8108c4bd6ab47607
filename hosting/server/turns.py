"""A turn in flight: the events it produced so far, decoupled from who is listening.

The turn runs as its own task, so a client that disconnects mid-turn does not
cancel it: the turn completes and is recorded, and the next turn sees a
consistent history.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from hosting.server.wire import WireEvent

_END = object()


class Turn:
    """One turn of one session. Events are buffered until someone reads them."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self._events: asyncio.Queue[WireEvent | object] = asyncio.Queue()
        self.interrupt_requested = False
        self._announced = False

    def emit(self, event: WireEvent) -> None:
        if not self._announced:
            self.announce(resumed=False)
        self._events.put_nowait(event)

    def announce(self, *, resumed: bool) -> None:
        """Emit the ``session`` event, which is always first; later calls do nothing."""
        if not self._announced:
            self._announced = True
            self._events.put_nowait(WireEvent("session", {"session_id": self.session_id, "resumed": resumed}))

    def finish(self) -> None:
        """Close the stream with ``done``; safe to call once per turn."""
        self._events.put_nowait(WireEvent("done"))
        self._events.put_nowait(_END)

    async def events(self) -> AsyncIterator[WireEvent]:
        while True:
            event = await self._events.get()
            if event is _END:
                return
            assert isinstance(event, WireEvent)
            yield event
