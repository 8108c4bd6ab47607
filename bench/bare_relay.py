"""``python -m bench.bare_relay``: the least a relay can be, as a yardstick for the gateway's.

One sandbox, one token, no checks: each request's body is read and sent on to
``BARE_RELAY_SANDBOX`` with the sandbox's token and its tenant's namespace
(``BARE_RELAY_NAMESPACE``), and its answer's bytes come back as they arrive. It runs on
the gateway's own stack (uvicorn with uvloop and httptools, the relay's client to the
sandbox) with no framework, so (g) can tell what any relay costs on the machine from what
the gateway's framework and checks add. Not part of the product: it authenticates no one
and serves one session.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
import uvicorn
from starlette.types import Receive, Scope, Send

from hosting.contract import NAMESPACE_HEADER
from hosting.gateway.relay import CONNECT_TIMEOUT_SECONDS
from hosting.gateway.sandbox_http import SandboxClient

SANDBOX = os.environ.get("BARE_RELAY_SANDBOX", "")
SANDBOX_TOKEN = os.environ.get("BARE_RELAY_SANDBOX_TOKEN", "")
NAMESPACE = os.environ.get("BARE_RELAY_NAMESPACE", "")
RELAYED_HEADERS = ("content-type", "cache-control")


class BareRelay:
    def __init__(self) -> None:
        self._client = SandboxClient(httpx.create_ssl_context(), CONNECT_TIMEOUT_SECONDS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {"authorization": f"Bearer {SANDBOX_TOKEN}", "content-type": "application/json",
                   NAMESPACE_HEADER: NAMESPACE}
        answer = await self._client.request(SANDBOX, scope["method"], scope["path"], headers, body or None)
        try:
            relayed: list[Any] = [(name.encode(), answer.headers[name].encode())
                                  for name in RELAYED_HEADERS if name in answer.headers]
            await send({"type": "http.response.start", "status": answer.status, "headers": relayed})
            while chunk := await answer.read_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            answer.release()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        self._client.close()
        await send({"type": "lifespan.shutdown.complete"})


if __name__ == "__main__":
    uvicorn.run(BareRelay(), host="127.0.0.1", port=int(os.environ["PORT"]), log_level="warning")
