"""SIGTERM drains before it stops: shared by the server and the gateway.

An orchestrator sends SIGTERM, waits a grace period, then SIGKILLs (Cloud Run after
10 s, Kubernetes after ``terminationGracePeriodSeconds``). Stopping at once would cut
every running turn; so the first signal only stops new work (503 with
``Retry-After``, which a load balancer or client retries elsewhere) while the work in
flight finishes, and the process then exits 0.

The grace is a deadline for the whole shutdown, not for the turns alone: running work
may finish until :data:`STOP_RESERVE_SECONDS` before it, then what still runs is cut
(the server ends each cut turn's stream with ``error`` and ``done``, so clients send
it again instead of waiting) and its processes stopped, and the process exits by the
deadline, before the orchestrator's SIGKILL.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Protocol

import uvicorn
from starlette.types import ASGIApp

from hosting.http_limits import HttpLimits, LimitedConfig

logger = logging.getLogger("hosting.draining")

STOP_RESERVE_SECONDS = 2.5
"""Of the grace, what is kept for stopping once running work has had its time: cutting it,
ending its streams, closing its processes (a CLI takes a few tenths of a second to exit)
and uvicorn's own shutdown. A grace under twice this keeps half of it."""
EXIT_MARGIN_SECONDS = 0.75
"""Of that reserve, what is kept for uvicorn to close its connections and the interpreter to exit."""


class Drainable(Protocol):
    """What a process drains: it stops taking new work, then waits for what runs."""

    def stop_accepting(self) -> None: ...

    async def wait_for_running_turns(self, timeout: float) -> bool:
        """``True`` once nothing runs, ``False`` if ``timeout`` passed first."""
        ...


StopWork = Callable[[float], Awaitable[None]]
"""Ends the work still running by a deadline (event-loop time): cuts it, closes its processes."""


class DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM drains first, and the grace is a deadline.

    On the first SIGTERM/SIGINT the listener stays open and new turns get 503
    with ``Retry-After`` while running turns finish, until :data:`STOP_RESERVE_SECONDS`
    before the grace ends; then ``stop_work`` (if given) cuts what still runs and closes
    its processes, while the listener still answers; then uvicorn closes its connections
    (any still open when the grace is nearly over are cancelled) and the lifespan cleans
    up. The process exits 0. A second signal exits at once. Connections are served under
    ``limits`` (:mod:`hosting.http_limits`: header deadline and size, keep-alive).
    """

    def __init__(self, app: ASGIApp, host: str, port: int, work: Drainable, grace_seconds: float,
                 limits: HttpLimits, stop_work: StopWork | None = None) -> None:
        # uvicorn's access line is off: the app writes its own once a response has ended
        # (hosting.telemetry.access), not while a turn streams.
        super().__init__(LimitedConfig(app, limits, host=host, port=port, timeout_graceful_shutdown=5, log_config=None,
                                       access_log=False))
        self._work = work
        self._stop_work = stop_work
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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._grace_seconds
        reserve = min(STOP_RESERVE_SECONDS, self._grace_seconds / 2)
        exit_by = deadline - min(EXIT_MARGIN_SECONDS, reserve / 2)
        if not await self._work.wait_for_running_turns(max(0.0, deadline - reserve - loop.time())):
            logger.warning("grace period nearly over: cutting the turns still running")
        if self._stop_work is not None:
            await self._stop_work(exit_by)
        # uvicorn waits this long for open connections, then cancels them.
        self.config.timeout_graceful_shutdown = max(0.0, exit_by - loop.time())  # type: ignore[assignment]
        self.should_exit = True
