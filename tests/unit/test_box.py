"""Reading the box (cgroup v1 and v2 limits) from fixture trees, what fits in it, and
the settings and the spare-CPU meter built on it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hosting.server.box import MEMORY_SHARE, Box, SpareCpu, read_box
from hosting.server.settings import Settings

GiB = 2**30
MACHINE_KIB = 24 * 2**20  # a 24 GiB machine in /proc/meminfo
V1_UNLIMITED = "9223372036854771712"


def v1_mount(point: str, controllers: str, root: str = "/") -> str:
    return f"35 31 0:32 {root} {point} rw,nosuid,relatime shared:9 - cgroup cgroup rw,{controllers}"


def v2_mount(point: str = "/sys/fs/cgroup", root: str = "/") -> str:
    return f"30 23 0:26 {root} {point} rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate"


def make_tree(tmp_path: Path, cgroup: str, mounts: list[str], files: dict[str, str]) -> Path:
    """A fake root: /proc/self/{cgroup,mountinfo}, /proc/meminfo and cgroup files."""
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    (tmp_path / "proc/self/mountinfo").write_text(
        "\n".join(["23 1 0:21 / / rw,relatime - overlay overlay rw", *mounts]) + "\n")
    (tmp_path / "proc/meminfo").write_text(f"MemTotal:       {MACHINE_KIB} kB\nMemFree:        1 kB\n")
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    return tmp_path


V1_HOST_MOUNTS = [v1_mount("/sys/fs/cgroup/memory", "memory"), v1_mount("/sys/fs/cgroup/cpu", "cpu"),
                  v1_mount("/sys/fs/cgroup/cpuacct", "cpuacct"), v2_mount("/sys/fs/cgroup/unified")]
V1_HOST_CGROUP = "4:memory:/jobs/a\n2:cpuacct:/jobs/a\n1:cpu:/jobs/a\n0::/\n"


def test_v1_nested_cgroup_on_a_host(tmp_path):
    """A v1 host (hybrid: the unified hierarchy controls nothing), the process in a nested cgroup."""
    root = make_tree(tmp_path, V1_HOST_CGROUP, V1_HOST_MOUNTS, {
        "sys/fs/cgroup/memory/memory.limit_in_bytes": V1_UNLIMITED,
        "sys/fs/cgroup/memory/jobs/a/memory.limit_in_bytes": str(GiB),
        "sys/fs/cgroup/cpu/jobs/a/cpu.cfs_quota_us": "150000",
        "sys/fs/cgroup/cpu/jobs/a/cpu.cfs_period_us": "100000",
        "sys/fs/cgroup/unified/cgroup.controllers": "",
    })
    box = read_box(root)
    assert (box.memory_limit, box.memory_source, box.memory) == (GiB, "cgroup v1", GiB)
    assert box.cpu_quota == 1.5 and box.cpu_usage == root / "sys/fs/cgroup/cpuacct/jobs/a/cpuacct.usage"
    assert box.machine_memory == MACHINE_KIB * 1024 and box.cpus == len(os.sched_getaffinity(0))


def test_v1_limit_set_on_an_ancestor_applies(tmp_path):
    root = make_tree(tmp_path, V1_HOST_CGROUP, V1_HOST_MOUNTS, {
        "sys/fs/cgroup/memory/jobs/memory.limit_in_bytes": str(2 * GiB),
        "sys/fs/cgroup/memory/jobs/a/memory.limit_in_bytes": V1_UNLIMITED,
        "sys/fs/cgroup/cpu/jobs/cpu.cfs_quota_us": "50000",
        "sys/fs/cgroup/cpu/jobs/cpu.cfs_period_us": "100000",
        "sys/fs/cgroup/cpu/jobs/a/cpu.cfs_quota_us": "-1",
        "sys/fs/cgroup/cpu/jobs/a/cpu.cfs_period_us": "100000",
    })
    box = read_box(root)
    assert box.memory_limit == 2 * GiB
    assert box.cpu_quota == 0.5 and box.cpu_usage == root / "sys/fs/cgroup/cpuacct/jobs/cpuacct.usage"


def test_v1_container_whose_mount_root_is_its_own_cgroup(tmp_path):
    """Docker on v1 without a cgroup namespace: /proc/self/cgroup names the host path, and
    the mount's root is that same path, so the mount point itself is the container's cgroup."""
    root = make_tree(tmp_path, "9:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n", [
        v1_mount("/sys/fs/cgroup/memory", "memory", root="/docker/abc"),
        v1_mount("/sys/fs/cgroup/cpu,cpuacct", "cpu,cpuacct", root="/docker/abc"),
    ], {
        "sys/fs/cgroup/memory/memory.limit_in_bytes": str(GiB),
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "200000",
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000",
    })
    box = read_box(root)
    assert box.memory_limit == GiB and box.cpu_quota == 2.0
    assert box.cpu_usage == root / "sys/fs/cgroup/cpu,cpuacct/cpuacct.usage"


def test_v2_container(tmp_path):
    root = make_tree(tmp_path, "0::/\n", [v2_mount()], {
        "sys/fs/cgroup/cgroup.controllers": "cpuset cpu io memory pids",
        "sys/fs/cgroup/memory.max": str(4 * GiB),
        "sys/fs/cgroup/cpu.max": "250000 100000",
    })
    box = read_box(root)
    assert (box.memory_limit, box.memory_source) == (4 * GiB, "cgroup v2")
    assert box.cpu_quota == 2.5 and box.cpu_usage == root / "sys/fs/cgroup/cpu.stat"


def test_v2_nested_cgroup_takes_the_tightest_of_its_ancestors(tmp_path):
    root = make_tree(tmp_path, "0::/user.slice/job.scope\n", [v2_mount()], {
        "sys/fs/cgroup/user.slice/memory.max": str(3 * GiB),
        "sys/fs/cgroup/user.slice/job.scope/memory.max": "max",
        "sys/fs/cgroup/user.slice/cpu.max": "max 100000",
        "sys/fs/cgroup/user.slice/job.scope/cpu.max": "100000 100000",
    })
    box = read_box(root)
    assert box.memory_limit == 3 * GiB
    assert box.cpu_quota == 1.0 and box.cpu_usage == root / "sys/fs/cgroup/user.slice/job.scope/cpu.stat"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_no_limit_means_the_machine(tmp_path, version):
    if version == "v1":
        root = make_tree(tmp_path, V1_HOST_CGROUP, V1_HOST_MOUNTS, {
            "sys/fs/cgroup/memory/jobs/a/memory.limit_in_bytes": V1_UNLIMITED,
            "sys/fs/cgroup/cpu/jobs/a/cpu.cfs_quota_us": "-1",
            "sys/fs/cgroup/cpu/jobs/a/cpu.cfs_period_us": "100000",
        })
    else:
        root = make_tree(tmp_path, "0::/\n", [v2_mount()], {
            "sys/fs/cgroup/memory.max": "max\n", "sys/fs/cgroup/cpu.max": "max 100000\n"})
    box = read_box(root)
    assert (box.memory_limit, box.memory_source, box.cpu_quota, box.cpu_usage) == (None, "machine", None, None)
    assert box.memory == MACHINE_KIB * 1024 and box.cores == box.cpus


@pytest.mark.parametrize("memory, cpu", [
    ("", ""), ("garbage", "garbage"), ("-1", "-5 100000"), ("0", "0 100000"),
    ("1.5e9", "100000 0"), ("1073741824 extra", "100000"),
])
def test_odd_values_count_as_no_limit(tmp_path, memory, cpu):
    root = make_tree(tmp_path, "0::/\n", [v2_mount()], {"sys/fs/cgroup/memory.max": memory,
                                                       "sys/fs/cgroup/cpu.max": cpu})
    box = read_box(root)
    assert box.memory_limit is None and box.cpu_quota is None


def test_nothing_readable_means_the_machine(tmp_path):
    box = read_box(tmp_path)  # no /proc at all
    assert box.memory_limit is None and box.cpu_quota is None and box.memory == box.machine_memory > 0


def test_escaped_mount_points_and_a_limit_above_the_machine(tmp_path):
    root = make_tree(tmp_path, "0::/a\n", [v2_mount(r"/sys/fs/my\040cgroup")], {
        "sys/fs/my cgroup/a/memory.max": str(64 * GiB)})
    box = read_box(root)
    assert box.memory_limit == 64 * GiB and box.memory == MACHINE_KIB * 1024


def test_this_process_can_be_read():
    box = read_box()
    assert box.memory > 0 and box.cores > 0


# -- what fits ---------------------------------------------------------------

def limited(memory: float, cpus: int = 2, quota: float | None = None) -> Box:
    return Box(machine_memory=24 * GiB, cpus=cpus, memory_limit=int(memory * GiB), cpu_quota=quota)


@pytest.mark.parametrize("gib, clis, prewarm, warm", [
    (1, 3, 1, 2), (2, 8, 2, 6), (4, 18, 4, 14), (24, 120, 12, 32), (0.6, 1, 0, 1),
])
def test_what_fits(gib, clis, prewarm, warm):
    fit = limited(gib).fit()
    assert (fit.clis, fit.prewarm, fit.warm_sessions(fit.prewarm)) == (clis, prewarm, warm)
    assert fit.enough_for_one


def test_too_little_memory_still_serves_one_cli_at_a_time():
    fit = limited(0.5).fit()
    assert (fit.clis, fit.prewarm, fit.warm_sessions(0), fit.max_starting_clis, fit.enough_for_one) == (1, 0, 1, 1, False)


@pytest.mark.parametrize("cpus, quota, starting", [(2, None, 2), (4, 1.5, 2), (4, 0.5, 1), (8, None, 3)])
def test_starts_at_once_follow_the_cores_within_the_budget(cpus, quota, starting):
    assert limited(1, cpus, quota).fit().max_starting_clis == starting


def test_the_memory_budget_is_a_share_of_the_limit():
    assert limited(1).memory_budget == int(GiB * MEMORY_SHARE)


# -- settings sized from the box ---------------------------------------------

def test_settings_are_sized_from_the_box():
    settings = Settings.from_env({}, box=limited(1))
    assert (settings.warm_sessions, settings.prewarm, settings.max_starting_clis, settings.cli_budget) == (2, 1, 2, 3)
    assert settings.fit_warning() is None
    no_pool = Settings.from_env({"AGENT_PREWARM": "0"}, box=limited(1))
    assert (no_pool.warm_sessions, no_pool.prewarm, no_pool.cli_budget) == (3, 0, 3)


def test_explicit_settings_win_with_one_warning_when_they_cannot_fit():
    settings = Settings.from_env({"AGENT_PREWARM": "12", "AGENT_WARM_SESSIONS": "32",
                                  "AGENT_MAX_STARTING_CLIS": "4"}, box=limited(1))
    assert (settings.warm_sessions, settings.prewarm, settings.max_starting_clis) == (32, 12, 4)
    assert settings.cli_budget == 44
    warning = settings.fit_warning()
    assert warning is not None and "AGENT_PREWARM=12" in warning and "fits 3" in warning


def test_a_box_too_small_for_one_cli_is_warned_about():
    warning = Settings.from_env({}, box=limited(0.5)).fit_warning()
    assert warning is not None and "one CLI" in warning


# -- spare CPU ---------------------------------------------------------------

def _proc_stat(path: Path, busy: int, idle: int, cpus: int = 2) -> None:
    lines = [f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0"] + [f"cpu{i} 0 0 0 0 0 0 0 0 0 0" for i in range(cpus)]
    path.write_text("\n".join(lines) + "\n")


def _clock(monkeypatch: pytest.MonkeyPatch, *ticks: float) -> None:
    clock = iter(ticks)
    monkeypatch.setattr("hosting.server.box.time.monotonic", lambda: next(clock))


def test_spare_cpu_from_proc_stat(tmp_path, monkeypatch):
    _clock(monkeypatch, 100.0, 101.0, 102.0)
    stat = tmp_path / "stat"
    ticks = os.sysconf("SC_CLK_TCK")
    _proc_stat(stat, busy=0, idle=0)
    meter = SpareCpu(Box(machine_memory=GiB, cpus=2), proc_stat=stat)
    _proc_stat(stat, busy=int(1.5 * ticks), idle=int(0.5 * ticks))  # 1.5 of 2 cores busy for 1 s
    assert meter.cores() == pytest.approx(0.5) and meter.capacity == 2
    _proc_stat(stat, busy=int(1.5 * ticks), idle=int(2.5 * ticks))  # then idle
    assert meter.cores() == pytest.approx(2.0)


def test_spare_cpu_under_a_v2_quota(tmp_path, monkeypatch):
    _clock(monkeypatch, 10.0, 12.0)
    usage = tmp_path / "cpu.stat"
    usage.write_text("usage_usec 0\nuser_usec 0\n")
    meter = SpareCpu(Box(machine_memory=GiB, cpus=4, cpu_quota=1.5, cpu_usage=usage), proc_stat=tmp_path / "no")
    usage.write_text("usage_usec 2000000\nuser_usec 0\n")  # 2 CPU-s over 2 s
    assert meter.cores() == pytest.approx(0.5) and meter.capacity == 1.5


def test_spare_cpu_under_a_v1_quota(tmp_path, monkeypatch):
    _clock(monkeypatch, 10.0, 11.0)
    usage = tmp_path / "cpuacct.usage"
    usage.write_text("0\n")
    meter = SpareCpu(Box(machine_memory=GiB, cpus=4, cpu_quota=2.0, cpu_usage=usage), proc_stat=tmp_path / "no")
    usage.write_text(f"{int(0.5e9)}\n")  # 0.5 CPU-s over 1 s
    assert meter.cores() == pytest.approx(1.5)


def test_spare_cpu_unknown_when_nothing_is_readable(tmp_path):
    box = Box(machine_memory=GiB, cpus=2, cpu_quota=1.0, cpu_usage=tmp_path / "missing")
    assert SpareCpu(box, proc_stat=tmp_path / "missing").cores() is None
    assert SpareCpu(Box(machine_memory=GiB, cpus=2), proc_stat=tmp_path / "missing").cores() is None
