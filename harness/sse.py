"""Reading a turn's server-sent events, as the server and the gateway send them (wire format v1).

One reader for the tests and the benchmark, sync and async: heartbeat comments are skipped and
each event's ``data:`` is decoded from JSON. Parsing the stream is httpx-sse's job; what is
ours is how a turn is asked for and what an event of it is.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypedDict

import httpx
from httpx_sse import EventSource, ServerSentEvent, aconnect_sse, connect_sse


class WireEvent(TypedDict):
    """One event of a turn: its type (``session``, ``text``, ..., ``done``), id and decoded data."""

    event: str
    id: str
    data: dict[str, Any]


def _decoded(sse: ServerSentEvent) -> WireEvent:
    return {"event": sse.event, "id": sse.id, "data": json.loads(sse.data)}


def turn_url(base_url: str, session_id: str) -> str:
    return f"{base_url}/sessions/{session_id}/messages"


@contextmanager
def turn_stream(client: httpx.Client, base_url: str, session_id: str, prompt: str,
                headers: Mapping[str, str] | None = None) -> Iterator[EventSource]:
    """``POST /sessions/{id}/messages`` with ``prompt``, its response open for reading."""
    with connect_sse(client, "POST", turn_url(base_url, session_id), json={"prompt": prompt},
                     headers=dict(headers or {})) as source:
        yield source


@asynccontextmanager
async def aturn_stream(client: httpx.AsyncClient, base_url: str, session_id: str, prompt: str,
                       headers: Mapping[str, str] | None = None) -> AsyncIterator[EventSource]:
    """:func:`turn_stream` on an async client."""
    async with aconnect_sse(client, "POST", turn_url(base_url, session_id), json={"prompt": prompt},
                            headers=dict(headers or {})) as source:
        yield source


def wire_events(source: EventSource) -> Iterator[WireEvent]:
    """The events of ``source`` in order, without heartbeat comments."""
    for sse in source.iter_sse():
        if sse.data:  # a heartbeat is a comment: no event, no data
            yield _decoded(sse)


async def awire_events(source: EventSource) -> AsyncIterator[WireEvent]:
    """:func:`wire_events` on an async client's response."""
    async for sse in source.aiter_sse():
        if sse.data:
            yield _decoded(sse)
