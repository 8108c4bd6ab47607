"""How much CPU is going unused, so background work (refilling the pool) can use only that.

Inside a container with cgroup v2 the numbers are the container's own: its CPU
usage (``cpu.stat``) against its quota (``cpu.max``). Elsewhere they are the
whole machine's (``/proc/stat``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def usable_cpus() -> int:
    """CPUs this process may run on (a CPU quota is not visible here; see :class:`SpareCpu`)."""
    return len(os.sched_getaffinity(0))


class SpareCpu:
    """Spare CPU, in cores, between one reading and the next."""

    def __init__(self, cgroup: Path = CGROUP, proc_stat: Path = Path("/proc/stat")) -> None:
        self._cgroup_stat = cgroup / "cpu.stat"
        self._cgroup_max = cgroup / "cpu.max"
        self._proc_stat = proc_stat
        self._last = self._read()

    @property
    def capacity(self) -> float:
        """Cores available in all (the quota, or the CPUs), as of the last reading."""
        return self._last[2] if self._last is not None else float(usable_cpus())

    def cores(self) -> float | None:
        """Cores left unused since the previous call; ``None`` if nothing can be read."""
        previous, self._last = self._last, self._read()
        if previous is None or self._last is None:
            return None
        (wall0, busy0, _), (wall1, busy1, capacity) = previous, self._last
        if wall1 <= wall0:
            return None
        return max(0.0, capacity - (busy1 - busy0) / (wall1 - wall0))

    def _read(self) -> tuple[float, float, float] | None:
        """``(clock, busy CPU-seconds, capacity in cores)``."""
        try:
            return self._read_cgroup()
        except (OSError, ValueError):
            pass
        try:
            return self._read_proc_stat()
        except (OSError, ValueError):
            return None

    def _read_cgroup(self) -> tuple[float, float, float]:
        usage = next(line.split()[1] for line in self._cgroup_stat.read_text().splitlines()
                     if line.startswith("usage_usec "))
        quota, period = self._cgroup_max.read_text().split()
        cpus = float(usable_cpus())
        capacity = cpus if quota == "max" else min(cpus, int(quota) / int(period))
        return time.monotonic(), int(usage) / 1e6, capacity

    def _read_proc_stat(self) -> tuple[float, float, float]:
        lines = self._proc_stat.read_text().splitlines()
        ticks = [int(x) for x in lines[0].split()[1:]]
        idle = ticks[3] + ticks[4]  # idle + iowait
        cpus = sum(1 for line in lines if line.startswith("cpu") and line[3].isdigit())
        per_second = os.sysconf("SC_CLK_TCK")
        return time.monotonic(), (sum(ticks[:8]) - idle) / per_second, float(cpus)
