"""Reading the SSE events a sandbox streams, without re-encoding them.

The relay passes a turn's bytes on unchanged, but it must know where each event ends, the
last event id, and whether ``done`` came: so that a sandbox dying mid-stream ends the
client's stream properly, with an ``error`` event (``sandbox_lost``, retryable) and
``done`` whose ids continue the sandbox's, and never half an event before them. The
gateway's turn metrics and budgets read the same events from the same pass.
"""

from __future__ import annotations

from collections.abc import Callable

from hosting.errors import ErrorCode
from hosting.wire import WireEvent, encode, error_event


def next_event_id(last: str | None) -> str:
    """The id after ``last``: ``1764-7`` → ``1764-8``; none → ``0-1`` (turn 0: before
    any of the sandbox's, so a re-attach after it replays the sandbox's latest turn)."""
    if last is None:
        return "0-1"
    head, sep, tail = last.rpartition("-")
    if tail.isdigit():
        return f"{head}{sep}{int(tail) + 1}"
    return f"{last}-1"


def lost_stream(last_id: str | None, message: str, code: ErrorCode = ErrorCode.SANDBOX_LOST) -> bytes:
    """``error`` (``sandbox_lost`` unless said, retryable) then ``done``, continuing after ``last_id``."""
    error_id = next_event_id(last_id)
    return encode(error_event(code, message), error_id) + encode(WireEvent("done"), next_event_id(error_id))


EventObserver = Callable[[str, bytes], None]
"""Told of each whole event relayed: its type and its ``data`` (raw JSON bytes)."""


class StreamWatcher:
    """Follows SSE lines across chunk boundaries: the last ``id:``, whether ``done`` came whole,
    and (for an ``observer``) each event as it completes. The one SSE reader of the gateway.

    :meth:`feed` hands back only bytes that end whole events and holds the event in progress,
    so a stream cut short (a sandbox lost, an event past
    :data:`hosting.gateway.relay.MAX_EVENT_BYTES`) never leaves a client half an event
    before the ``sandbox_lost`` ending."""

    def __init__(self, observer: EventObserver | None = None) -> None:
        self._held: list[bytes] = []  # the event in progress, in the pieces it came in
        self._held_bytes = 0
        self._line: list[bytes] = []  # its unfinished line
        self._line_bytes = 0
        self._observer = observer
        self._kind = b""
        self._data: list[bytes] = []
        self.last_id: str | None = None
        self.done = False

    @property
    def unfinished(self) -> int:
        """Bytes of the event in progress, held back."""
        return self._held_bytes

    def drop_unfinished(self) -> None:
        """Forget the event in progress (the stream that was sending it is cut)."""
        self._held, self._held_bytes, self._line, self._line_bytes = [], 0, [], 0
        self._kind, self._data = b"", []

    def feed(self, chunk: bytes) -> bytes:
        """Take the next chunk; the bytes to relay now (the whole events it completes)."""
        self._held.append(chunk)
        self._held_bytes += len(chunk)
        if b"\n" not in chunk:  # the line goes on: not copied again with each piece
            self._line.append(chunk)
            self._line_bytes += len(chunk)
            return b""
        before = self._line_bytes
        lines = b"".join([*self._line, chunk]).split(b"\n")
        last = lines.pop()
        self._line, self._line_bytes = ([last], len(last)) if last else ([], 0)
        offset, boundary = 0, 0
        for raw in lines:
            offset += len(raw) + 1
            line = raw.rstrip(b"\r")
            if not line:  # an event is whole at its blank line, ``done`` too
                boundary = offset
                self.done = self.done or self._kind == b"done"
                if self._observer is not None and self._kind and self._data:
                    self._observer(self._kind.decode(errors="replace"), b"\n".join(self._data))
                self._kind, self._data = b"", []
            elif line.startswith(b"id:"):
                self.last_id = line[3:].strip().decode(errors="replace")
            elif line.startswith(b"event:"):
                self._kind = line[6:].strip()
            elif self._observer is not None and line.startswith(b"data:"):
                self._data.append(line[5:].strip())
        if not boundary:
            return b""
        cut = boundary - before  # the blank line's end, in this chunk
        whole = b"".join([*self._held[:-1], chunk[:cut]])
        self._held = [chunk[cut:]] if cut < len(chunk) else []
        self._held_bytes = len(chunk) - cut
        return whole
