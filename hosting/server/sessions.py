"""Sessions: one turn at a time each, CLIs kept warm between turns and started ahead.

A *live session* is a connected ``ClaudeSDKClient`` bound to one workspace.

- After a turn it stays connected, up to ``warm_sessions`` of them (least
  recently used evicted first, idle ones closed after ``idle_timeout_seconds``),
  so a follow-up turn skips spawning the CLI and reloading the transcript. An
  evicted session loses nothing: its next turn resumes from its transcript.
- At most ``max_starting_clis`` CLIs start at once; the rest queue. A start is
  CPU-bound, and two dozen at once on two cores each cost over twice the CPU of
  one alone (caches thrash), so queueing finishes a burst of new sessions sooner.
- ``prewarm`` fresh CLIs wait in a pool, each in its own new workspace, so the
  first turn of a new session skips the spawn too. The pool refills one CLI at a
  time, with spare CPU only and never while a turn waits for its CLI, so
  refilling does not compete with turns in flight. A pre-started CLI is primed
  (asked for its context usage, no model call) before it joins the pool.
- Every live CLI (warm, running, pre-started or starting) holds one of the
  ``cli_budget`` slots sized to the box's memory. A turn that needs a new CLI
  when none is free queues instead of pushing the box into reclaim: in arrival
  order it takes the slot of an idle CLI (least recently used first, then a
  pre-started one; see :data:`EVICTION_GRACE_SECONDS`), and past
  ``queue_timeout_seconds`` it is refused (HTTP 503) before anything is created.
- The data volume has a budget (``disk.py``, ``retention.py``): a new session that
  finds it over budget is refused (HTTP 507) before anything is created, after
  evicting idle local copies of stored sessions if there is a store. A write that
  fails for want of room ends the turn with ``storage_full``, never a silent success.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from claude_agent_sdk import AssistantMessage, ClaudeAgentOptions, ClaudeSDKClient, MirrorErrorMessage

from hosting.contract import durable_session_id
from hosting.errors import ErrorCode, HostingError, StoreUnavailable
from hosting.server.box import SpareCpu
from hosting.server.cli import guarded_cli
from hosting.server.disk import Disk, StorageFull, out_of_space
from hosting.server.durable import MirrorOnly, catch_up, restore, store_key
from hosting.server.retention import Retention, Upkeep
from hosting.server.settings import Settings
from hosting.server.turns import Numbered, Turn, TurnLog
from hosting.server.wire import Redactor, TurnTranslator
from hosting.server.workspaces import SessionRecord, Workspace, WorkspaceStore, drop_torn_tail, turn_recorded
from hosting.stores.protocol import DurableSessionStore
from hosting.wire import error_event
from research_agent.options import build_options

logger = logging.getLogger("hosting.server.sessions")

REFILL_WINDOW_SECONDS = 0.25
"""The pool starts a CLI only if a whole core (or, on a machine or quota of less than two,
half of it) was spare over the last window of this length, and never while a turn waits
for its CLI (it must not take a turn's start slot)."""


EVICTION_GRACE_SECONDS = 0.5
"""A queued turn closes an idle CLI only once it has been idle this long (a pre-started one
goes first): clients often send a session's next turn at once, and closing its CLI would
cost that turn a fresh start. Under 1 GiB, a burst of 25 new sessions of two turns each
took 31 s with 19 refusals (503) instead of 67 s with 47."""


TRANSCRIPT_SETTLE_SECONDS = 0.5
"""The CLI does not report a failed transcript write, so on a full volume (only: a check
that misfired would fail every turn) a turn's transcript is read back, and a turn it
lacks is looked at once more after this long before it is reported as ``storage_full``.
The CLI writes the transcript before it reports the result (measured), so the second look
only guards against a slower flush."""

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
        list) now instead of in the session's first turn; no model call is made.
        Only an optimisation: a CLI that cannot answer is still usable."""
        try:
            await self.client.get_context_usage()
        except Exception:  # noqa: BLE001
            logger.debug("could not prime the CLI of %s", self.workspace.sdk_session_id, exc_info=True)

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
        self.store_failures = 0
        self._redact = Redactor([settings.anthropic_api_key, settings.claude_code_oauth_token, settings.auth_token])
        self._cli_path, self._cli_env = guarded_cli()
        self._idle: OrderedDict[str, LiveSession] = OrderedDict()
        self._running: dict[str, _Running] = {}
        self._turns = TurnLog()
        self._fenced: dict[str, int] = {}  # session -> the epoch this process fenced it with
        self.namespace: str | None = None
        """``<installation>/<tenant>`` whose sessions this server serves, fixed by the gateway's
        first request (:meth:`serve_namespace`); ``None`` for a lone server."""
        self._pool: deque[LiveSession] = deque()
        self._pool_wanted = asyncio.Event()
        self._starting = asyncio.Semaphore(settings.max_starting_clis)
        self._spare_cpu = SpareCpu(settings.box)
        self._turns_starting = 0
        self._clis = 0  # budget slots held: live CLIs, CLIs starting, turns about to start one
        self._queue: deque[object] = deque()  # turns waiting for a slot, oldest first
        self._room_changed = asyncio.Event()  # replaced on each signal: a broadcast
        self._closing: dict[str, asyncio.Event] = {}  # workspaces whose CLI is being closed
        self._background: list[asyncio.Task[None]] = []
        self.accepting = True
        self._disk = Disk(settings.data_dir, settings.disk_budget_bytes)
        retention = Retention(settings.session_ttl_seconds,
                              settings.local_cache_seconds if store is not None else None)
        self._upkeep = Upkeep(workspaces, self._disk, store, retention, settings.session_sweep_seconds, self._in_use)

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
            asyncio.create_task(self._fill_pool(), name="prewarm-pool"),
            asyncio.create_task(self._reap_idle(), name="idle-reaper"),
            asyncio.create_task(self._upkeep.run(), name="disk-upkeep"),
        ]
        self._pool_wanted.set()

    def stop_accepting(self) -> None:
        self.accepting = False
        self._signal_room()  # queued turns are refused at once

    async def wait_for_running_turns(self, timeout: float) -> bool:
        """Wait until no turn runs; ``False`` if some were still running at the timeout."""
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        return not pending

    async def close(self, grace_seconds: float = 0.0) -> None:
        """Stop accepting turns, let running ones finish within the grace period, close every CLI."""
        self.stop_accepting()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if not await self.wait_for_running_turns(grace_seconds):
            tasks = [r.task for r in self._running.values() if r.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        while self._idle:
            await self._close(self._idle.popitem()[1])
        while self._pool:
            await self._close(self._pool.popleft(), pooled=True)

    # -- state -----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        box = self._settings.box
        return {
            "accepting": self.accepting,
            "prewarmed": len(self._pool),
            "prewarm_target": self._settings.prewarm,
            "live_sessions": len(self._idle) + sum(1 for r in self._running.values() if r.live is not None),
            "running_turns": len(self._running),
            "warm_sessions_cap": self._settings.warm_sessions,
            "session_store": self._store is not None,
            "store_failures": self.store_failures,
            "memory_limit_bytes": box.memory_limit,
            "memory_budget_bytes": box.memory_budget,
            "cpu_cores": box.cores,
            "cli_budget": self._settings.cli_budget,
            "live_clis": self._clis,
            "queued_turns": len(self._queue),
            **self._disk.state().report(),
        }

    async def check_disk(self) -> None:
        """Measure the data dir again if its estimate says "over budget" and may be stale, so
        that :meth:`status` (``GET /ready``) sees room that someone else freed."""
        await self._disk.check()

    async def describe(self, session_id: str) -> dict[str, Any] | None:
        record = self._workspaces.get(session_id)
        if record is None:
            if await self._stored(session_id):
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
            "live": session_id in self._idle or session_id in self._running,
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
            record = running.record = self._bind(running)
        except BaseException:
            del self._running[session_id]
            if running.slot:
                self._free_slot()
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
        if session_id is not None and (session_id in self._running or session_id in self._idle):
            return True
        return sdk_session_id in self._closing or any(
            r.record is not None and r.record.workspace.sdk_session_id == sdk_session_id
            for r in self._running.values())

    def _needs_cli(self, session_id: str) -> bool:
        """Whether the session's next turn must start a CLI: it has no warm one, and it is not
        a new session that a pre-started CLI can serve (never with a store: see :meth:`_bind`)."""
        if session_id in self._idle:
            return False
        return not (self._pool and self._store is None and self._workspaces.get(session_id) is None)

    async def _admit(self, session_id: str) -> bool:
        """Wait for room for the session's CLI; ``True`` if a budget slot was taken for it.

        Turns that need a slot queue in arrival order. The first in line takes a free
        slot, or closes an idle CLI to free one (:meth:`_evict_one`); the others wait.
        Past ``queue_timeout_seconds``: :class:`NoRoom`.
        """
        if not self._needs_cli(session_id):
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.queue_timeout_seconds
        ticket = object()
        self._queue.append(ticket)
        try:
            while True:
                if not self.accepting:
                    raise NotAccepting("the server is shutting down")
                if not self._needs_cli(session_id):
                    return False
                retry_in = float("inf")
                if self._queue[0] is ticket:
                    if self._clis < self._settings.cli_budget:
                        self._clis += 1
                        return True
                    retry_in = await self._evict_one()
                    if not retry_in:
                        continue
                changed = self._room_changed
                try:
                    await asyncio.wait_for(changed.wait(), min(retry_in, deadline - loop.time()))
                except TimeoutError:
                    if loop.time() >= deadline:
                        raise NoRoom(f"all {self._settings.cli_budget} CLIs that fit in this server's memory "
                                     "are busy; retry shortly") from None
        finally:
            self._queue.remove(ticket)
            self._signal_room()  # the next in line may act now

    async def _evict_one(self) -> float:
        """Close the least recently used idle CLI if it has been idle for
        :data:`EVICTION_GRACE_SECONDS`, else a pre-started one. ``0`` when one was closed,
        else how long until the idle one may be (infinite: none is idle)."""
        oldest = next(iter(self._idle.values()), None)
        age = time.monotonic() - oldest.last_used if oldest is not None else 0.0
        if oldest is not None and age >= EVICTION_GRACE_SECONDS:
            await self._close(self._idle.popitem(last=False)[1])
        elif self._pool:
            await self._close(self._pool.popleft(), pooled=True)
            self._pool_wanted.set()
        else:
            return EVICTION_GRACE_SECONDS - age if oldest is not None else float("inf")
        return 0.0

    def _signal_room(self) -> None:
        """Wake every waiter: a slot was freed, a CLI went idle, or the server is closing."""
        self._room_changed.set()
        self._room_changed = asyncio.Event()

    def _free_slot(self) -> None:
        self._clis -= 1
        self._signal_room()

    async def _close(self, live: LiveSession, *, pooled: bool = False) -> None:
        """Close a CLI and free its slot. Until it has exited its workspace stays locked,
        so a turn of the same session waits for it (see :meth:`_run`)."""
        closed = self._closing[live.workspace.sdk_session_id] = asyncio.Event()
        try:
            await live.close()
        finally:
            del self._closing[live.workspace.sdk_session_id]
            closed.set()
            if pooled:
                self._workspaces.discard(live.workspace)
            self._free_slot()

    def _bind(self, running: _Running) -> SessionRecord:
        """The session's record; ``running.live`` becomes its connected CLI if one is ready
        (warm or pre-started), else the turn starts one with the slot it holds.

        With a store the SDK session id must be derivable from the public id,
        so pre-started CLIs (whose ids are fixed at spawn) are not used.
        """
        session_id = running.turn.session_id
        running.live = self._idle.pop(session_id, None)
        record = self._workspaces.get(session_id)
        if record is not None and self._store is not None and running.live is None \
                and record.workspace.sdk_session_id != self._durable_id(session_id):
            # Filed before session ids were per tenant: the gateway copied its stored
            # conversation to the tenant's id at start-up; resume from there.
            self._workspaces.unbind(session_id)
            record = None
        if record is not None:
            return record
        pooled = self._pool.popleft() if self._pool and self._store is None else None
        self._pool_wanted.set()
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
                self._pool.appendleft(pooled)
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
            await self._fence(turn.session_id, running.epoch)
            if running.live is None:
                await self._prepare_durable(record.workspace, running.epoch)
            turn.announce(resumed=record.workspace.has_history())
            if running.live is None:
                closing = self._closing.get(record.workspace.sdk_session_id)
                if closing is not None:
                    await closing.wait()
                running.live = self._open(record.workspace)
                running.slot = False  # the CLI holds it now
            live = running.live
            if live.mirror is not None:
                live.mirror.epoch = running.epoch
            if not live.connected:
                await self._connect(live, for_turn=True)
            elif live.mirror_gap:
                live.mirror_gap = not await self._catch_up(record.workspace, running.epoch)
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
                    self._count_store_failure(message.error)
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
                  and not await self._recorded(record.workspace, recorded_from, last_entry)):
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
        except asyncio.CancelledError:
            if running.live is not None:
                running.live.healthy = False
            turn.emit(error_event(ErrorCode.SHUTTING_DOWN, "The server shut down during the turn."))
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
            turn.announce(resumed=False)  # no-op if announced; a failure before it still starts with `session`
            self._workspaces.stamp(turn.session_id)  # the session's last turn, for retention
            del self._running[turn.session_id]
            if running.slot:
                self._free_slot()
            evicted = await self._release(turn.session_id, running.live) if running.live is not None else []
            if running.torn:
                self._drop_torn_tail(record.workspace)  # its CLI is closed: nothing appends meanwhile
            turn.finish()
            for live in evicted:
                await self._close(live)

    async def _recorded(self, workspace: Workspace, offset: int, entry_uuid: str | None) -> bool:
        """Whether the turn reached the transcript whole (see :data:`TRANSCRIPT_SETTLE_SECONDS`)."""
        if turn_recorded(workspace.transcript(), offset, entry_uuid):
            return True
        await asyncio.sleep(TRANSCRIPT_SETTLE_SECONDS)
        return turn_recorded(workspace.transcript(), offset, entry_uuid)

    @staticmethod
    def _drop_torn_tail(workspace: Workspace) -> None:
        transcript = workspace.transcript()
        try:
            if transcript is not None:
                drop_torn_tail(transcript)
        except OSError as exc:
            logger.warning("could not cut the torn end of %s: %s", transcript, exc)

    async def _forget_if_empty(self, running: _Running, record: SessionRecord) -> None:
        """A session whose turn recorded nothing leaves nothing behind: its CLI is closed,
        then its binding and workspace are removed (a store, if any, keeps its history)."""
        if record.workspace.has_history():
            return
        if running.live is not None:
            live, running.live = running.live, None
            await self._close(live)
        self._workspaces.delete(running.turn.session_id)

    async def _fence(self, session_id: str, epoch: int | None) -> None:
        """Before a turn the gateway sent under ``epoch``: raise the session's epoch in the
        store, so that no sandbox it replaced can write to the session any more.
        :class:`Superseded` if a newer one is there (this sandbox was replaced)."""
        if epoch is None or self._store is None or self._fenced.get(session_id) == epoch:
            return
        try:
            current = await self._store.fence(store_key(self._durable_id(session_id)), epoch)
        except Exception as exc:  # noqa: BLE001 - any driver error means "unavailable"
            raise StoreUnavailable(str(exc)) from exc
        if not current:
            raise Superseded(session_id)
        self._fenced[session_id] = epoch

    async def _prepare_durable(self, workspace: Workspace, epoch: int | None) -> None:
        """Before a CLI starts: restore the transcript from the store, or bring the store up to date."""
        if self._store is None:
            return
        if not workspace.has_history():
            await restore(self._store, workspace)
        elif workspace.mirror_gap_marker.exists():
            await self._catch_up(workspace, epoch)

    async def _catch_up(self, workspace: Workspace, epoch: int | None) -> bool:
        transcript = workspace.transcript()
        if self._store is None or transcript is None:
            return True
        try:
            await catch_up(self._store, transcript, workspace.sdk_session_id, epoch)
        except StoreUnavailable as exc:
            self._count_store_failure(str(exc))
            workspace.mirror_gap_marker.touch()
            return False
        workspace.mirror_gap_marker.unlink(missing_ok=True)
        return True

    def _count_store_failure(self, error: str) -> None:
        self.store_failures += 1
        logger.warning("session store mirror failed (%d so far); the local transcript stays authoritative: %s",
                       self.store_failures, error)

    async def _stored(self, session_id: str) -> bool:
        if self._store is None:
            return False
        try:
            return bool(await self._store.load(store_key(self._durable_id(session_id))))
        except Exception as exc:  # noqa: BLE001 - any driver error means "unavailable"
            raise StoreUnavailable(str(exc)) from exc

    def _open(self, workspace: Workspace) -> LiveSession:
        lock_fd = workspace.try_lock()
        if lock_fd is None:
            raise SessionBusy(workspace.sdk_session_id)
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

    async def _connect(self, live: LiveSession, *, for_turn: bool) -> None:
        """Start a CLI once one of the ``max_starting_clis`` slots is free."""
        self._turns_starting += for_turn
        try:
            async with self._starting:
                await live.connect()
        finally:
            self._turns_starting -= for_turn

    async def _release(self, session_id: str, live: LiveSession) -> list[LiveSession]:
        """Keep the CLI warm if allowed (else close it now, before the session's next turn
        can start); return the least recently used ones past the cap, for the caller to
        close once its turn has ended."""
        if not (live.healthy and self.accepting and self._settings.warm_sessions > 0):
            await self._close(live)
            return []
        live.last_used = time.monotonic()
        self._idle[session_id] = live
        self._signal_room()  # a queued turn may take its slot
        evicted = []
        while len(self._idle) > self._settings.warm_sessions:
            evicted.append(self._idle.popitem(last=False)[1])
        return evicted

    # -- background ------------------------------------------------------

    async def _fill_pool(self) -> None:
        while True:
            await self._pool_wanted.wait()
            self._pool_wanted.clear()
            while self.accepting and len(self._pool) < self._settings.prewarm:
                if not await self._room_to_start():
                    continue
                self._clis += 1
                workspace: Workspace | None = None
                try:
                    workspace = self._workspaces.new_workspace()
                    live = self._open(workspace)
                except OSError as exc:  # a full disk, say: retry later
                    if workspace is not None:
                        self._workspaces.discard(workspace)
                    self._free_slot()
                    logger.warning("could not pre-start a CLI: %s", exc)
                    await asyncio.sleep(5)
                    continue
                try:
                    await self._connect(live, for_turn=False)
                    await live.prime()
                except BaseException as exc:
                    await self._close(live, pooled=True)
                    if not isinstance(exc, Exception):  # cancelled: the server is closing
                        raise
                    logger.exception("could not pre-start a CLI")  # retry later; turns fall back to spawning
                    await asyncio.sleep(5)
                    continue
                self._pool.append(live)
                self._signal_room()  # a queued turn of a new session may take it

    async def _room_to_start(self) -> bool:
        """Whether the pool may start a CLI now: a slot of the budget is free and no turn
        queues for one, and see :data:`REFILL_WINDOW_SECONDS`."""
        self._spare_cpu.cores()  # start a fresh window
        await asyncio.sleep(REFILL_WINDOW_SECONDS)
        spare = self._spare_cpu.cores()
        if self._turns_starting or self._queue or self._clis >= self._settings.cli_budget:
            return False
        if self._disk.state().over:  # its workspace would take room that sessions need
            return False
        return spare is None or spare >= min(1.0, self._spare_cpu.capacity / 2)

    async def _reap_idle(self) -> None:
        timeout = self._settings.idle_timeout_seconds
        while True:
            await asyncio.sleep(max(0.05, min(timeout / 4, 30.0)))
            cutoff = time.monotonic() - timeout
            for session_id in [sid for sid, live in self._idle.items() if live.last_used < cutoff]:
                live = self._idle.pop(session_id, None)  # a turn may have taken it meanwhile
                if live is not None:
                    await self._close(live)

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
        stored = False
        if self._store is not None:
            stored = await self._stored(session_id)
            if stored:
                try:
                    await self._store.delete(store_key(self._durable_id(session_id)))
                except Exception as exc:  # noqa: BLE001 - any driver error means "unavailable"
                    raise StoreUnavailable(str(exc)) from exc
        self._turns.forget(session_id)
        live = self._idle.pop(session_id, None)
        if live is not None:
            await self._close(live)
        removed = self._workspaces.unbind(session_id)
        if removed is not None:
            await self._upkeep.discard(removed)
        return removed is not None or stored
