"""Where each session lives on disk, and the atomic map from public ids to it.

Layout under the data root::

    sessions/<session_id>.json      {"sdk_session_id": UUID, "created_at": ...}
    workspaces/<UUID>/work/         the CLI's working directory
    workspaces/<UUID>/config/       its CLAUDE_CONFIG_DIR (transcripts live here)
    workspaces/<UUID>/lock          held while a process owns the session
    trash/                          removed workspaces, until their files are deleted

Every session has its own working and config directories, so no session's CLI
starts in, or records to, another's. The public id maps to a UUID that is also
the SDK session id; the map entry is created with ``os.link``, which fails if
the entry exists, so two first turns racing on one id (in one process or
several) agree on one conversation.

A binding's modification time is the end of the session's last turn (see
:meth:`WorkspaceStore.stamp`): retention reads it, and it survives restarts.
A session is removed by unlinking its binding, then renaming its workspace into
the trash, each one step: no turn ever finds a half-deleted workspace, and the
files are deleted afterwards, off the event loop.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
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

    def transcript_size(self) -> int:
        transcript = self.transcript()
        return transcript.stat().st_size if transcript is not None else 0

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


def turn_recorded(transcript: Path | None, offset: int, entry_uuid: str | None) -> bool:
    """Whether a turn whose lines start at ``offset`` reached the transcript whole: it ends
    with a complete line and holds the turn's last message (``entry_uuid``).

    The CLI does not report a failed transcript write: on a full disk the turn succeeds
    and leaves a torn line, or nothing."""
    if transcript is None:
        return False
    with transcript.open("rb") as handle:
        handle.seek(offset)
        written = handle.read()
    return written.endswith(b"\n") and (entry_uuid is None or entry_uuid.encode() in written)


def drop_torn_tail(transcript: Path, chunk: int = 64 * 1024) -> None:
    """Cut a last line that a failed write left incomplete, so that the next line the CLI
    appends is not glued to it. Needs no free space."""
    with transcript.open("rb+") as handle:
        end = position = handle.seek(0, os.SEEK_END)
        while position > 0:
            step = min(chunk, position)
            position -= step
            handle.seek(position)
            newline = handle.read(step).rfind(b"\n")
            if newline >= 0:
                if position + newline + 1 < end:
                    handle.truncate(position + newline + 1)
                return
        handle.truncate(0)


@contextmanager
def _unless_held(workspace: Workspace) -> Iterator[bool]:
    """Hold the workspace's lock for the block; ``False`` if a process (a CLI) holds it.
    A workspace without a lock file (gone, or never opened and no room to make one) is not held."""
    try:
        lock = workspace.try_lock()
    except OSError:
        yield True
        return
    if lock is None:
        yield False
        return
    try:
        yield True
    finally:
        Workspace.unlock(lock)


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
        self._trash = data_dir / "trash"

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
        made = not workspace.root.exists()
        try:
            workspace.work_dir.mkdir(parents=True, exist_ok=True)
            workspace.config_dir.mkdir(exist_ok=True)
        except OSError:
            if made:  # a full disk leaves no half-made workspace behind
                shutil.rmtree(workspace.root, ignore_errors=True)
            raise
        return workspace

    def _binding(self, session_id: str) -> Path:
        return self._index / f"{session_id}.json"

    def get(self, session_id: str) -> SessionRecord | None:
        try:
            entry = json.loads(self._binding(session_id).read_text())
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
            os.link(tmp, self._binding(session_id))
        except FileExistsError:
            winner = self.get(session_id)
            assert winner is not None
            if winner.workspace.root != workspace.root:  # durable ids give both racers the same root
                self.discard(workspace)
            return winner
        finally:
            os.unlink(tmp)
        return SessionRecord(session_id, workspace, json.loads(entry)["created_at"])

    def stamp(self, session_id: str, when: float | None = None) -> None:
        """Record the end of a turn of the session (now, or ``when``) as its binding's mtime."""
        try:
            os.utime(self._binding(session_id), None if when is None else (when, when))
        except FileNotFoundError:  # deleted meanwhile
            pass

    def last_turns(self) -> list[tuple[str, float]]:
        """Every bound session with the end of its last turn, from one directory listing."""
        found = []
        with os.scandir(self._index) as entries:
            for entry in entries:
                if entry.name.endswith(".json") and not entry.name.startswith("."):
                    try:
                        found.append((entry.name[:-5], entry.stat().st_mtime))
                    except FileNotFoundError:
                        continue
        return found

    def last_turn(self, session_id: str) -> float | None:
        """The end of the session's last turn: its binding's mtime, or its transcript's if
        later (bindings made before stamps existed carry their creation time)."""
        record = self.get(session_id)
        if record is None:
            return None
        try:
            stamped = self._binding(session_id).stat().st_mtime
            transcript = record.workspace.transcript()
            return max(stamped, transcript.stat().st_mtime) if transcript is not None else stamped
        except FileNotFoundError:
            return None

    def unbind(self, session_id: str, *, unless_held: bool = False) -> Path | None:
        """Forget the session: unlink its binding, then move its workspace out of sight.

        Returns what is left to :meth:`purge` (``None``: no such session, or with
        ``unless_held``, a process holds the workspace, so nothing was changed).
        The binding goes first: a crash in between leaves an unbound workspace,
        which the retention sweep removes, never a binding without its workspace.
        """
        record = self.get(session_id)
        if record is None:
            return None
        with _unless_held(record.workspace) if unless_held else nullcontext(True) as free:
            if not free:
                return None
            self._binding(session_id).unlink(missing_ok=True)
            return self._to_trash(record.workspace.root)

    def delete(self, session_id: str) -> bool:
        """Forget the session and remove its files now. ``False`` if it did not exist."""
        removed = self.unbind(session_id)
        if removed is not None:
            self.purge(removed)
        return removed is not None

    def orphans(self, changed_before: float) -> list[Path]:
        """Workspaces no binding names, unchanged since ``changed_before``: left by a crash
        (a pre-started CLI's, a removal cut short) or a failed first turn."""
        bound = {record.workspace.sdk_session_id for session_id, _ in self.last_turns()
                 if (record := self.get(session_id)) is not None}
        found = []
        with os.scandir(self._workspaces) as entries:
            for entry in entries:
                try:
                    if entry.name not in bound and entry.stat().st_mtime < changed_before:
                        found.append(Path(entry.path))
                except FileNotFoundError:
                    continue
        return found

    def take_orphan(self, root: Path) -> Path | None:
        """Move an unbound workspace out of sight unless a process holds it (a pre-started CLI)."""
        with _unless_held(Workspace(root.name, root)) as free:
            return self._to_trash(root) if free else None

    def trash(self) -> list[Path]:
        """What removals left in the trash (a crash, or a removal still deleting)."""
        return list(self._trash.iterdir()) if self._trash.exists() else []

    def _to_trash(self, root: Path) -> Path:
        """Move a workspace into the trash in one step; where it cannot move (say, no room
        for the trash's directory entry), it is left to be deleted in place."""
        moved = self._trash / f"{root.name}.{uuid.uuid4().hex[:8]}"
        try:
            self._trash.mkdir(exist_ok=True)  # made on first use: a full disk may not start with room for it
            os.rename(root, moved)
        except OSError:
            return root
        return moved

    @staticmethod
    def purge(path: Path) -> None:
        """Delete a removed workspace's files (slow for big ones: callers run it in a thread)."""
        shutil.rmtree(path, ignore_errors=True)

    def discard(self, workspace: Workspace) -> None:
        """Remove a workspace that was never bound (a pre-started CLI's)."""
        shutil.rmtree(workspace.root, ignore_errors=True)
