"""The access line (:class:`hosting.telemetry.access.AccessLog`): written once a response
has ended, never while it streams, with the session id labelled and the real status.
Driven through real ASGI (httpx's ASGI transport) against a small app."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from hosting.telemetry.access import AccessLog
from hosting.telemetry.tracing import session_label

pytestmark = pytest.mark.anyio


def make_app(raw_session_ids: bool, happened: list[str]) -> FastAPI:
    app = FastAPI()
    app.add_middleware(AccessLog, raw_session_ids=raw_session_ids)

    @app.post("/sessions/{session_id}/messages")
    async def stream(session_id: str) -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            for name in ("first", "done"):
                happened.append(f"sent {name}")
                yield f"event: {name}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("no answer")

    return app


class Recorder(logging.Handler):
    def __init__(self, happened: list[str]) -> None:
        super().__init__()
        self.happened = happened

    def emit(self, record: logging.LogRecord) -> None:
        self.happened.append(f"log {record.getMessage()}")


@pytest.fixture
def happened() -> Iterator[list[str]]:
    events: list[str] = []
    logger = logging.getLogger("hosting.access")
    handler, level = Recorder(events), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield events
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_the_line_comes_after_the_last_byte_with_the_id_labelled(happened: list[str]) -> None:
    transport = httpx.ASGITransport(make_app(False, happened), client=("10.0.0.7", 51234))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        response = await client.post("/sessions/s-1/messages?after=3", json={})
    assert response.text == "event: first\n\nevent: done\n\n"
    assert happened[:2] == ["sent first", "sent done"] and len(happened) == 3
    line = happened[2]
    assert line.startswith(f'log 10.0.0.7:51234 - "POST /sessions/{session_label("s-1")}/messages?after=3 HTTP/1.1" 200 ')
    assert line.endswith(" ms") and "s-1/" not in line


async def test_raw_ids_when_asked_and_500_when_the_app_raised(happened: list[str]) -> None:
    transport = httpx.ASGITransport(make_app(True, happened), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        await client.post("/sessions/s-1/messages", json={})
        assert (await client.get("/boom")).status_code == 500
    lines = [event for event in happened if event.startswith("log ")]
    assert '"POST /sessions/s-1/messages HTTP/1.1" 200 ' in lines[0]
    assert '"GET /boom HTTP/1.1" 500 ' in lines[1]
