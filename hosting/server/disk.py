"""The data volume's room: how full it is, the disk budget, and what "full" means.

A sandbox's disk is small (the hosting guide sizes it at 5 GiB) and every session
leaves a transcript on it, so the server watches two numbers:

- the volume's free space (``statvfs``: cheap, always current), which must stay
  above a floor: by default ``max(10% of the volume, 256 MiB)``;
- with ``AGENT_DISK_BUDGET_BYTES``, the bytes under the data dir, which must stay
  within that budget; the floor is then only :data:`FULL_BELOW_BYTES`.

Over budget, new sessions get room made for them (local copies of stored sessions
evicted, see ``retention.py``) or are refused (HTTP 507); existing sessions keep
working. Walking the data dir costs time, so it is measured now and then and, in
between, estimated from the free space lost since (see :meth:`Disk.state`).
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hosting.errors import ErrorCode, HostingError

MiB = 2**20

FREE_SHARE = 0.10
MIN_FREE_BYTES = 256 * MiB
"""The default floor: keep at least this share of the volume, and at least this many bytes, free."""

FULL_BELOW_BYTES = 8 * MiB
FULL_BELOW_INODES = 64
"""Below this much free space, or so few free inodes, the volume is full, whatever the budget:
writes are failing or about to. With an explicit budget it is also the floor: the turns of
existing sessions, which are never refused, need room for their transcripts."""

MEASURE_AGAIN_SECONDS = 5.0
"""An estimate that says "over the budget" is checked by walking the data dir again, at most
this often, before anyone acts on it (see :meth:`Disk.state` for how it errs)."""

MEASURE_EVERY_SECONDS = 60.0
"""With a budget, the data dir is walked again at least this often when checked."""

OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class StorageFull(HostingError):
    """There is no room on the data volume for what a request must write (HTTP 507)."""

    code = ErrorCode.STORAGE_FULL


def out_of_space(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from, is a full disk or quota."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in OUT_OF_SPACE:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def free_floor(total: int, budget: int | None) -> int:
    """The free space the server keeps on a volume of ``total`` bytes."""
    if budget is not None:
        return FULL_BELOW_BYTES
    return max(int(total * FREE_SHARE), MIN_FREE_BYTES)


@dataclass(frozen=True)
class DiskState:
    """One reading of the data volume against the budget."""

    total: int
    free: int
    floor: int
    budget: int | None
    """``AGENT_DISK_BUDGET_BYTES``, or ``None``: the floor alone is the budget."""
    used: int | None
    """Bytes under the data dir (measured or estimated); ``None`` when no budget needs them."""
    inodes_free: int | None = None
    """``None`` on file systems without an inode limit (btrfs, say)."""

    @property
    def full(self) -> bool:
        return self.free < FULL_BELOW_BYTES or (self.inodes_free is not None and self.inodes_free < FULL_BELOW_INODES)

    @property
    def over(self) -> bool:
        if self.full or self.free < self.floor:
            return True
        return self.budget is not None and self.used is not None and self.used > self.budget

    def describe(self) -> str:
        """Why the volume is over its budget, for a 507's detail and the log."""
        if self.inodes_free is not None and self.inodes_free < FULL_BELOW_INODES:
            return f"the data volume has {self.inodes_free} free inodes left"
        if self.free < self.floor:
            return (f"the data volume has {self.free / MiB:.0f} MiB free of {self.total / MiB:.0f} MiB, "
                    f"below the {self.floor / MiB:.0f} MiB this server keeps free")
        return (f"sessions use {(self.used or 0) / MiB:.1f} MiB of the data volume, "
                f"over the budget of {(self.budget or 0) / MiB:.1f} MiB (AGENT_DISK_BUDGET_BYTES)")

    def report(self) -> dict[str, Any]:
        """What ``GET /ready`` shows."""
        return {"disk_total_bytes": self.total, "disk_free_bytes": self.free, "disk_free_floor_bytes": self.floor,
                "disk_budget_bytes": self.budget, "disk_used_bytes": self.used, "disk_free_inodes": self.inodes_free,
                "disk_over_budget": self.over}


def usage(root: Path) -> int:
    """Bytes allocated under ``root`` (like ``du``); entries removed meanwhile are skipped."""
    total = 0
    stack = [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                total += entry.stat(follow_symlinks=False).st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
            except OSError:
                continue
    return total


class Disk:
    """Reads the data volume and the data dir's size against the budget."""

    def __init__(self, data_dir: Path, budget: int | None) -> None:
        self._data_dir = data_dir
        self._budget = budget
        self._measured: tuple[int, int, float] | None = None  # (bytes used, free space then, monotonic time)

    def _volume(self) -> tuple[int, int, int | None]:
        st = os.statvfs(self._data_dir)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize, st.f_favail if st.f_files else None

    def state(self) -> DiskState:
        """A reading without walking the data dir: its size is the last measure plus the free
        space the volume lost since, exact while the server is the volume's only writer. On a
        shared volume it errs high when others write (measured again before it is acted on)
        and low when others free space while the server writes (measured again within
        :data:`MEASURE_EVERY_SECONDS`); it never falls below the last measure."""
        total, free, inodes_free = self._volume()
        used = None
        if self._budget is not None and self._measured is not None:
            measured, free_then, _ = self._measured
            used = measured + max(0, free_then - free)
        return DiskState(total, free, free_floor(total, self._budget), self._budget, used, inodes_free)

    async def measure(self) -> None:
        """Walk the data dir (off the event loop). Only a budget needs it."""
        if self._budget is None:
            return
        measured = await asyncio.to_thread(usage, self._data_dir)
        self._measured = (measured, self._volume()[1], time.monotonic())

    def forget(self, size: int) -> None:
        """Take ``size`` bytes the server deleted off the estimate (as if gone at the last measure)."""
        if self._measured is not None:
            measured, free_then, when = self._measured
            self._measured = (max(0, measured - size), free_then + size, when)

    async def check(self) -> DiskState:
        """A reading to act on: the data dir is measured first if it never was, if the last
        measure is :data:`MEASURE_EVERY_SECONDS` old, or if the estimate says "over the
        budget" and the last measure is :data:`MEASURE_AGAIN_SECONDS` old."""
        state = self.state()
        if self._budget is None:
            return state
        age = time.monotonic() - self._measured[2] if self._measured is not None else float("inf")
        if age >= MEASURE_EVERY_SECONDS or (state.over and age >= MEASURE_AGAIN_SECONDS):
            await self.measure()
            state = self.state()
        return state
