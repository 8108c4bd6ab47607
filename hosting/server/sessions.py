"""Sessions: one turn at a time each, on a CLI kept warm between turns or started ahead.

:class:`SessionManager` is the one object the HTTP front talks to. It runs each turn
(binding the session to a workspace and a CLI, streaming the CLI's messages as wire
events, ending every turn with ``done``) and composes the parts that decide around it:

- ``live.py``: a CLI connected for one workspace (:class:`~hosting.server.live.LiveSession`),
  and how one is made and started, at most ``max_starting_clis`` at once;
- ``admission.py``: the CLI budget sized to the box's memory, the turns queued for a slot,
  the warm CLIs kept between turns, and which idle CLI gives way;
- ``prestart.py``: the pool of pre-started CLIs for new sessions;
- ``durable.py``: the session store (fencing, restore, catch-up, failures) and whether a
  turn reached its transcript on a full volume;
- ``disk.py``, ``retention.py``: the data volume's budget. A new session that finds it
  over budget is refused (HTTP 507) before anything is created, after evicting idle local
  copies of stored sessions if there is a store. A write that fails for want of room ends
  the turn with ``storage_full``, never a silent success.

What a refusal means to a request (the exceptions below) is decided here; the parts
report what happened and leave that to the session manager.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from claude_agent_sdk import AssistantMessage, MirrorErrorMessage

from hosting.contract import durable_session_id
from hosting.errors import ErrorCode, HostingError, StoreUnavailable
from hosting.server.admission import Admission, Verdict
from hosting.server.disk import Disk, StorageFull, out_of_space
from hosting.server.durable import DurableSessions, cut_torn_tail, turn_saved
from hosting.server.live import CliFactory, LiveSession
from hosting.server.prestart import PrestartPool
from hosting.server.retention import Retention, Upkeep
from hosting.server.settings import Settings
from hosting.server.turns import Numbered, Turn, TurnLog
from hosting.server.wire import Redactor, TurnTranslator
from hosting.server.workspaces import SessionRecord, Workspace, WorkspaceStore
from hosting.stores.protocol import DurableSessionStore
from hosting.wire import error_event

logger = logging.getLogger("hosting.server.sessions")

STORAGE_FULL_MESSAGE = ("The data volume is full: this turn could not be saved to the session's history. "
                        "Retry once there is room.")


class SessionBusy(HostingError):
    """A turn is already running on this session (HTTP 409)."""

    code = ErrorCode.SESSION_BUSY

    def __init__(self, session_id: str) -> None:
        super().__init__(f"a turn is already running on session {session_id!r}")


class NotAccepting(HostingError):
    """The server is shutting down (HTTP 503)."""

    code = ErrorCode.SHUTTING_DOWN


class NoRoom(HostingError):
    """No CLI could be started within the memory budget in time (HTTP 503)."""

    code = ErrorCode.AT_CAPACITY


@dataclass
class _Running:
    turn: Turn
    task: asyncio.Task[None] | None = None
    live: LiveSession | None = None
    slot: bool = False
    """The turn holds a budget slot for a CLI it has yet to start."""
    record: SessionRecord | None = None
    torn: bool = False
    """The transcript may end in a line cut short by a full disk (cut it once the CLI is closed)."""
    epoch: int | None = None
    """The gateway's epoch for this sandbox's assignment to the session (fencing), if any."""
    ending: bool = False
    """The turn's work is over and it is letting go of its CLI: a shutdown must not cut that short."""


class WrongNamespace(HostingError):
    """A request for another tenant's sessions than the ones this server serves (HTTP 421)."""

    code = ErrorCode.MISDIRECTED

    def __init__(self, namespace: str | None) -> None:
        super().__init__("this sandbox serves another tenant's sessions")
        self.namespace = namespace


class Superseded(HostingError):
    """The session store has seen a newer epoch: another sandbox serves this session now."""

    code = ErrorCode.SUPERSEDED


class SessionManager:
    """Runs turns for every session of one server process."""

    def __init__(self, settings: Settings, workspaces: WorkspaceStore, store: DurableSessionStore | None = None) -> None:
        self._settings = settings
        self._workspaces = workspaces
        self._store = store
        self._redact = Redactor([settings.anthropic_api_key, settings.claude_code_oauth_token, settings.auth_token])
        self._running: dict[str, _Running] = {}
        self._turns = TurnLog()
        self.namespace: str | None = None
        """``<installation>/<tenant>`` whose sessions this server serves, fixed by the gateway's
        first request (:meth:`serve_namespace`); ``None`` for a lone server."""
        self._durable = DurableSessions(store, self._durable_id)
        self._disk = Disk(settings.data_dir, settings.disk_budget_bytes)
        self._cli_factory = CliFactory(settings, store)
        self._admission = Admission(settings)
        self._prestart = PrestartPool(settings, workspaces, self._cli_factory, self._admission, self._disk,
                                      store=store is not None, sessions_held=self._sessions_held)
        self._background: list[asyncio.Task[None]] = []
        self._closed = False
        retention = Retention(settings.session_ttl_seconds,
                              settings.local_cache_seconds if store is not None else None)
        self._upkeep = Upkeep(workspaces, self._disk, store, retention, settings.session_sweep_seconds, self._in_use)

    @property
    def accepting(self) -> bool:
        """``False`` once the server is shutting down: no turn starts any more."""
        return self._admission.accepting

    @property
    def store_failures(self) -> int:
        """Session store writes or reads that failed (the local transcript stayed authoritative)."""
        return self._durable.failures

    def serve_namespace(self, namespace: str | None) -> None:
        """Check a session request's namespace (:data:`hosting.contract.NAMESPACE_HEADER`).
        The first one a gateway sends is this server's for good: a sandbox serves one
        tenant, so one sent for another (or none, once one was) raises :class:`WrongNamespace`."""
        if self.namespace is None and namespace is not None:
            self.namespace = namespace
        if namespace != self.namespace:
            raise WrongNamespace(namespace)

    def _durable_id(self, session_id: str) -> str:
        return durable_session_id(session_id, self.namespace)

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        """Start the pool filler, the idle reaper and the disk upkeep (retention, budget)."""
        if (state := self._disk.state()).over:
            hint = "" if state.budget is not None else " (on a small volume, set AGENT_DISK_BUDGET_BYTES)"
            logger.warning("%s: new sessions are refused until there is room%s", state.describe(), hint)
        self._background = [
            asyncio.create_task(self._prestart.fill(), name="prewarm-pool"),
            asyncio.create_task(self._admission.reap_idle(), name="idle-reaper"),
            asyncio.create_task(self._upkeep.run(), name="disk-upkeep"),
        ]

    def stop_accepting(self) -> None:
        self._admission.stop()  # queued turns are refused at once

    async def wait_for_running_turns(self, timeout: float) -> bool:
        """Wait until no turn runs; ``False`` if some were still running at the timeout."""
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        return not pending

    async def close(self, stop_by: float | None = None) -> None:
        """Stop for good by ``stop_by`` (event-loop time; ``None``: however long closing takes).

        Nothing is admitted any more; the turns still running are cut, each ending its
        stream with ``error`` (``shutting_down``, retryable) and ``done`` at once, so its
        client sends it again elsewhere instead of waiting; then every CLI is closed, all at
        once. A CLI still closing at ``stop_by`` is left to end with the server (its guard,
        ``hosting/bin/claude-guarded``, kills it when the server exits). Let running turns
        finish first with :meth:`wait_for_running_turns`. Later calls do nothing.
        """
        if self._closed:
            return
        self._closed = True
        self.stop_accepting()
        await asyncio.sleep(0)  # a turn task made just now takes its first step: cancelling it then ends its stream
        turns = list(self._running.values())
        for task in [*self._background, *(r.task for r in turns if r.task is not None and not r.ending)]:
            task.cancel()
        stopping = [*self._background, *(r.task for r in turns if r.task is not None),
                    *(asyncio.ensure_future(r.turn.read_out()) for r in turns),
                    asyncio.ensure_future(self._admission.close_warm()), asyncio.ensure_future(self._prestart.close())]
        timeout = None if stop_by is None else max(0.0, stop_by - asyncio.get_running_loop().time())
        _, late = await asyncio.wait(stopping, timeout=timeout)
        if late:
            logger.warning("shutdown deadline: %d CLIs or streams still closing are left to end with the server",
                           len(late))
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    # -- state -----------------------------------------------------------

    @property
    def prewarm_target(self) -> int:
        """How many pre-started CLIs the pool should hold now (``GET /ready``'s ``prewarm_target``):
        0 once no session is to come (``session_capacity``), or with a store."""
        return self._prestart.target

    def _sessions_held(self) -> int:
        """Sessions this server holds (see ``session_capacity``): bound to a workspace here, whether
        their CLI is warm or not, or with a first turn on its way to being bound."""
        return len({session_id for session_id, _ in self._workspaces.last_turns()} | self._running.keys())

    def status(self) -> dict[str, Any]:
        box = self._settings.box
        return {
            "accepting": self.accepting,
            "prewarmed": len(self._prestart),
            "prewarm_target": self.prewarm_target,
            "live_sessions": self._admission.warm_count + sum(1 for r in self._running.values() if r.live is not None),
            "running_turns": len(self._running),
            "warm_sessions_cap": self._settings.warm_sessions,
            "session_store": self._store is not None,
            "store_failures": self.store_failures,
            "memory_limit_bytes": box.memory_limit,
            "memory_budget_bytes": box.memory_budget,
            "cpu_cores": box.cores,
            "cli_budget": self._settings.cli_budget,
            "live_clis": self._admission.slots_held,
            "queued_turns": self._admission.queued,
            **self._disk.state().report(),
        }

    async def check_disk(self) -> None:
        """Measure the data dir again if its estimate says "over budget" and may be stale, so
        that :meth:`status` (``GET /ready``) sees room that someone else freed."""
        await self._disk.check()

    async def describe(self, session_id: str) -> dict[str, Any] | None:
        record = self._workspaces.get(session_id)
        if record is None:
            if await self._durable.stored(session_id):
                return {"session_id": session_id, "created_at": None, "updated_at": None,
                        "has_history": True, "busy": False, "live": False}
            return None
        transcript = record.workspace.transcript()
        return {
            "session_id": session_id,
            "created_at": record.created_at,
            "updated_at": transcript.stat().st_mtime if transcript else None,
            "has_history": transcript is not None,
            "busy": session_id in self._running,
            "live": self._admission.is_warm(session_id) or session_id in self._running,
        }

    # -- turns -----------------------------------------------------------

    async def start_turn(self, session_id: str, prompt: str, *, include_raw: bool = False,
                         epoch: int | None = None) -> Turn:
        """Reserve the session, wait for room for its CLI, and start its turn in the background.

        The session is reserved before the first await, so two requests for one
        session cannot both pass the busy check. A turn refused for want of room
        (:class:`NoRoom`) has created nothing. The turn runs in its own task: a
        client that goes away does not stop it.
        """
        if not self.accepting:
            raise NotAccepting("the server is shutting down")
        if session_id in self._running:
            raise SessionBusy(session_id)
        turn = self._turns.new_turn(session_id)
        running = self._running[session_id] = _Running(turn, epoch=epoch)
        try:
            if self._workspaces.get(session_id) is None:
                await self._room_for_new_session()
            running.slot = await self._admit(session_id)
            if not self.accepting:  # closing began meanwhile: no turn starts that it would not cut
                raise NotAccepting("the server is shutting down")
            record = running.record = self._bind(running)
        except BaseException:
            del self._running[session_id]
            if running.slot:
                self._admission.free_slot()
            raise
        running.task = asyncio.create_task(self._run(running, record, prompt, include_raw), name=f"turn:{session_id}")
        self._turns.started(turn)
        return turn

    def reattach(self, session_id: str, after: str | None) -> AsyncIterator[Numbered] | None:
        """The session's running or last turn, read on after event ``after`` (see
        :meth:`TurnLog.reattach`); ``None`` if this process has no turn of it."""
        return self._turns.reattach(session_id, after)

    async def _room_for_new_session(self) -> None:
        """Refuse a session with no local copy (new, or to be restored from the store) while
        the volume is over its budget, after making room if the store allows it."""
        state = await self._upkeep.make_room()
        if state.over:
            raise StorageFull(f"{state.describe()}. Existing sessions keep working; new sessions are refused "
                              "until there is room.")

    def _in_use(self, session_id: str | None, sdk_session_id: str) -> bool:
        """Whether retention must leave a session (``None``: an unbound workspace) alone: a turn
        runs on it, or a CLI of this process holds its workspace or is closing."""
        if session_id is not None and (session_id in self._running or self._admission.is_warm(session_id)):
            return True
        return self._admission.being_closed(sdk_session_id) is not None or any(
            r.record is not None and r.record.workspace.sdk_session_id == sdk_session_id
            for r in self._running.values())

    def _needs_cli(self, session_id: str) -> bool:
        """Whether the session's next turn must start a CLI: it has no warm one, and it is not
        a new session that a pre-started CLI can serve (never with a store, whose pool is
        empty: see :meth:`_bind`)."""
        if self._admission.is_warm(session_id):
            return False
        return not (len(self._prestart) > 0 and self._store is None and self._workspaces.get(session_id) is None)

    async def _admit(self, session_id: str) -> bool:
        """Wait for room for the session's CLI (:meth:`Admission.admit`); ``True`` if a budget
        slot was taken for it. Past ``queue_timeout_seconds``: :class:`NoRoom`."""
        verdict = await self._admission.admit(lambda: self._needs_cli(session_id), self._prestart.give_one_up)
        if verdict is Verdict.SHUTTING_DOWN:
            raise NotAccepting("the server is shutting down")
        if verdict is Verdict.NO_ROOM:
            raise NoRoom(f"all {self._settings.cli_budget} CLIs that fit in this server's memory "
                         "are busy; retry shortly")
        return verdict is Verdict.SLOT_TAKEN

    def _bind(self, running: _Running) -> SessionRecord:
        """The session's record; ``running.live`` becomes its connected CLI if one is ready
        (warm or pre-started), else the turn starts one with the slot it holds.

        With a store the SDK session id must be derivable from the public id, so
        pre-started CLIs (whose ids are fixed at spawn) are not used (none are started).
        """
        session_id = running.turn.session_id
        running.live = self._admission.take_warm(session_id)
        record = self._workspaces.get(session_id)
        if record is not None and self._store is not None and running.live is None \
                and record.workspace.sdk_session_id != self._durable_id(session_id):
            # Filed before session ids were per tenant: the gateway copied its stored
            # conversation to the tenant's id at start-up; resume from there.
            self._workspaces.unbind(session_id)
            record = None
        if record is not None:
            return record
        pooled = self._prestart.take() if self._store is None else None
        workspace: Workspace | None = None
        try:
            if pooled is not None:
                workspace = pooled.workspace
            else:
                workspace = self._workspaces.new_workspace(self._durable_id(session_id) if self._store else None)
            record = self._workspaces.bind(session_id, workspace)
        except OSError as exc:
            # Nothing bound: give back the pre-started CLI, remove a workspace made here.
            if pooled is not None:
                self._prestart.put_back(pooled)
            elif workspace is not None and not workspace.has_history():
                self._workspaces.discard(workspace)
            if out_of_space(exc):
                raise StorageFull(f"no room on the data volume for a new session ({exc.strerror}); "
                                  "existing sessions keep working") from None
            raise
        if pooled is not None and record.workspace != pooled.workspace:
            # Another process bound this id first and our workspace is gone: the turn takes over the slot.
            asyncio.create_task(pooled.close())
            running.slot, pooled = True, None
        running.live = pooled
        return record

    async def _run(self, running: _Running, record: SessionRecord, prompt: str, include_raw: bool) -> None:
        turn = running.turn
        translator = TurnTranslator(self._redact, include_raw=include_raw)
        try:
            if not await self._durable.fence(turn.session_id, running.epoch):
                raise Superseded(turn.session_id)
            if running.live is None:
                await self._durable.prepare(record.workspace, running.epoch)
            turn.announce(resumed=record.workspace.has_history())
            if running.live is None:
                closing = self._admission.being_closed(record.workspace.sdk_session_id)
                if closing is not None:
                    await closing.wait()
                running.live = self._cli_factory.open(record.workspace)
                if running.live is None:
                    raise SessionBusy(record.workspace.sdk_session_id)
                running.slot = False  # the CLI holds it now
            live = running.live
            if live.mirror is not None:
                live.mirror.epoch = running.epoch
            if not live.connected:
                await self._cli_factory.connect(live, for_turn=True)
            elif live.mirror_gap:
                live.mirror_gap = not await self._durable.catch_up_store(record.workspace, running.epoch)
            if turn.interrupt_requested:
                turn.emit(error_event(ErrorCode.INTERRUPTED, "The turn was interrupted before it started."))
                return
            recorded_from = record.workspace.transcript_size()
            last_entry: str | None = None
            await live.client.query(prompt)
            if turn.interrupt_requested:
                await live.client.interrupt()
            async for message in live.client.receive_response():
                if isinstance(message, MirrorErrorMessage):
                    self._durable.count_failure(message.error)
                    live.mirror_gap = True
                    record.workspace.mirror_gap_marker.touch()
                elif isinstance(message, AssistantMessage) and message.parent_tool_use_id is None:
                    last_entry = message.uuid
                for event in translator.translate(message):
                    turn.emit(event)
            if translator.result is None:
                live.healthy = False
                turn.emit(error_event(ErrorCode.AGENT_ERROR, "The agent ended without a result."))
            elif translator.result.subtype == "error_max_budget_usd":
                # The CLI counts AGENT_MAX_BUDGET_USD over its whole life and refuses every later turn
                # once it is reached: the session's next turn gets a new CLI, with a new allowance.
                live.healthy = False
            elif (not translator.result.is_error and self._disk.state().full
                  and not await turn_saved(record.workspace, recorded_from, last_entry)):
                live.healthy = False  # its next turn resumes from what the transcript really holds
                running.torn = True
                logger.warning("session %s: the turn could not be saved to its transcript (%d MiB free on the data "
                               "volume)", turn.session_id, self._disk.state().free // 2**20)
                turn.emit(error_event(ErrorCode.STORAGE_FULL, STORAGE_FULL_MESSAGE))
        except SessionBusy:
            turn.emit(error_event(ErrorCode.SESSION_BUSY, "Another server process owns this session."))
        except Superseded:
            logger.warning("session %s: this sandbox was replaced (epoch %s is stale); the turn was not run",
                           turn.session_id, running.epoch)
            turn.emit(error_event(ErrorCode.SUPERSEDED, "This session moved to another sandbox; send the turn again."))
        except StoreUnavailable:
            if not record.workspace.has_history():
                self._workspaces.delete(turn.session_id)  # nothing was restored: leave no binding behind
            turn.emit(error_event(ErrorCode.STORE_UNAVAILABLE, "The session store is unavailable, so the session's "
                                  "history cannot be loaded; nothing was run. Retry shortly."))
        except asyncio.CancelledError:  # the server is shutting down (close)
            if running.live is not None:
                running.live.healthy = False
            turn.emit(error_event(ErrorCode.SHUTTING_DOWN, "The server shut down during the turn; send it again."))
            turn.finish()  # now: closing the cut CLI may take until the shutdown deadline
        except Exception as exc:  # noqa: BLE001 - every failure must end the stream cleanly
            if running.live is not None:
                running.live.healthy = False
            if out_of_space(exc) or self._disk.state().full:
                logger.warning("turn on session %s failed, no room on the data volume: %s", turn.session_id, exc)
                await self._forget_if_empty(running, record)
                turn.emit(error_event(ErrorCode.STORAGE_FULL, STORAGE_FULL_MESSAGE))
            else:
                logger.exception("turn on session %s failed", turn.session_id)
                turn.emit(error_event(ErrorCode.AGENT_ERROR, self._redact(f"The agent failed: {exc}")))
        finally:
            running.ending = True
            turn.announce(resumed=False)  # no-op if announced; a failure before it still starts with `session`
            self._workspaces.stamp(turn.session_id)  # the session's last turn, for retention
            del self._running[turn.session_id]
            if running.slot:
                self._admission.free_slot()
            evicted = await self._admission.release(turn.session_id, running.live) if running.live is not None else []
            if running.torn:
                cut_torn_tail(record.workspace)  # its CLI is closed: nothing appends meanwhile
            turn.finish()
            for live in evicted:
                await self._admission.close(live)

    async def _forget_if_empty(self, running: _Running, record: SessionRecord) -> None:
        """A session whose turn recorded nothing leaves nothing behind: its CLI is closed,
        then its binding and workspace are removed (a store, if any, keeps its history)."""
        if record.workspace.has_history():
            return
        if running.live is not None:
            live, running.live = running.live, None
            await self._admission.close(live)
        self._workspaces.delete(running.turn.session_id)

    # -- control ---------------------------------------------------------

    async def interrupt(self, session_id: str) -> bool:
        """Stop the running turn of a session. ``False`` if none is running."""
        running = self._running.get(session_id)
        if running is None:
            return False
        running.turn.interrupt_requested = True
        if running.live is not None and running.live.connected:
            try:
                await running.live.client.interrupt()
            except Exception:  # noqa: BLE001 - the flag still stops a turn not yet sent
                logger.debug("interrupt before the query reached the CLI", exc_info=True)
        return True

    async def delete(self, session_id: str) -> bool:
        """Forget a session everywhere: its CLI, its files and its stored copy.

        The store goes first, so a store outage (:class:`StoreUnavailable`)
        leaves everything as it was.
        """
        if session_id in self._running:
            raise SessionBusy(session_id)
        stored = await self._durable.delete(session_id)
        self._turns.forget(session_id)
        live = self._admission.take_warm(session_id)
        if live is not None:
            await self._admission.close(live)
        removed = self._workspaces.unbind(session_id)
        if removed is not None:
            self._prestart.refill()  # one more session may come
            await self._upkeep.discard(removed)
        return removed is not None or stored
