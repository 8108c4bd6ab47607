"""Live sessions: a CLI connected for one workspace, and how one is made and started.

A *live session* is a connected ``ClaudeSDKClient`` bound to one workspace: the
workspace is the CLI's home, config dir and working directory, so no session's CLI
starts in, or records to, another's. Which CLIs may be alive, and for how long, is
``admission.py``'s business; this module only makes and starts them.
"""

from __future__ import annotations

import asyncio
import logging
import time

from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient

from hosting.server.cli import guarded_cli
from hosting.server.durable import MirrorOnly
from hosting.server.settings import Settings
from hosting.server.workspaces import Workspace
from hosting.stores.protocol import DurableSessionStore
from research_agent.options import build_options

logger = logging.getLogger("hosting.server.live")

PRIME_REQUEST = {"subtype": "get_context_usage", "detail": "summary"}
"""How a pre-started CLI is primed. The SDK's ``get_context_usage()`` asks for the
``full`` detail, for which the CLI counts each category with the Messages API's
``POST /v1/messages/count_tokens``: four calls per CLI, which the real API rate-limits on
their own. The ``summary`` detail estimates them locally from the same prompt and tools."""


class LiveSession:
    """A CLI process connected for one workspace, owning the workspace's lock."""

    def __init__(self, workspace: Workspace, options: ClaudeAgentOptions, lock_fd: int,
                 mirror: MirrorOnly | None) -> None:
        self.workspace = workspace
        self.client = ClaudeSDKClient(options)
        self.mirror = mirror
        """What the SDK writes the store through (``None`` without a store); carries the turn's epoch."""
        self._lock_fd: int | None = lock_fd
        self.connected = False
        self.healthy = True
        self.mirror_gap = False
        self.last_used = time.monotonic()

    async def connect(self) -> None:
        await self.client.connect()
        self.connected = True

    async def prime(self) -> None:
        """Run the CLI's first-request code paths (building the system prompt and tool
        list) now instead of in the session's first turn, which is that much faster
        (bench/README.md), with :data:`PRIME_REQUEST`: nothing is sent upstream.
        Only an optimisation: a CLI that cannot answer is still usable."""
        try:
            # Private: the SDK's get_context_usage() cannot ask for the summary. Inside the
            # try, so that an SDK that moved it leaves the CLI unprimed, not unusable.
            query = self.client._query
            if query is not None:
                await query._send_control_request(PRIME_REQUEST)
        except Exception as exc:  # noqa: BLE001 - said once per CLI, so an SDK that changed is noticed
            logger.warning("could not prime the CLI of %s (%s): its first turn starts colder",
                           self.workspace.sdk_session_id, type(exc).__name__)

    async def close(self) -> None:
        try:
            if self.connected:
                await self.client.disconnect()
        except Exception:  # noqa: BLE001 - a dying CLI must not block shutdown
            logger.warning("error closing the CLI of %s", self.workspace.sdk_session_id, exc_info=True)
        finally:
            self.connected = False
            if self._lock_fd is not None:
                Workspace.unlock(self._lock_fd)
                self._lock_fd = None


class CliFactory:
    """Makes the CLI of a workspace and starts at most ``max_starting_clis`` at once.

    The CLI's options point it at its workspace (home, config dir, temp dir, working
    directory), resume the workspace's transcript if it has one, and mirror it to the
    session store if there is one. A start is CPU-bound, and two dozen at once on two
    cores each cost over twice the CPU of one alone (caches thrash), so the rest queue:
    a burst of new sessions finishes sooner.
    """

    def __init__(self, settings: Settings, store: DurableSessionStore | None) -> None:
        self._settings = settings
        self._store = store
        self._cli_path, self._cli_env = guarded_cli()
        self._starting = asyncio.Semaphore(settings.max_starting_clis)
        self._turns_starting = 0

    @property
    def turns_starting(self) -> int:
        """Turns waiting for their CLI to start, or starting it (the pool gives way to them)."""
        return self._turns_starting

    def open(self, workspace: Workspace) -> LiveSession | None:
        """The workspace's CLI, not started yet; ``None`` if another process holds the workspace."""
        lock_fd = workspace.try_lock()
        if lock_fd is None:
            return None
        mirror = MirrorOnly(self._store) if self._store is not None else None  # type: ignore[abstract]
        return LiveSession(workspace, self._options(workspace, mirror), lock_fd, mirror)

    def _options(self, workspace: Workspace, mirror: MirrorOnly | None) -> ClaudeAgentOptions:
        env = {
            **self._settings.cli_env(),
            **self._cli_env,
            "HOME": str(workspace.root),
            "CLAUDE_CONFIG_DIR": str(workspace.config_dir),
            "TMPDIR": str(workspace.root),
        }
        if workspace.has_history():
            session: dict[str, str] = {"resume": workspace.sdk_session_id}
        else:
            session = {"session_id": workspace.sdk_session_id}
        return build_options(
            model=self._settings.model,
            cwd=workspace.work_dir,
            env=env,
            cli_path=self._cli_path,
            include_partial_messages=True,
            max_budget_usd=self._settings.max_budget_usd,
            session_store=mirror,
            stderr=lambda line: logger.debug("cli %s: %s", workspace.sdk_session_id, line),
            **session,
        )

    async def connect(self, live: LiveSession, *, for_turn: bool) -> None:
        """Start a CLI once one of the ``max_starting_clis`` slots is free."""
        self._turns_starting += for_turn
        try:
            async with self._starting:
                await live.connect()
        finally:
            self._turns_starting -= for_turn
