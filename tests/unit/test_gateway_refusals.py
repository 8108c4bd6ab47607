"""The gateway's refusals, in process: a bad request is refused before anything is
provisioned, so the gateway's own ASGI app (its lifespan run, on the in-memory backend and
routing store) proves each case without a process. ``tests/e2e/test_gateway.py`` keeps one
case per behaviour against a real gateway process.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from asgi_lifespan import LifespanManager

from hosting.gateway.app import create_app
from hosting.gateway.pool_demand import PoolSizing
from hosting.gateway.routing.memory import MemoryRoutingStore
from hosting.gateway.settings import GatewaySettings
from hosting.sandboxes.memory import MemoryBackend
from tests.support.gateways import ADMIN, ALICE, auth


async def _chunked(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 16384):
        yield data[start:start + 16384]


async def test_refusals_happen_before_anything_is_provisioned() -> None:
    backend, store = MemoryBackend(), MemoryRoutingStore()
    settings = GatewaySettings(tenants={hashlib.sha256(ALICE.encode()).digest(): "alice"}, admin_token=ADMIN,
                               warm_pool=PoolSizing(floor=0, ceiling=0))
    app = create_app(settings, backend, store)
    async with LifespanManager(app) as running, httpx.AsyncClient(
            transport=httpx.ASGITransport(running.app), base_url="http://gateway") as http:
        post = "/sessions/s-1/messages"

        async def status(method: str, url: str, **kwargs: Any) -> int:
            return (await http.request(method, url, **kwargs)).status_code

        assert await status("POST", post, json={"prompt": "hi"}) == 401
        assert await status("POST", post, json={"prompt": "hi"}, headers=auth("wrong")) == 401
        assert await status("GET", "/ready") == 401
        assert await status("POST", "/sessions/bad.id/messages", json={"prompt": "hi"}, headers=auth(ALICE)) == 400
        assert await status("POST", post, content=b"{not json",
                            headers={**auth(ALICE), "content-type": "application/json"}) == 400
        assert await status("POST", post, json={"prompt": "  "}, headers=auth(ALICE)) == 422
        assert await status("POST", post, content=b"hi", headers={**auth(ALICE), "content-type": "text/plain"}) == 415
        big = json.dumps({"prompt": "x" * 300_000}).encode()
        too_large = await http.post(post, content=big, headers={**auth(ALICE), "content-type": "application/json"})
        assert too_large.status_code == 413 and "detail" in too_large.json()
        assert await status("POST", post, content=_chunked(big),
                            headers={**auth(ALICE), "content-type": "application/json"}) == 413
        assert await status("GET", "/sessions/s-1", headers=auth(ALICE)) == 404
        assert await status("POST", "/sessions/s-1/interrupt", headers=auth(ALICE)) == 404
        assert (await http.get("/health")).json() == {"status": "ok"}
        assert await status("GET", "/admin/pool", headers=auth(ALICE)) == 401
        # Readiness tells a tenant nothing of the installation (pool, other tenants' streams).
        assert (await http.get("/ready", headers=auth(ALICE))).json() == {"ready": True}
        assert {"pool", "running_streams", "backend"} <= (await http.get("/ready", headers=auth(ADMIN))).json().keys()
    assert backend.creates == 0 and await store.routes() == [], "nothing provisioned"
