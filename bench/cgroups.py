"""A memory cgroup made for a measurement or a test: a server runs inside it, under a limit,
as it would in a container (``docker run --memory``), with every CLI it starts.

cgroup v1 (a hierarchy per controller, as on the bench machine): a child of this process's
own memory cgroup. cgroup v2: a child of the unified hierarchy's root, which must delegate
the memory controller. Needs root; :meth:`MemoryCgroup.create` says why it cannot when it
cannot. :meth:`MemoryCgroup.close` kills what is left inside and removes the cgroup.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from hosting.server.box import cgroup_of

PREFIX = "agent-box-"


class CgroupUnavailable(RuntimeError):
    """No memory cgroup can be made here (not root, no writable hierarchy, v2 without delegation)."""


def _field(text: str, name: str) -> int:
    """The value of ``name`` in a "key value" per line file (memory.events, memory.oom_control)."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return int(value)
    return 0


@dataclass
class MemoryCgroup:
    path: Path
    version: int

    @classmethod
    def create(cls, limit_bytes: int) -> MemoryCgroup:
        """A new cgroup limited to ``limit_bytes``. Left-overs of runs that were killed (their
        maker's pid is gone) are removed first."""
        if os.geteuid() != 0:
            raise CgroupUnavailable("making a cgroup needs root")
        v1, v2 = cgroup_of("memory"), cgroup_of("")
        if v1 is not None:
            parent, version, limit_file = v1.own, 1, "memory.limit_in_bytes"
        elif v2 is not None and "memory" in _read(v2.top / "cgroup.subtree_control").split():
            parent, version, limit_file = v2.top, 2, "memory.max"
        else:
            raise CgroupUnavailable("no cgroup v1 memory hierarchy, and the v2 root does not delegate memory")
        for stale in parent.glob(f"{PREFIX}*"):
            if not Path("/proc", stale.name.removeprefix(PREFIX).split("-")[0]).exists():  # its maker is gone
                _remove(stale)
        path = parent / f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        try:
            path.mkdir()
            (path / limit_file).write_text(str(limit_bytes))
        except OSError as exc:
            _remove(path)
            raise CgroupUnavailable(f"cannot make a memory cgroup under {parent}: {exc}") from exc
        return cls(path, version)

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` started inside the cgroup: the process enters it before it execs, so every
        page it and its children touch is charged here."""
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path), *argv]

    def usage(self) -> int:
        return int(_read(self.path / ("memory.usage_in_bytes" if self.version == 1 else "memory.current")))

    def peak(self) -> int | None:
        """Highest usage so far (v2 kernels before 5.19 do not record it)."""
        text = _read(self.path / ("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"))
        return int(text) if text.strip().isdigit() else None

    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer killed in this cgroup."""
        if self.version == 1:
            return _field(_read(self.path / "memory.oom_control"), "oom_kill")
        return _field(_read(self.path / "memory.events"), "oom_kill")

    def limit_hits(self) -> int:
        """Times usage reached the limit and the kernel had to reclaim (v1 failcnt, v2 "max" events)."""
        if self.version == 1:
            return int(_read(self.path / "memory.failcnt") or 0)
        return _field(_read(self.path / "memory.events"), "max")

    def counters(self) -> dict[str, int | None]:
        return {"usage_bytes": self.usage(), "peak_bytes": self.peak(), "oom_kills": self.oom_kills(),
                "limit_hits": self.limit_hits()}

    def close(self) -> None:
        """Kill whatever is still inside (only processes we started are) and remove the cgroup."""
        _remove(self.path)


def drop_file_cache(path: Path) -> None:
    """Evict a file's unmapped pages from the page cache, so the next reader (a server in a
    fresh cgroup) is charged for them, as in a new container."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _remove(path: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while path.exists():
        for pid in _read(path / "cgroup.procs").split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            path.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
