"""Where each session lives on disk, and the atomic map from public ids to it.

Layout under the data root::

    sessions/<session_id>.json      {"sdk_session_id": UUID, "created_at": ...}
    workspaces/<UUID>/work/         the CLI's working directory
    workspaces/<UUID>/config/       its CLAUDE_CONFIG_DIR (transcripts live here)
    workspaces/<UUID>/lock          held while a process owns the session

Every session has its own working and config directories, so no session's CLI
starts in, or records to, another's. The public id maps to a UUID that is also
the SDK session id; the map entry is created with ``os.link``, which fails if
the entry exists, so two first turns racing on one id (in one process or
several) agree on one conversation.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

@dataclass(frozen=True)
class Workspace:
    """The directories of one SDK session."""

    sdk_session_id: str
    root: Path

    @property
    def work_dir(self) -> Path:
        return self.root / "work"

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    @property
    def mirror_gap_marker(self) -> Path:
        """Exists while the session store may lack part of the local transcript."""
        return self.root / "mirror-gap"

    def transcript(self) -> Path | None:
        """The CLI's transcript of this session, if a turn has been recorded."""
        return next(self.config_dir.glob(f"projects/*/{self.sdk_session_id}.jsonl"), None)

    def has_history(self) -> bool:
        return self.transcript() is not None

    def try_lock(self) -> int | None:
        """Take the cross-process ownership lock; ``None`` if another process holds it."""
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    @staticmethod
    def unlock(fd: int) -> None:
        os.close(fd)


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    workspace: Workspace
    created_at: float


class WorkspaceStore:
    """Creates, finds and deletes session workspaces under one data root."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._index = data_dir / "sessions"
        self._workspaces = data_dir / "workspaces"

    def ensure_writable(self) -> None:
        """Create the layout, failing early if the data root is not writable."""
        for directory in (self._index, self._workspaces):
            directory.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=self._index, prefix=".probe-")
        probe.close()

    def new_workspace(self, sdk_session_id: str | None = None) -> Workspace:
        """A workspace not yet bound to any public id (a random SDK session id by default)."""
        sdk_session_id = sdk_session_id or str(uuid.uuid4())
        workspace = Workspace(sdk_session_id, self._workspaces / sdk_session_id)
        workspace.work_dir.mkdir(parents=True, exist_ok=True)
        workspace.config_dir.mkdir(exist_ok=True)
        return workspace

    def get(self, session_id: str) -> SessionRecord | None:
        try:
            entry = json.loads((self._index / f"{session_id}.json").read_text())
        except FileNotFoundError:
            return None
        sdk_session_id = entry["sdk_session_id"]
        return SessionRecord(session_id, Workspace(sdk_session_id, self._workspaces / sdk_session_id), entry["created_at"])

    def bind(self, session_id: str, workspace: Workspace) -> SessionRecord:
        """Return the session's record, binding it to ``workspace`` if unbound.

        If another binder won the race, its record is returned and the
        workspace made here is removed.
        """
        existing = self.get(session_id)
        if existing is not None:
            if existing.workspace != workspace:
                self.discard(workspace)
            return existing
        entry = json.dumps({"sdk_session_id": workspace.sdk_session_id, "created_at": time.time()})
        fd, tmp = tempfile.mkstemp(dir=self._index, prefix=".bind-")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(entry)
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, self._index / f"{session_id}.json")
        except FileExistsError:
            winner = self.get(session_id)
            assert winner is not None
            if winner.workspace.root != workspace.root:  # durable ids give both racers the same root
                self.discard(workspace)
            return winner
        finally:
            os.unlink(tmp)
        return SessionRecord(session_id, workspace, json.loads(entry)["created_at"])

    def delete(self, session_id: str) -> bool:
        """Forget the session and remove its files. ``False`` if it did not exist."""
        record = self.get(session_id)
        if record is None:
            return False
        (self._index / f"{session_id}.json").unlink(missing_ok=True)
        shutil.rmtree(record.workspace.root, ignore_errors=True)
        return True

    def discard(self, workspace: Workspace) -> None:
        """Remove a workspace that was never bound (a pre-started CLI's)."""
        shutil.rmtree(workspace.root, ignore_errors=True)
