"""Sessions that outlive their sandbox: local disk first, a SessionStore behind it.

Policy: a turn always runs from the session's local transcript. The store is
used to *restore* that transcript when a fresh sandbox has none, and as a
*mirror* that receives every new transcript line. So:

- a store outage during a turn never breaks the turn (the local copy is
  enough); the failed mirror batch is counted and re-sent later (``catch_up``
  re-appends the local transcript; the adapters drop entries they already hold
  by ``uuid``);
- a session that must be restored while the store is down gets a retryable
  error instead of silently starting an empty conversation.

In the store every session is filed under one project key, keyed by its SDK
session id alone, so it resumes on any sandbox whatever its local paths. With
a store, that id is derived from the public session id and, behind a gateway,
its tenant (:func:`hosting.contract.durable_session_id`), so a fresh sandbox
finds it without any local state and never finds another tenant's.

The local transcript is the session's record, so on a full volume a turn counts as
saved only if its transcript holds it whole (:func:`turn_saved`); a torn last line is
cut (:func:`cut_torn_tail`) before anything appends to it again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from claude_agent_sdk import SessionStore, project_key_for_directory
from claude_agent_sdk.types import SessionKey, SessionStoreEntry

from hosting.contract import STORE_PROJECT_KEY
from hosting.errors import StoreUnavailable
from hosting.server.workspaces import Workspace, drop_torn_tail, turn_recorded
from hosting.stores.protocol import DurableSessionStore

logger = logging.getLogger("hosting.server.durable")

CATCH_UP_BATCH = 500

TRANSCRIPT_SETTLE_SECONDS = 0.5
"""The CLI does not report a failed transcript write, so on a full volume (only: a check
that misfired would fail every turn) a turn's transcript is read back, and a turn it
lacks is looked at once more after this long before it is reported as ``storage_full``.
The CLI writes the transcript before it reports the result (measured), so the second look
only guards against a slower flush."""


def store_key(sdk_session_id: str) -> SessionKey:
    return {"project_key": STORE_PROJECT_KEY, "session_id": sdk_session_id}


class MirrorOnly(SessionStore):
    """What the SDK sees of the store: appends go through, loads find nothing.

    Finding nothing keeps the SDK from materialising the session into a
    temporary directory: the CLI resumes from the workspace's own transcript,
    which :func:`restore` has put in place. The optional methods stay the protocol's
    ``NotImplementedError`` defaults on purpose: the SDK probes for them, and mypy
    counts them as abstract (hence the ``type: ignore[abstract]`` where it is made).
    """

    def __init__(self, inner: DurableSessionStore) -> None:
        self._inner = inner
        self.epoch: int | None = None
        """The epoch of the turn running now (fencing: a replaced sandbox's appends are refused)."""

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        await self._inner.append({**key, "project_key": STORE_PROJECT_KEY}, entries, epoch=self.epoch)

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        return None


async def restore(store: SessionStore, workspace: Workspace) -> bool:
    """Write the stored transcript into the workspace. ``False`` if the store has none."""
    try:
        entries = await store.load(store_key(workspace.sdk_session_id))
    except Exception as exc:  # noqa: BLE001 - any driver error means "unavailable"
        raise StoreUnavailable(str(exc)) from exc
    if not entries:
        return False
    project_dir = workspace.config_dir / "projects" / project_key_for_directory(str(workspace.work_dir))
    project_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=project_dir, prefix=".restore-")
    with os.fdopen(fd, "w") as handle:
        handle.writelines(json.dumps(entry) + "\n" for entry in entries)
    os.replace(tmp, project_dir / f"{workspace.sdk_session_id}.jsonl")
    return True


def _parse(line: str) -> SessionStoreEntry | None:
    """One transcript line; ``None`` for a blank or torn one (a write cut short by a crash)."""
    try:
        return json.loads(line) if line.strip() else None
    except ValueError:
        return None


async def catch_up(store: DurableSessionStore, transcript: Path, sdk_session_id: str, epoch: int | None) -> None:
    """Re-send the local transcript to the store; entries it holds are skipped by uuid."""
    entries = [entry for line in transcript.read_text().splitlines() if (entry := _parse(line)) is not None]
    key = store_key(sdk_session_id)
    try:
        for start in range(0, len(entries), CATCH_UP_BATCH):
            await store.append(key, entries[start:start + CATCH_UP_BATCH], epoch=epoch)
    except Exception as exc:  # noqa: BLE001 - any driver error means "unavailable"
        raise StoreUnavailable(str(exc)) from exc


def _entry_ids(transcript: Path) -> set[str]:
    return {entry["uuid"] for line in transcript.read_text().splitlines()
            if (entry := _parse(line)) is not None and isinstance(entry.get("uuid"), str)}


async def store_holds(store: SessionStore, transcript: Path, sdk_session_id: str) -> bool:
    """Whether the store holds every entry of the local transcript (by ``uuid``), so that
    the local copy can go: the mirror is asynchronous and may have dropped a batch."""
    local = await asyncio.to_thread(_entry_ids, transcript)
    try:
        stored = await store.load(store_key(sdk_session_id)) or []
    except Exception as exc:  # noqa: BLE001 - any driver error means "unavailable"
        raise StoreUnavailable(str(exc)) from exc
    return local <= {entry.get("uuid") for entry in stored}


class DurableSessions:
    """One server's use of the session store (``None``: local disk only): fencing off the
    sandboxes it replaced, restoring or catching up a workspace before its CLI starts,
    finding and deleting stored copies, and counting the store's failures.

    ``durable_id`` maps a public session id to the SDK session id it is stored under
    (it depends on the tenant the server serves, which the session manager learns).
    """

    def __init__(self, store: DurableSessionStore | None, durable_id: Callable[[str], str]) -> None:
        self._store = store
        self._durable_id = durable_id
        self._fenced: dict[str, int] = {}  # session -> the epoch this process fenced it with
        self.failures = 0
        """Store writes or reads that failed (the local transcript stayed authoritative)."""

    async def fence(self, session_id: str, epoch: int | None) -> bool:
        """Before a turn the gateway sent under ``epoch``: raise the session's epoch in the
        store, so that no sandbox it replaced can write to the session any more.
        ``False`` if a newer one is there (this sandbox was replaced)."""
        if epoch is None or self._store is None or self._fenced.get(session_id) == epoch:
            return True
        try:
            current = await self._store.fence(store_key(self._durable_id(session_id)), epoch)
        except Exception as exc:  # noqa: BLE001 - any driver error means "unavailable"
            raise StoreUnavailable(str(exc)) from exc
        if not current:
            return False
        self._fenced[session_id] = epoch
        return True

    async def prepare(self, workspace: Workspace, epoch: int | None) -> None:
        """Before a CLI starts: restore the transcript from the store, or bring the store up to date."""
        if self._store is None:
            return
        if not workspace.has_history():
            await restore(self._store, workspace)
        elif workspace.mirror_gap_marker.exists():
            await self.catch_up_store(workspace, epoch)

    async def catch_up_store(self, workspace: Workspace, epoch: int | None) -> bool:
        """Re-send the workspace's transcript after a mirror failure; ``False`` (counted, and
        marked for the next turn) if the store is still unavailable."""
        transcript = workspace.transcript()
        if self._store is None or transcript is None:
            return True
        try:
            await catch_up(self._store, transcript, workspace.sdk_session_id, epoch)
        except StoreUnavailable as exc:
            self.count_failure(str(exc))
            workspace.mirror_gap_marker.touch()
            return False
        workspace.mirror_gap_marker.unlink(missing_ok=True)
        return True

    def count_failure(self, error: str) -> None:
        self.failures += 1
        logger.warning("session store mirror failed (%d so far); the local transcript stays authoritative: %s",
                       self.failures, error)

    async def stored(self, session_id: str) -> bool:
        """Whether the store holds the session."""
        if self._store is None:
            return False
        try:
            return bool(await self._store.load(store_key(self._durable_id(session_id))))
        except Exception as exc:  # noqa: BLE001 - any driver error means "unavailable"
            raise StoreUnavailable(str(exc)) from exc

    async def delete(self, session_id: str) -> bool:
        """Delete the session's stored copy; ``False`` if there was none."""
        if self._store is None or not await self.stored(session_id):
            return False
        try:
            await self._store.delete(store_key(self._durable_id(session_id)))
        except Exception as exc:  # noqa: BLE001 - any driver error means "unavailable"
            raise StoreUnavailable(str(exc)) from exc
        return True


async def turn_saved(workspace: Workspace, offset: int, entry_uuid: str | None) -> bool:
    """Whether the turn reached the transcript whole (see :data:`TRANSCRIPT_SETTLE_SECONDS`)."""
    if turn_recorded(workspace.transcript(), offset, entry_uuid):
        return True
    await asyncio.sleep(TRANSCRIPT_SETTLE_SECONDS)
    return turn_recorded(workspace.transcript(), offset, entry_uuid)


def cut_torn_tail(workspace: Workspace) -> None:
    """Cut the last line of the workspace's transcript if a failed write left it incomplete
    (call it once its CLI is closed: nothing appends meanwhile). A failure is logged only."""
    transcript = workspace.transcript()
    try:
        if transcript is not None:
            drop_torn_tail(transcript)
    except OSError as exc:
        logger.warning("could not cut the torn end of %s: %s", transcript, exc)
