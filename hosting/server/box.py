"""The box the server runs in: its memory limit and CPU quota, read once, and what fits in it.

Every tier runs the server under limits (``docker run --memory``, a Modal
sandbox's memory, a pod's ``resources.limits``), and the server shares them with
every CLI it starts. Sized for the machine instead, it fills a small box with
pre-started CLIs: the kernel then reclaims the pages the CLIs run from (a turn
takes seconds instead of milliseconds) and, past that, OOM-kills CLIs mid-turn.

The limits are the process's own cgroup's, or the tightest of its ancestors':
cgroup v2 (``memory.max``, ``cpu.max`` in the unified hierarchy) or v1
(``memory.limit_in_bytes``, ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, each
controller in its own hierarchy), found through ``/proc/self/cgroup`` and
``/proc/self/mountinfo``. With no limit (v2 ``max``, v1 a number near 2**63) the
machine's memory and CPUs apply.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MiB = 2**20

SERVER_BYTES = 64 * MiB
"""The server process: 55 MiB anonymous (75 MiB resident with its libraries, 77 after 20
turns), 62 MiB charged to a fresh cgroup (measured on the bench machine, 2 cores, Python
3.11, claude-agent-sdk 0.2.189 / CLI 2.1.332)."""

CLI_SHARED_BYTES = 240 * MiB
"""The CLI executable's page cache, charged once to the cgroup whose first CLI reads it:
230-238 MiB measured, 70 MiB of it mapped by every CLI."""

CLI_BYTES = 160 * MiB
"""One connected CLI's own memory (anonymous, charged to the cgroup): 107 MiB pre-started
and primed, 123-125 MiB after its first turns, 155-180 MiB after 10-200 turns. Its resident
size adds the executable's mapped pages, shared by all CLIs: 176 MiB pre-started, 195 MiB
after two turns."""

MEMORY_SHARE = 0.8
"""An idle server (its warm and pre-started CLIs included) keeps within this share of the
memory; the rest is headroom for turns in flight, a CLI's growth and file cache."""

MAX_WARM_SESSIONS = 32
MAX_PREWARM = 12
"""The defaults on a box with room to spare: 12 pre-started CLIs absorb a burst of new
sessions (bench/README.md), and 32 warm ones keep follow-ups fast."""

_NO_LIMIT = 2**62
"""v1 reports "no limit" as the largest page-aligned 64-bit number (9223372036854771712)."""


@dataclass(frozen=True)
class Fit:
    """What fits in a box, as defaults: the budget of live CLIs and how it is used."""

    clis: int
    """Most CLIs alive at once (warm, running, pre-started and starting): the memory budget."""
    prewarm: int
    max_starting_clis: int
    enough_for_one: bool
    """Whether the memory holds the server and one CLI with headroom at all."""

    def warm_sessions(self, prewarm: int) -> int:
        """The warm cap beside a pool of ``prewarm``: the rest of the budget, at most 32."""
        return min(MAX_WARM_SESSIONS, max(0, self.clis - prewarm))


@dataclass(frozen=True)
class Box:
    """The limits this process runs under, as read at start-up."""

    machine_memory: int
    cpus: int
    memory_limit: int | None = None
    memory_source: str = "machine"
    cpu_quota: float | None = None
    cpu_usage: Path | None = None
    """The usage counter of the cgroup holding the CPU quota (v2 ``cpu.stat``, v1 ``cpuacct.usage``)."""

    @property
    def memory(self) -> int:
        """Bytes the server and its CLIs may use: the limit, or the machine's memory."""
        return min(self.memory_limit or self.machine_memory, self.machine_memory)

    @property
    def cores(self) -> float:
        """CPU the server and its CLIs may use: the quota, or the CPUs this process may run on."""
        return min(float(self.cpus), self.cpu_quota) if self.cpu_quota else float(self.cpus)

    @property
    def memory_budget(self) -> int:
        """The most an idle server should use: :data:`MEMORY_SHARE` of the memory."""
        return int(self.memory * MEMORY_SHARE)

    def fit(self) -> Fit:
        """The defaults for this box. The budget counts every live CLI at :data:`CLI_BYTES`
        beside the server and the CLI executable's cache, within :data:`MEMORY_SHARE`:

            clis = (0.8 x memory - 64 MiB - 240 MiB) // 160 MiB, at least 1

        so 1 GiB gives 3 CLIs, 2 GiB 8, 4 GiB 18. A quarter of them (at least one once
        there are two, at most 12) are pre-started, the rest may stay warm (at most 32);
        as many start at once as there are cores, within the budget.
        """
        room = self.memory_budget - SERVER_BYTES - CLI_SHARED_BYTES
        clis = max(1, room // CLI_BYTES)
        prewarm = min(MAX_PREWARM, max(clis // 4, 1 if clis > 1 else 0))
        return Fit(
            clis=clis,
            prewarm=prewarm,
            max_starting_clis=max(1, min(clis, math.ceil(self.cores))),
            enough_for_one=room >= CLI_BYTES,
        )

    def describe(self) -> str:
        """One line for the start-up log."""
        memory = (f"memory limit {self.memory / 2**30:.2f} GiB ({self.memory_source})"
                  if self.memory_limit and self.memory_limit < self.machine_memory
                  else f"no memory limit (machine: {self.machine_memory / 2**30:.1f} GiB)")
        cpu = f"CPU quota {self.cpu_quota:g} cores" if self.cpu_quota else "no CPU quota"
        return f"{memory}, {cpu}, {self.cpus} CPUs"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity; a quota is in :attr:`Box.cpu_quota`)."""
    return len(os.sched_getaffinity(0))


def read_box(root: Path = Path("/")) -> Box:
    """Read this process's limits; ``root`` is where ``/proc`` and the cgroup mounts are
    found (tests pass a fixture tree). Anything unreadable counts as "no limit"."""
    cgroups = _Cgroups.read(root)
    memory_limit, memory_source = cgroups.memory_limit()
    cpu_quota, cpu_usage = cgroups.cpu_quota()
    return Box(machine_memory=_machine_memory(root), cpus=usable_cpus(), memory_limit=memory_limit,
               memory_source=memory_source, cpu_quota=cpu_quota, cpu_usage=cpu_usage)


def _machine_memory(root: Path) -> int:
    found = re.search(r"^MemTotal:\s+(\d+) kB", _read(root / "proc/meminfo") or "", re.MULTILINE)
    return int(found.group(1)) * 1024 if found else 2**40


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _number(path: Path) -> int | None:
    """A positive integer file, or ``None`` for "max", a missing file or an odd value."""
    text = (_read(path) or "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def cgroup_of(controller: str, root: Path = Path("/")) -> Hierarchy | None:
    """This process's place in the hierarchy of a v1 ``controller`` (``""``: the v2 unified
    hierarchy), if that is mounted; the bench and the tests make their limited cgroups there."""
    return _Cgroups.read(root).hierarchy(controller)


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy: the process's own cgroup in it and the mount's top."""

    own: Path
    top: Path

    def chain(self) -> list[Path]:
        """The process's cgroup and its ancestors up to the mount: a limit anywhere applies."""
        dirs = [self.own]
        while dirs[-1] != self.top and self.top in dirs[-1].parents:
            dirs.append(dirs[-1].parent)
        return dirs


class _Cgroups:
    """The hierarchies this process belongs to: ``""`` for v2, else v1 controller names."""

    def __init__(self, hierarchies: dict[str, Hierarchy]) -> None:
        self._by_controller = hierarchies

    @classmethod
    def read(cls, root: Path) -> _Cgroups:
        own: dict[str, str] = {}
        for line in (_read(root / "proc/self/cgroup") or "").splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3:
                for controller in parts[1].split(",") if parts[1] else [""]:
                    own[controller] = parts[2]
        hierarchies: dict[str, Hierarchy] = {}
        for line in (_read(root / "proc/self/mountinfo") or "").splitlines():
            left, _, right = line.partition(" - ")
            fields, kind = left.split(), right.split()
            if len(fields) < 5 or len(kind) < 3 or kind[0] not in ("cgroup", "cgroup2"):
                continue
            mount_root, mount_point = _unescape(fields[3]), _unescape(fields[4])
            top = root / mount_point.lstrip("/")
            for controller in [""] if kind[0] == "cgroup2" else kind[2].split(","):
                path = own.get(controller)
                if path is None or controller in hierarchies:
                    continue
                try:
                    relative = PurePosixPath(path).relative_to(mount_root)
                except ValueError:  # the cgroup is not under this mount's root: the mount is ours
                    relative = PurePosixPath(".")
                hierarchies[controller] = Hierarchy(top / relative, top)
        return cls(hierarchies)

    def hierarchy(self, controller: str) -> Hierarchy | None:
        return self._by_controller.get(controller)

    def memory_limit(self) -> tuple[int | None, str]:
        """The tightest memory limit of the cgroup and its ancestors, and where it was read.
        A v1 memory hierarchy takes precedence: in a hybrid setup the unified one controls nothing."""
        for controller, name, source in (("memory", "memory.limit_in_bytes", "cgroup v1"),
                                         ("", "memory.max", "cgroup v2")):
            hierarchy = self._by_controller.get(controller)
            if hierarchy is None:
                continue
            limits = [n for d in hierarchy.chain() if (n := _number(d / name)) is not None and n < _NO_LIMIT]
            return (min(limits), source) if limits else (None, "machine")
        return None, "machine"

    def cpu_quota(self) -> tuple[float | None, Path | None]:
        """The tightest CPU quota, in cores, and the usage counter of the cgroup that sets it."""
        v1 = self._by_controller.get("cpu")
        if v1 is not None:
            quotas = [(q / p, d) for d in v1.chain()
                      if (q := _number(d / "cpu.cfs_quota_us")) and (p := _number(d / "cpu.cfs_period_us"))]
            if not quotas:
                return None, None
            cores, where = min(quotas, key=lambda quota: quota[0])
            accounting = self._by_controller.get("cpuacct")
            usage = accounting.top / where.relative_to(v1.top) / "cpuacct.usage" if accounting else None
            return cores, usage
        v2 = self._by_controller.get("")
        if v2 is None:
            return None, None
        quotas = []
        for directory in v2.chain():
            quota, _, period = (_read(directory / "cpu.max") or "").strip().partition(" ")
            if quota.isdigit() and period.isdigit() and int(quota) > 0 and int(period) > 0:
                quotas.append((int(quota) / int(period), directory))
        if not quotas:
            return None, None
        cores, where = min(quotas, key=lambda quota: quota[0])
        return cores, where / "cpu.stat"


class SpareCpu:
    """Spare CPU, in cores, between one reading and the next, so background work (refilling
    the pool) uses only that. Under a CPU quota it is the quota less the cgroup's usage;
    otherwise the machine's idle time (``/proc/stat``)."""

    def __init__(self, box: Box, proc_stat: Path = Path("/proc/stat")) -> None:
        self._box = box
        self._proc_stat = proc_stat
        self._last = self._read()

    @property
    def capacity(self) -> float:
        """Cores available in all (the quota, or the CPUs), as of the last reading."""
        return self._last[2] if self._last is not None else self._box.cores

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
            if self._box.cpu_usage is not None:
                return time.monotonic(), self._cgroup_usage(self._box.cpu_usage), self._box.cores
            return self._read_proc_stat()
        except (OSError, ValueError, StopIteration):
            return None

    @staticmethod
    def _cgroup_usage(counter: Path) -> float:
        text = counter.read_text()
        if counter.name == "cpuacct.usage":  # v1: nanoseconds
            return int(text) / 1e9
        return int(next(line.split()[1] for line in text.splitlines() if line.startswith("usage_usec "))) / 1e6

    def _read_proc_stat(self) -> tuple[float, float, float]:
        lines = self._proc_stat.read_text().splitlines()
        ticks = [int(x) for x in lines[0].split()[1:]]
        idle = ticks[3] + ticks[4]  # idle + iowait
        cpus = sum(1 for line in lines if line.startswith("cpu") and line[3].isdigit())
        per_second = os.sysconf("SC_CLK_TCK")
        return time.monotonic(), (sum(ticks[:8]) - idle) / per_second, min(float(cpus), self._box.cpu_quota or cpus)
