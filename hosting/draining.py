"""SIGTERM drains before it stops: shared by the server and the gateway.

An orchestrator sends SIGTERM, waits a grace period, then SIGKILLs. Stopping at
once would cut every running turn; so the first signal only stops new work (503
with ``Retry-After``, which a load balancer or client retries elsewhere) while
the work in flight finishes, and the process then exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType
from typing import Protocol

import uvicorn
from starlette.types import ASGIApp

from hosting.http_limits import HttpLimits, LimitedConfig

logger = logging.getLogger("hosting.draining")


class Drainable(Protocol):
    """What a process drains: it stops taking new work, then waits for what runs."""

    def stop_accepting(self) -> None: ...

    async def wait_for_running_turns(self, timeout: float) -> bool:
        """``True`` once nothing runs, ``False`` if ``timeout`` passed first."""
        ...


class DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM drains first.

    On the first SIGTERM/SIGINT the listener stays open and new turns get 503
    with ``Retry-After`` while running turns finish (up to the grace period);
    then uvicorn shuts down as usual and the lifespan cleans up. The process
    exits 0. A second signal exits at once. Connections are served under ``limits``
    (:mod:`hosting.http_limits`: header deadline and size, keep-alive).
    """

    def __init__(self, app: ASGIApp, host: str, port: int, work: Drainable, grace_seconds: float,
                 limits: HttpLimits) -> None:
        # uvicorn's access line is off: the app writes its own once a response has ended
        # (hosting.telemetry.access), not while a turn streams.
        super().__init__(LimitedConfig(app, limits, host=host, port=port, timeout_graceful_shutdown=5, log_config=None,
                                       access_log=False))
        self._work = work
        self._grace_seconds = grace_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None:
            self.force_exit = self._draining
            self.should_exit = True
            return
        self._draining = True
        logger.info("signal %d: draining (grace %.0f s)", sig, self._grace_seconds)
        self._work.stop_accepting()
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))  # type: ignore[union-attr]

    async def _drain(self) -> None:
        finished = await self._work.wait_for_running_turns(self._grace_seconds)
        if not finished:
            logger.warning("grace period over: cancelling the turns still running")
        self.should_exit = True
