"""What the local and docker backends share: a loopback port, the lost bind race,
waiting for a server to answer, and a create that survives its caller's cancellation.

A server on the host's loopback (local processes, Docker's host network) gets a
port that was free a moment before it binds it; another process can take it in
between. The server then exits, and the backend tries another port, at most
:data:`BIND_ATTEMPTS` times. That is why these backends' ``create`` returns only
once the server answers: before that, a lost race cannot be told from a start.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import httpx

from hosting.sandboxes.base import Sandbox, SandboxError

BIND_ATTEMPTS = 3
PORT_TAKEN = "address already in use"
"""What uvicorn logs (``[Errno 98] ... address already in use``) when it lost the race."""

_pending: set[asyncio.Future[Any]] = set()
"""Creates whose caller was cancelled, and the deletes that follow them: kept
referenced so the event loop does not drop them half-way."""


def free_loopback_port() -> int:
    """A port of 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tail(output: str, lines: int = 20) -> str:
    """The end of a server's output, for an error message."""
    return "\n".join(output.strip().splitlines()[-lines:])


async def await_serving(sandbox_id: str, address: str, token: str,
                        exited: Callable[[], Awaitable[str | None]], timeout: float) -> bool:
    """Wait until the server at ``address`` answers ``GET /ready`` with 200 for ``token``.

    Only this sandbox's server accepts its token and refuses a request without one, so
    the two answers together prove the port is its own: a server started without a
    token, by another process that took the port first, accepts both. ``exited()``
    returns the server's output once it has exited, ``None`` while it runs. Returns
    ``True`` once it serves, ``False`` if its port was taken (try another); raises
    :class:`SandboxError` if it exited for another reason or did not answer within
    ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=1.0) as client:
        while True:
            output = await exited()
            if output is not None:
                if PORT_TAKEN in output.lower():
                    return False
                raise SandboxError(f"sandbox {sandbox_id} exited before it served:\n{tail(output)}")
            try:
                response = await client.get(f"{address}/ready", headers={"authorization": f"Bearer {token}"})
                if response.status_code == 200:
                    return (await client.get(f"{address}/ready")).status_code == 401
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SandboxError(f"sandbox {sandbox_id} did not serve within {timeout:.0f} s")
            await asyncio.sleep(0.05)


async def finish_or_delete(create: Coroutine[Any, Any, Sandbox],
                           delete: Callable[[str], Coroutine[Any, Any, None]]) -> Sandbox:
    """Await ``create``; if the caller is cancelled, let it finish anyway and delete
    the sandbox it made. Cancelling a start half-way would leave a process or a
    container that no record or route knows of."""
    task = asyncio.ensure_future(create)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        _pending.add(task)
        task.add_done_callback(lambda done: _delete_result(done, delete))
        raise


def _delete_result(done: asyncio.Future[Sandbox], delete: Callable[[str], Coroutine[Any, Any, None]]) -> None:
    _pending.discard(done)
    if done.cancelled() or done.exception() is not None:
        return  # a failed create has cleaned up after itself
    cleanup = asyncio.ensure_future(delete(done.result().sandbox_id))
    _pending.add(cleanup)
    cleanup.add_done_callback(_pending.discard)
