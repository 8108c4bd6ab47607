"""Sessions: one turn at a time each, connected CLIs kept warm between turns.

A *live session* is a connected ``ClaudeSDKClient`` bound to one workspace.
After a turn it stays connected (up to ``warm_sessions`` of them, least
recently used evicted first), so a follow-up turn skips spawning the CLI and
reloading the transcript. An evicted session loses nothing: its transcript is
on disk and its next turn resumes from it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any

from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient

from hosting.config import Settings
from hosting.turns import Turn
from hosting.wire import Redactor, TurnTranslator, WireEvent, error_event
from hosting.workspaces import SessionRecord, Workspace, WorkspaceStore
from research_agent.options import build_options

logger = logging.getLogger("hosting.sessions")


class SessionBusy(Exception):
    """A turn is already running on this session (HTTP 409)."""


class NotAccepting(Exception):
    """The server is shutting down or not ready (HTTP 503)."""


class LiveSession:
    """A CLI process connected for one workspace, owning its lock."""

    def __init__(self, workspace: Workspace, options: ClaudeAgentOptions, lock_fd: int) -> None:
        self.workspace = workspace
        self.client = ClaudeSDKClient(options)
        self._lock_fd = lock_fd
        self.connected = False
        self.healthy = True

    async def connect(self) -> None:
        await self.client.connect()
        self.connected = True

    async def close(self) -> None:
        try:
            if self.connected:
                await self.client.disconnect()
        except Exception:  # noqa: BLE001 - a dying CLI must not block shutdown
            logger.warning("error while closing the CLI of %s", self.workspace.sdk_session_id, exc_info=True)
        finally:
            self.connected = False
            Workspace.unlock(self._lock_fd)


class SessionManager:
    """Runs turns for every session of one server process."""

    def __init__(self, settings: Settings, workspaces: WorkspaceStore) -> None:
        self._settings = settings
        self._workspaces = workspaces
        self._redact = Redactor([settings.anthropic_api_key, settings.claude_code_oauth_token, settings.auth_token])
        self._live: OrderedDict[str, LiveSession] = OrderedDict()
        self._running: dict[str, tuple[Turn, LiveSession | None, asyncio.Task[None] | None]] = {}
        self.accepting = True

    # -- state -----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {"live_sessions": len(self._live) + len(self._running), "running_turns": len(self._running)}

    def describe(self, session_id: str) -> dict[str, Any] | None:
        record = self._workspaces.get(session_id)
        if record is None:
            return None
        transcript = record.workspace.transcript()
        return {
            "session_id": session_id,
            "created_at": record.created_at,
            "updated_at": transcript.stat().st_mtime if transcript else None,
            "has_history": transcript is not None,
            "busy": session_id in self._running,
            "live": session_id in self._live or session_id in self._running,
        }

    # -- turns -----------------------------------------------------------

    def start_turn(self, session_id: str, prompt: str, *, include_raw: bool = False) -> Turn:
        """Reserve the session and start the turn in the background.

        Synchronous up to the reservation, so two requests for one session
        cannot both pass the busy check.
        """
        if not self.accepting:
            raise NotAccepting("the server is shutting down")
        if session_id in self._running:
            raise SessionBusy(session_id)
        turn = Turn(session_id)
        self._running[session_id] = (turn, None, None)
        try:
            record = self._workspaces.bind(session_id)
        except BaseException:
            del self._running[session_id]
            raise
        turn.emit(WireEvent("session", {"session_id": session_id, "resumed": record.workspace.has_history()}))
        task = asyncio.create_task(self._run(turn, record, prompt, include_raw), name=f"turn:{session_id}")
        self._running[session_id] = (turn, None, task)
        return turn

    async def _run(self, turn: Turn, record: SessionRecord, prompt: str, include_raw: bool) -> None:
        translator = TurnTranslator(self._redact, include_raw=include_raw)
        live: LiveSession | None = None
        try:
            live = self._live.pop(turn.session_id, None) or self._open(record.workspace)
            self._running[turn.session_id] = (turn, live, self._running[turn.session_id][2])
            if not live.connected:
                await live.connect()
            await live.client.query(prompt)
            async for message in live.client.receive_response():
                for event in translator.translate(message):
                    turn.emit(event)
            if translator.result is None:
                live.healthy = False
                turn.emit(error_event("agent_error", "The agent ended without a result.", retryable=True))
        except SessionBusy:
            turn.emit(error_event("session_busy", "Another server process owns this session.", retryable=True))
        except Exception as exc:  # noqa: BLE001 - every failure must end the stream cleanly
            logger.exception("turn on session %s failed", turn.session_id)
            if live is not None:
                live.healthy = False
            turn.emit(error_event("agent_error", self._redact(f"The agent failed: {exc}"), retryable=True))
        finally:
            del self._running[turn.session_id]
            if live is not None:
                await self._release(turn.session_id, live)
            turn.finish()

    def _open(self, workspace: Workspace) -> LiveSession:
        lock_fd = workspace.try_lock()
        if lock_fd is None:
            raise SessionBusy(workspace.sdk_session_id)
        return LiveSession(workspace, self._options(workspace), lock_fd)

    def _options(self, workspace: Workspace) -> ClaudeAgentOptions:
        resume = workspace.has_history()
        env = {
            **self._settings.cli_env(),
            "HOME": str(workspace.root),
            "CLAUDE_CONFIG_DIR": str(workspace.config_dir),
            "TMPDIR": str(workspace.root),
        }
        session = {"resume": workspace.sdk_session_id} if resume else {"session_id": workspace.sdk_session_id}
        return build_options(
            model=self._settings.model,
            cwd=workspace.work_dir,
            env=env,
            include_partial_messages=True,
            stderr=lambda line: logger.debug("cli %s: %s", workspace.sdk_session_id, line),
            **session,
        )

    async def _release(self, session_id: str, live: LiveSession) -> None:
        """Keep the CLI warm if allowed, evicting the least recently used past the cap."""
        if not (live.healthy and self.accepting and self._settings.warm_sessions > 0):
            await live.close()
            return
        self._live[session_id] = live
        self._live.move_to_end(session_id)
        while len(self._live) > self._settings.warm_sessions:
            _, evicted = self._live.popitem(last=False)
            await evicted.close()

    # -- control ---------------------------------------------------------

    async def interrupt(self, session_id: str) -> bool:
        """Stop the running turn of a session. ``False`` if none is running."""
        running = self._running.get(session_id)
        if running is None or running[1] is None:
            return False
        turn, live, _ = running
        turn.interrupt_requested = True
        await live.client.interrupt()
        return True

    async def delete(self, session_id: str) -> bool:
        if session_id in self._running:
            raise SessionBusy(session_id)
        live = self._live.pop(session_id, None)
        if live is not None:
            await live.close()
        return self._workspaces.delete(session_id)

    async def close(self, grace_seconds: float = 0.0) -> None:
        """Stop accepting turns, let running ones finish within the grace period, close every CLI."""
        self.accepting = False
        tasks = [task for _, _, task in self._running.values() if task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_seconds)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        while self._live:
            _, live = self._live.popitem()
            await live.close()
