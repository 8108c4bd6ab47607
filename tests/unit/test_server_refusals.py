"""The server's refusals, in process: a bad request is refused before any CLI exists, so the
server's own ASGI app (its lifespan run, no CLI started ahead) proves every case of the
contract without a process or a model. ``tests/e2e/test_server_contract.py`` keeps one case
per behaviour against a real server process.

"Nothing reaches the model" is checked as "no CLI was started": this process has no new
child, the server holds no live session, and nothing was written to its data dir.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from harness.processes import descendants
from hosting.server.app import create_app
from hosting.server.settings import Settings
from tests.support.servers import bound_sessions, workspace_dirs

BIG = "x" * (256 * 1024 + 1)
TOKEN = "tok-9c1d"


@dataclass
class InProcessServer:
    client: httpx.AsyncClient
    data_dir: Path
    children: set[int]
    """This process's children before the server started (a run's Redis, say)."""

    async def assert_untouched(self) -> None:
        """No CLI started, no session live, nothing on disk."""
        assert descendants(os.getpid()) <= self.children
        status = (await self.client.get("/ready", headers={"authorization": f"Bearer {TOKEN}"})).json()
        assert status["live_sessions"] == 0 and status["running_turns"] == 0
        assert not bound_sessions(self.data_dir) and not workspace_dirs(self.data_dir)


async def serve(tmp_path: Path, **env: str) -> AsyncIterator[InProcessServer]:
    data_dir = tmp_path / "data"
    settings = Settings.from_env({
        "HOST": "127.0.0.1", "AGENT_DATA_DIR": str(data_dir), "AGENT_PREWARM": "0",
        "ANTHROPIC_API_KEY": "sk-never-used", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9", **env})
    app = create_app(settings)
    async with LifespanManager(app) as running, httpx.AsyncClient(
            transport=httpx.ASGITransport(running.app), base_url="http://127.0.0.1:8000") as client:
        yield InProcessServer(client, data_dir, descendants(os.getpid()))


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[InProcessServer]:
    async for running in serve(tmp_path):
        yield running


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[InProcessServer]:
    """A server that needs a bearer token."""
    async for running in serve(tmp_path, AGENT_AUTH_TOKEN=TOKEN):
        yield running


async def _chunked(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 16 * 1024):
        yield data[start:start + 16 * 1024]


BAD_REQUESTS = [
    pytest.param("bad.id", {"json": {"prompt": "hi"}}, 400, id="dot-in-id"),
    pytest.param("-leading-dash", {"json": {"prompt": "hi"}}, 400, id="leading-dash"),
    pytest.param("a" * 65, {"json": {"prompt": "hi"}}, 400, id="id-too-long"),
    pytest.param("ok", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, id="malformed-json"),
    pytest.param("ok", {"content": b"[1, 2]", "headers": {"content-type": "application/json"}}, 400, id="json-not-object"),
    pytest.param("ok", {"content": b"\xff\xfe", "headers": {"content-type": "application/json"}}, 400, id="not-utf8"),
    pytest.param("ok", {"json": {}}, 422, id="missing-prompt"),
    pytest.param("ok", {"json": {"prompt": ""}}, 422, id="empty-prompt"),
    pytest.param("ok", {"json": {"prompt": "   "}}, 422, id="blank-prompt"),
    pytest.param("ok", {"json": {"prompt": 42}}, 422, id="number-prompt"),
    pytest.param("ok", {"json": {"prompt": ["a"]}}, 422, id="list-prompt"),
    pytest.param("ok", {"json": {"prompt": None}}, 422, id="null-prompt"),
    pytest.param("ok", {"json": {"prompt": "hi", "surprise": 1}}, 422, id="unknown-field"),
    pytest.param("ok", {"content": b'{"prompt": "hi"}', "headers": {"content-type": "text/plain"}}, 415, id="wrong-content-type"),
    pytest.param("ok", {"json": {"prompt": BIG}}, 413, id="too-large"),
    pytest.param("ok", {"content": _chunked(json.dumps({"prompt": BIG}).encode()),
                        "headers": {"content-type": "application/json"}}, 413, id="too-large-chunked"),
]


@pytest.mark.parametrize("session_id, kwargs, status", BAD_REQUESTS)
async def test_bad_input_is_refused_and_leaves_nothing(server: InProcessServer, session_id: str, kwargs: dict[str, Any],
                                                       status: int) -> None:
    response = await server.client.post(f"/sessions/{session_id}/messages", **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["detail"]
    await server.assert_untouched()


async def test_bearer_token_required_except_health(guarded: InProcessServer) -> None:
    client = guarded.client
    assert (await client.get("/health")).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}):
        response = await client.post("/sessions/auth-1/messages", json={"prompt": "hi"}, headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["detail"]
        assert (await client.get("/ready", headers=headers)).status_code == 401
        assert (await client.get("/sessions/auth-1", headers=headers)).status_code == 401
        assert (await client.delete("/sessions/auth-1", headers=headers)).status_code == 401
    await guarded.assert_untouched()
