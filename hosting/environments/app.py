"""``agent-environment-orchestrator``: one process that serves a self-hosted environment.

It reads :class:`~hosting.environments.settings.EnvironmentSettings`, opens the sandbox
backend, and runs the janitor beside either the polling loop (``ENVIRONMENT_MODE=poll``)
or the webhook receiver and its drain (``webhook``). SIGTERM or SIGINT stops it; the
sandboxes and their runners are left running (a Docker container outlives it; a local
sandbox ends with it, as the local backend's do), and a restarted orchestrator picks
them up from the backend and the runners' records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import uvicorn
from anthropic import APIStatusError, AsyncAnthropic

from hosting.environments.archive import ArchivedSessions, FileArchive, RedisArchive
from hosting.environments.dispatch import Dispatcher
from hosting.environments.janitor import Janitor
from hosting.environments.lifecycle import Lifecycle
from hosting.environments.locks import open_session_locks
from hosting.environments.sandboxes import SessionSandboxes
from hosting.environments.settings import EnvironmentSettings
from hosting.environments.webhook import create_app
from hosting.http_limits import LimitedConfig
from hosting.sandboxes.base import SandboxError
from hosting.sandboxes.settings import open_backend
from hosting.settings_env import ConfigError

logger = logging.getLogger("hosting.environments")


async def serve(settings: EnvironmentSettings) -> None:
    """Run until cancelled."""
    backend = open_backend(settings.sandboxes)
    # Explicit credentials: the client reads no ANTHROPIC_API_KEY; only the environment key is used.
    api = AsyncAnthropic(auth_token=settings.environment_key, base_url=settings.api_base_url)
    locks = open_session_locks(settings.redis_url, settings.environment_id, settings.lock_seconds)
    archive: ArchivedSessions = (RedisArchive(settings.redis_url, settings.environment_id) if settings.redis_url
                                 else FileArchive(settings.sandboxes.data_dir / "archived-sessions.json"))
    lifecycle = Lifecycle(settings, api, SessionSandboxes(backend, settings.environment_id), locks, archive)
    dispatcher = Dispatcher(settings, api, lifecycle)
    janitor = Janitor(lifecycle, settings.idle_seconds)
    jobs = [janitor.run(settings.janitor_seconds)]
    if settings.mode == "webhook":
        assert settings.webhook_secret is not None
        app = create_app(api, settings.webhook_secret, dispatcher)
        server = uvicorn.Server(LimitedConfig(app, settings.http, host=settings.host, port=settings.port,
                                              log_level="warning"))
        dispatcher.drain_requested.set()  # drain what queued while no orchestrator ran
        jobs += [dispatcher.drain_forever(), server.serve()]
    else:
        jobs.append(dispatcher.poll_forever())
    logger.info("serving environment %s (%s mode, %s backend)", settings.environment_id, settings.mode,
                settings.sandboxes.backend)
    try:
        await asyncio.gather(*jobs)
    finally:
        await dispatcher.aclose()
        await locks.aclose()
        await archive.aclose()
        await api.close()
        await backend.aclose()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = EnvironmentSettings.from_env()
        settings.sandboxes.data_dir.mkdir(parents=True, exist_ok=True)
    except (ConfigError, OSError) as exc:
        print(f"agent-environment-orchestrator: {exc}", file=sys.stderr)
        sys.exit(2)

    async def until_signalled() -> None:
        task = asyncio.ensure_future(serve(settings))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        asyncio.run(until_signalled())
    except SandboxError as exc:
        print(f"agent-environment-orchestrator: {exc}", file=sys.stderr)
        sys.exit(2)
    except APIStatusError as exc:  # the poller gives up only on a 4xx that retrying cannot fix
        print(f"agent-environment-orchestrator: the API refused the environment's work queue "
              f"({exc.status_code}): check ANTHROPIC_ENVIRONMENT_ID and the environment key", file=sys.stderr)
        sys.exit(1)
