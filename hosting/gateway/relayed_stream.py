"""The ASGI response of a relayed SSE stream: what a turn holds is given back however it ends.

Starlette's ``StreamingResponse`` stops when the client leaves and runs its clean-up in a
task group per response. A relayed turn needs the opposite: the sandbox's turn runs on
after the client leaves (it may re-attach), its concurrent-turn slot is held and its
spend counted until the turn ends there, and the gateway's one event loop pays for no
extra tasks on the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from hosting.gateway.cleanup import shielded
from hosting.gateway.sandbox_response import SandboxLost

RelayedChunks = AsyncIterator[tuple[bytes, bool]]
"""A relayed stream's chunks, each with whether it is the last the client gets."""


class RelayedStream(Response):
    """A relayed SSE response that knows when it is over: ``on_close`` runs once, however
    the response ends (every byte relayed, the sandbox lost, cancelled), after the stream
    it relays is closed; ``while_open`` runs beside it until then.

    A client that leaves does not end it: the sandbox's turn runs on (the client may
    re-attach), so the rest of the stream is read and dropped until the turn ends there.
    What the turn holds (its tenant's concurrent-turn slot) is held until then, and what
    it spent is counted, however the client behaves.

    The last chunk goes out with the end of the body, so a client that stops reading at
    ``done`` finds its response complete and keeps its connection; proxies are asked not to
    buffer it (``x-accel-buffering: no``) unless the sandbox said otherwise.

    It streams in the request's own task, with one task beside it that notices the
    client leaving (then nothing more is sent to it): Starlette's own streaming runs a task group
    of two anyio tasks per response, a cost every relayed turn would pay on the gateway's
    one event loop (bench/README.md, the relay's CPU per turn)."""

    def __init__(self, content: RelayedChunks, headers: Mapping[str, str],
                 on_close: Callable[[], Awaitable[None]] | None = None,
                 while_open: Callable[[], Coroutine[Any, Any, None]] | None = None) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({"x-accel-buffering": "no", **headers})  # no body yet: no content-length
        self._content = content
        self._on_close = on_close
        self._while_open = while_open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming, client_gone = True, False

        async def until_client_leaves() -> None:
            nonlocal client_gone
            while (await receive())["type"] != "http.disconnect":
                pass
            client_gone = True

        listener = asyncio.create_task(until_client_leaves())
        beside = asyncio.create_task(self._while_open()) if self._while_open is not None else None
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk, last in self._content:  # after the last, the stream only finishes
                if streaming and not client_gone:
                    streaming = not last
                    try:
                        await send({"type": "http.response.body", "body": chunk, "more_body": streaming})
                    except OSError:  # ASGI 2.4: sending to a client that left
                        client_gone = True
            if streaming and not client_gone:
                streaming = False
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass
        finally:
            streaming = False
            listener.cancel()
            await shielded(self._close(beside))

    async def _close(self, beside: asyncio.Task[None] | None) -> None:
        try:
            if beside is not None:
                beside.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beside
            aclose = getattr(self._content, "aclose", None)
            if aclose is not None:  # runs the relay's own clean-up if the stream stopped mid-way
                with contextlib.suppress(SandboxLost, RuntimeError):
                    await aclose()
        finally:
            if self._on_close is not None:
                await self._on_close()
