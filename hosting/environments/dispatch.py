"""Claiming work: the long-polling loop and the webhook mode's drain.

Both claim through the SDK's poller (``client.beta.environments.work.poller``), which
polls, acknowledges each item and backs off on errors, with ``auto_stop=False``: the
runner in the sandbox owns the item from then on and stops it when done (the poller
must not post a stop when the loop body returns, or the runner's first heartbeat
would find it stopping). Unacknowledged items older than ``ENVIRONMENT_RECLAIM_MS``
are reclaimed, so items a crashed orchestrator polled but never acknowledged come back.

Each claimed item is served by :class:`~hosting.environments.lifecycle.Lifecycle` in a
task of its own, so a slow sandbox start delays no other session.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from uuid import uuid4

from anthropic import APIError, AsyncAnthropic
from anthropic.types.beta.environments import BetaSelfHostedWork

from hosting.environments.lifecycle import Lifecycle
from hosting.environments.settings import EnvironmentSettings

logger = logging.getLogger("hosting.environments.dispatch")


class Dispatcher:
    """Claims items and hands each to the lifecycle."""

    def __init__(self, settings: EnvironmentSettings, api: AsyncAnthropic, lifecycle: Lifecycle) -> None:
        self.settings = settings
        self.api = api
        self.lifecycle = lifecycle
        self.worker_id = f"orchestrator-{socket.gethostname()}-{uuid4().hex[:8]}"
        self.drain_requested = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def _serve(self, item: BetaSelfHostedWork) -> None:
        task = asyncio.create_task(self.lifecycle.handle(item), name=f"work-{item.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def poll_forever(self) -> None:
        """Polling mode: long-poll (``block_ms`` < 1000) and serve items as they come."""
        items = self.api.beta.environments.work.poller(
            environment_id=self.settings.environment_id, environment_key=self.settings.environment_key,
            worker_id=self.worker_id, block_ms=self.settings.block_ms, reclaim_older_than_ms=self.settings.reclaim_ms,
            auto_stop=False)
        async for item in items:
            self._serve(item)

    async def drain(self) -> int:
        """Claim everything queued now; of several items of one session only the newest
        is served, the others are force-stopped. Returns how many were claimed."""
        items = self.api.beta.environments.work.poller(
            environment_id=self.settings.environment_id, environment_key=self.settings.environment_key,
            worker_id=self.worker_id, block_ms=None, reclaim_older_than_ms=self.settings.reclaim_ms,
            drain=True, auto_stop=False)
        claimed = [item async for item in items]
        newest: dict[str, BetaSelfHostedWork] = {}
        for item in sorted(claimed, key=lambda i: i.created_at):
            older = newest.get(item.data.id)
            if older is not None:
                logger.info("work_id=%s supersedes work_id=%s in this drain", item.id, older.id)
                await self.lifecycle.force_stop(older.id)
            newest[item.data.id] = item
        for item in newest.values():
            self._serve(item)
        return len(claimed)

    async def drain_forever(self) -> None:
        """Webhook mode: drain when a delivery asks, and every ``ENVIRONMENT_WEBHOOK_DRAIN_SECONDS``
        anyway (a lost delivery must not strand a session)."""
        while True:
            try:
                await asyncio.wait_for(self.drain_requested.wait(), self.settings.webhook_drain_seconds)
            except TimeoutError:
                pass
            self.drain_requested.clear()
            try:
                claimed = await self.drain()
            except APIError as exc:
                logger.error("drain failed: %s", exc)
                continue
            if claimed:
                logger.info("drained %d work item(s)", claimed)

    async def aclose(self) -> None:
        """Cancel items still being served (their sandboxes and runners stay)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
