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
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path

from claude_agent_sdk import SessionStore, project_key_for_directory
from claude_agent_sdk.types import SessionKey, SessionStoreEntry

from hosting.contract import STORE_PROJECT_KEY
from hosting.errors import StoreUnavailable
from hosting.server.workspaces import Workspace
from hosting.stores.protocol import DurableSessionStore

CATCH_UP_BATCH = 500


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
