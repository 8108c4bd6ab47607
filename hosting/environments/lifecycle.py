"""What follows a claimed work item, shared by the polling and the webhook mode.

For each acknowledged item: check it (a session item, a valid session id, a secret
that carries the item's own token), look the session up (gone or terminated: stop the
item, remove the session's sandbox and archive its files), then, holding the session's lock, make sure its
sandbox runs (create it, or start it again on its volume) and start the runner in it.

Only the newest item of a session is served: an item older than the one the session's
runner serves is force-stopped; a newer one force-stops the older item and ends its
runner first. A runner that already serves this very item (a re-delivery that another
orchestrator handled) is left alone; a dead one is replaced.

Failures are retried with capped exponential backoff, except a 4xx other than 408 and
429 from the API (retrying will not fix it): the item is then force-stopped. When the
retries run out the item is left as it is: its lease lapses and the service delivers it
again, to this or another orchestrator.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from datetime import datetime

from anthropic import APIError, APIStatusError, AsyncAnthropic, NotFoundError
from anthropic.types.beta.environments import BetaSelfHostedWork

from hosting.environments.archive import ArchivedSessions
from hosting.environments.credentials import sessions_token
from hosting.environments.locks import SessionLocks
from hosting.environments.runner import SESSION_ID_PATTERN
from hosting.environments.sandboxes import RunnerLaunch, RunnerStatus, SessionSandboxes
from hosting.environments.settings import EnvironmentSettings
from hosting.sandboxes.base import Sandbox, SandboxError

logger = logging.getLogger("hosting.environments.lifecycle")

RUNNER_START_SECONDS = 30.0
"""How long a started runner has to record itself."""


class ItemRefused(Exception):
    """This item cannot be served, now or later: it is force-stopped."""


class LockBusy(Exception):
    """Another orchestrator holds the session's lock (retried)."""


def is_fatal(exc: BaseException) -> bool:
    """A 4xx that retrying will not fix: any but 408 (timeout) and 429 (rate limit)."""
    return isinstance(exc, APIStatusError) and 400 <= exc.status_code < 500 and exc.status_code not in (408, 429)


def _created(stamp: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else None
    except ValueError:
        return None


def is_newer(item: BetaSelfHostedWork, runner: RunnerStatus) -> bool:
    """Whether ``item`` is newer than the item ``runner`` serves (unknown counts as older)."""
    ours, theirs = _created(item.created_at), _created(runner.work_created_at)
    return theirs is None or (ours is not None and ours >= theirs)


class Lifecycle:
    """Serves claimed work items (see the module doc)."""

    def __init__(self, settings: EnvironmentSettings, api: AsyncAnthropic, sandboxes: SessionSandboxes,
                 locks: SessionLocks, archive: ArchivedSessions) -> None:
        self.settings = settings
        self.api = api
        """Authenticated with the environment key."""
        self.sandboxes = sandboxes
        self.locks = locks
        self.archive = archive

    async def handle(self, item: BetaSelfHostedWork) -> None:
        """Serve one acknowledged item; errors are logged, never raised."""
        attempt = 0
        while True:
            try:
                await self._serve(item)
                return
            except ItemRefused as exc:
                logger.warning("refusing work_id=%s: %s", item.id, exc)
                await self.force_stop(item.id)
                return
            except (APIError, SandboxError, LockBusy, OSError) as exc:
                if is_fatal(exc):
                    logger.error("work_id=%s failed for good: %s", item.id, exc)
                    await self.force_stop(item.id)
                    return
                attempt += 1
                if attempt >= self.settings.retry_attempts:
                    logger.error("work_id=%s failed %d times, left to be delivered again: %s", item.id, attempt, exc)
                    return
                delay = min(self.settings.retry_max_seconds, 0.5 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                logger.warning("work_id=%s attempt %d failed, again in %.1f s: %s", item.id, attempt, delay, exc)
                await asyncio.sleep(delay)

    async def _serve(self, item: BetaSelfHostedWork) -> None:
        # The queue also sends items the generated type does not model ("healthcheck").
        kind: str = item.data.type
        if kind != "session":
            raise ItemRefused(f"not a session work item ({kind})")
        session_id = item.data.id
        if not SESSION_ID_PATTERN.fullmatch(session_id):
            raise ItemRefused("the session id is not valid")
        if sessions_token(item.secret) is None:
            raise ItemRefused("the item carries no sessions token; the environment key is never handed to a sandbox")
        try:
            session = await self.api.beta.sessions.retrieve(session_id)
        except NotFoundError:
            await self.end_session(session_id)
            raise ItemRefused(f"session {session_id} is gone") from None
        if session.status == "terminated":
            await self.end_session(session_id)
            raise ItemRefused(f"session {session_id} has terminated")
        async with self.locks.holding(session_id, wait_seconds=RUNNER_START_SECONDS * 2) as held:
            if not held:
                raise LockBusy(f"session {session_id} is locked by another orchestrator")
            sandbox = await self.sandboxes.ensure(session_id)
            runner = await self.sandboxes.runner(sandbox)
            if runner.state == "running":
                if runner.work_id == item.id:
                    logger.info("work_id=%s is already served in %s", item.id, sandbox.sandbox_id)
                    return
                if not is_newer(item, runner):
                    raise ItemRefused(f"superseded by the newer work item {runner.work_id}")
                logger.info("work_id=%s supersedes work_id=%s", item.id, runner.work_id)
                if runner.work_id:
                    await self.force_stop(runner.work_id)
                await self.sandboxes.stop_runner(sandbox)
            await self._start_runner(sandbox, item, session_id)

    async def _start_runner(self, sandbox: Sandbox, item: BetaSelfHostedWork, session_id: str) -> None:
        assert item.secret is not None
        launch = RunnerLaunch(item.id, item.created_at, session_id, item.secret, self.settings.environment_id,
                              self.settings.sandbox_api_base_url, self.settings.runner_max_idle_seconds)
        await self.sandboxes.start_runner(sandbox, launch)
        deadline = time.monotonic() + RUNNER_START_SECONDS
        while time.monotonic() < deadline:
            runner = await self.sandboxes.runner(sandbox)
            if runner.work_id == item.id:
                logger.info("runner for work_id=%s started in %s (%s)", item.id, sandbox.sandbox_id, runner.state)
                return
            await asyncio.sleep(0.1)
        raise SandboxError(f"the runner for work {item.id} did not start in {sandbox.sandbox_id}")

    async def end_session(self, session_id: str) -> None:
        """The session has ended: its runner and sandbox go; its volume is archived (kept
        for ``archive_seconds``, see :mod:`hosting.environments.archive`), or goes too at 0."""
        async with self.locks.holding(session_id, wait_seconds=RUNNER_START_SECONDS * 2) as held:
            if not held:
                raise LockBusy(f"session {session_id} is locked by another orchestrator")
            sandbox = await self.sandboxes.find(session_id)
            if sandbox is not None:
                await self.sandboxes.stop_runner(sandbox)
                await self.sandboxes.stop(sandbox)
            if self.settings.archive_seconds > 0:
                await self.archive.add(session_id, time.time())
                if sandbox is not None:
                    logger.info("session %s ended: its sandbox is removed, its files archived for %.0f s", session_id,
                                self.settings.archive_seconds)
                return
            await self.sandboxes.remove(session_id)
            logger.info("session %s ended: its sandbox and files are removed", session_id)

    async def remove_archived(self, session_id: str) -> None:
        """The archive period of an ended session is over: its files go."""
        async with self.locks.holding(session_id, wait_seconds=0) as held:
            if not held:
                return  # the next sweep
            await self.sandboxes.remove(session_id)
            await self.archive.discard(session_id)
            logger.info("archive of session %s expired: its files are removed", session_id)

    async def force_stop(self, work_id: str) -> None:
        """Force-stop an item; one that is stopped already (409) is fine."""
        try:
            await self.api.beta.environments.work.stop(work_id, environment_id=self.settings.environment_id, force=True)
            logger.info("force-stopped work_id=%s", work_id)
        except APIStatusError as exc:
            if exc.status_code != 409:
                logger.error("force-stop of work_id=%s failed: %s", work_id, exc)
        except APIError as exc:
            logger.error("force-stop of work_id=%s failed: %s", work_id, exc)
