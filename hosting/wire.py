"""Wire format v1: what a client sees of a turn, independent of the SDK's types.

Clients parse these events, never SDK messages, so an SDK upgrade cannot break
them. Every event carries ``"v": 1``; the SSE encoding adds ``event:`` and ``id:``.

Event types, in the order they can appear:
``session`` (first), ``text`` / ``thinking`` (deltas), ``tool_use``,
``tool_result``, ``result`` (final numbers), ``error``, ``done`` (always last).
``raw`` (the SDK message itself) only when a request opts in.

The server makes these events (:mod:`hosting.server.wire`), the gateway relays and
adds some (:mod:`hosting.gateway.event_stream`); this module imports neither, nor the SDK.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sse_starlette import ServerSentEvent

from hosting.errors import ErrorCode

WIRE_VERSION = 1


@dataclass(frozen=True)
class WireEvent:
    """One event of a turn's stream."""

    type: str
    data: dict[str, Any] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        return {"v": WIRE_VERSION, **self.data}


def error_event(code: ErrorCode, message: str, *, retryable: bool | None = None) -> WireEvent:
    """An ``error`` event; ``retryable`` is the code's (:class:`~hosting.errors.ErrorCode`)
    unless the failure knows better (a model API error that retrying cannot fix)."""
    return WireEvent("error", {"code": code.value, "message": message,
                               "retryable": code.retryable if retryable is None else retryable})


def server_sent(event: WireEvent, event_id: str) -> ServerSentEvent:
    """``event`` as one SSE event with id ``event_id``."""
    return ServerSentEvent(data=json.dumps(event.payload()), event=event.type, id=event_id)


def encode(event: WireEvent, event_id: str) -> bytes:
    """``event`` as the bytes of one SSE event, for a stream written by hand (the gateway's relay)."""
    return server_sent(event, event_id).encode()
