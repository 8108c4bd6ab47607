"""The janitor: what no work item asks for but a fleet of sandboxes needs.

Every ``ENVIRONMENT_JANITOR_SECONDS``, for each sandbox of this environment:

- its session is gone or terminated: the runner and sandbox are removed and the
  files archived; an archive older than ``ENVIRONMENT_ARCHIVE_SECONDS`` is removed;
- its runner *exited with a failure* while its item is still live: the item is
  force-stopped (the worker failed before it could stop the item itself, and a
  re-delivery would fail the same way);
- its runner *died* (killed: no exit recorded) while its item is live: nothing yet.
  The lease lapses and the service delivers the item again, and the lifecycle starts a
  new runner on it. Force-stopping it instead would strand a session waiting for tool
  results: a stopped item is not offered again (anthropics/anthropic-sdk-python#1779).
  An item that was asked to stop (``stopping``) is force-stopped, as no one will;
- its runner has ended and the sandbox has been idle past ``ENVIRONMENT_IDLE_SECONDS``:
  the sandbox is stopped, its files kept; the next item starts it again.

Each step holds the session's lock, so it never races the lifecycle of another item.
"""

from __future__ import annotations

import asyncio
import logging
import time

from anthropic import APIError, AsyncAnthropic, NotFoundError
from redis.exceptions import RedisError

from hosting.environments.lifecycle import Lifecycle
from hosting.environments.runner import EXIT_SIGNALLED
from hosting.environments.sandboxes import RunnerStatus
from hosting.sandboxes.base import Sandbox, SandboxError

logger = logging.getLogger("hosting.environments.janitor")


class Janitor:
    def __init__(self, lifecycle: Lifecycle, idle_seconds: float) -> None:
        self.lifecycle = lifecycle
        self.idle_seconds = idle_seconds

    @property
    def api(self) -> AsyncAnthropic:
        return self.lifecycle.api

    async def run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.sweep()

    async def sweep(self) -> None:
        """One pass over every sandbox; a failure on one does not stop the others."""
        try:
            sandboxes = await self.lifecycle.sandboxes.all()
        except SandboxError as exc:
            logger.error("janitor could not list sandboxes: %s", exc)
            return
        for sandbox in sandboxes:
            try:
                await self._tend(sandbox)
            except (APIError, SandboxError, OSError) as exc:
                logger.warning("janitor skipped %s: %s", sandbox.sandbox_id, exc)
        try:
            expired = await self.lifecycle.archive.ended_before(time.time() - self.lifecycle.settings.archive_seconds)
        except (RedisError, OSError, ValueError) as exc:
            logger.error("janitor could not read the archive: %s", exc)
            return
        for session_id in expired:
            try:
                await self.lifecycle.remove_archived(session_id)
            except (SandboxError, RedisError, OSError) as exc:
                logger.warning("janitor kept the archive of %s for now: %s", session_id, exc)

    async def _tend(self, sandbox: Sandbox) -> None:
        session_id = sandbox.session_id
        assert session_id is not None
        try:
            session = await self.api.beta.sessions.retrieve(session_id)
            ended = session.status == "terminated"
        except NotFoundError:
            ended = True
        if ended:
            await self.lifecycle.end_session(session_id)
            return
        async with self.lifecycle.locks.holding(session_id, wait_seconds=0) as held:
            if not held:
                return  # the lifecycle is at it
            runner = await self.lifecycle.sandboxes.runner(sandbox)
            if runner.state == "running":
                return
            await self._settle_item(runner)
            last_active = runner.ended_at or sandbox.created_at
            if time.time() - last_active > self.idle_seconds:
                await self.lifecycle.sandboxes.stop(sandbox)
                logger.info("stopped idle sandbox %s of session %s (files kept)", sandbox.sandbox_id, session_id)

    async def _settle_item(self, runner: RunnerStatus) -> None:
        if runner.work_id is None:
            return
        failed = runner.state == "exited" and runner.exit_code not in (0, EXIT_SIGNALLED)
        if runner.state == "exited" and not failed:
            return
        item = await self.api.beta.environments.work.retrieve(
            runner.work_id, environment_id=self.lifecycle.settings.environment_id)
        if item.state == "stopped":
            return
        if failed or item.state == "stopping":
            logger.warning("runner of work_id=%s %s; force-stopping the item", runner.work_id,
                           f"failed ({runner.exit_code})" if failed else "died while it was stopping")
            await self.lifecycle.force_stop(runner.work_id)
