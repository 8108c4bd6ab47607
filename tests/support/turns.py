"""One turn over real HTTP, and what it streamed (the events of :mod:`harness.sse`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from harness.sse import WireEvent, turn_stream, wire_events


@dataclass
class Turn:
    """What one POST /messages produced: the SSE events, in order."""

    events: list[WireEvent]

    @property
    def types(self) -> list[str]:
        return [e["event"] for e in self.events]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e["data"] for e in self.events if e["event"] == kind]

    @property
    def text(self) -> str:
        return "".join(d["text"] for d in self.of("text"))

    @property
    def result(self) -> dict[str, Any]:
        (result,) = self.of("result")
        return result


def event_order(event_id: str) -> tuple[int, int]:
    """``"<turn>-<seq>"`` as numbers, for checking ids grow."""
    turn, _, seq = event_id.partition("-")
    return int(turn), int(seq)


def post_turn(base_url: str, session_id: str, prompt: str, *, headers: dict[str, str] | None = None,
              timeout: float = 120) -> Turn:
    """One turn, read to its end; fails the test unless it was accepted (200)."""
    with httpx.Client(timeout=timeout) as client, turn_stream(client, base_url, session_id, prompt, headers) as source:
        assert source.response.status_code == 200, source.response.read()
        return Turn(list(wire_events(source)))
