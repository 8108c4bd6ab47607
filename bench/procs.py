"""The processes the benchmark starts, and what their process trees cost.

Costs are read straight from ``/proc`` (no dependency): a server's cost is that
of its whole tree, because the work of a turn happens mostly in the Claude Code
CLI processes it spawns, not in the server's own Python process.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio

from bench.cgroups import MemoryCgroup
from harness.processes import Process, ProcessFailed, free_port

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
SAMPLE_SECONDS = 0.1
API_KEY = "sk-bench-local-model-anything"


class ScenarioError(RuntimeError):
    """A scenario could not be measured (server did not start, turn failed in set-up, ...)."""


class FeatureMissing(ScenarioError):
    """The server under test lacks a feature this scenario needs (e.g. ``prewarmed`` in /ready)."""


# -- /proc accounting --------------------------------------------------------

@dataclass(frozen=True)
class ProcStat:
    """One process: parent, CPU ticks of itself *and its reaped children*, resident bytes."""

    pid: int
    ppid: int
    cpu_ticks: int
    rss_bytes: int


def read_stat(pid: int) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = raw[raw.rindex(")") + 2:].split()
    # rest[k] is field k+3: ppid=4, utime..cstime=14..17, rss=24 (pages).
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    return ProcStat(pid, int(rest[1]), utime + stime + cutime + cstime, int(rest[21]) * PAGE_SIZE)


def tree(root: int) -> list[ProcStat]:
    """``root`` and all its live descendants (one scan of /proc)."""
    stats = [s for s in (read_stat(int(p)) for p in os.listdir("/proc") if p.isdigit()) if s is not None]
    by_parent: dict[int, list[ProcStat]] = {}
    for s in stats:
        by_parent.setdefault(s.ppid, []).append(s)
    found = [s for s in stats if s.pid == root]
    queue = list(found)
    while queue:
        for child in by_parent.get(queue.pop().pid, []):
            found.append(child)
            queue.append(child)
    return found


def tree_cpu_seconds(root: int) -> float:
    """CPU time of the tree. Children that exited count through their parent's cutime/cstime,
    so a CLI spawned and reaped between two readings is not lost."""
    return sum(s.cpu_ticks for s in tree(root)) / CLK_TCK


@dataclass
class Peak:
    """Peaks of a process tree over a time window, sampled every 100 ms on a thread
    (a thread, so a busy event loop driving the load cannot stretch the interval)."""

    root: int
    rss_bytes: int = 0
    processes: int = 0
    direct_children: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample(self) -> None:
        procs = tree(self.root)
        self.rss_bytes = max(self.rss_bytes, sum(p.rss_bytes for p in procs))
        self.processes = max(self.processes, len(procs))
        self.direct_children = max(self.direct_children, sum(1 for p in procs if p.ppid == self.root))
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self._sample()

    def __enter__(self) -> Peak:
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="bench-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._sample()


# -- processes ---------------------------------------------------------------

def spawn(args: list[str], env: Mapping[str, str], log_path: Path, name: str,
          cgroup: MemoryCgroup | None = None) -> Process:
    """``python args...`` in a session of its own (and in ``cgroup``, if given, before it execs)."""
    command = [sys.executable, *args]
    return Process(cgroup.command(command) if cgroup else command, log_path=log_path, name=name, cwd=ROOT, env=env)


@asynccontextmanager
async def serving(args: list[str], env: Mapping[str, str], log_path: Path, port: int, health_path: str,
                  what: str) -> AsyncIterator[str]:
    """``python args...`` listening on ``port``: its base URL once ``health_path`` answers; stopped at exit."""
    process = spawn(args, env, log_path, what)
    try:
        base = f"http://127.0.0.1:{port}"
        await process.await_http(f"{base}{health_path}", 30)
        yield base
    finally:
        process.stop()


@asynccontextmanager
async def redis_server(tmp: Path) -> AsyncIterator[str]:
    """A redis-server of the scenario's own, without persistence: its ``redis://`` URL (db 0).
    Debian's package (``scripts/install-store-servers.sh``); missing, the part says so."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FeatureMissing("redis-server not found (scripts/install-store-servers.sh installs it)")
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = Process([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                       "--dir", str(tmp)], log_path=tmp / "redis.log", name="redis-server")
    try:
        await process.await_until(lambda: _answers_ping(port), 30)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        await asyncio.to_thread(process.stop, signal.SIGTERM, 10)


async def _answers_ping(port: int) -> bool:
    client = redis.asyncio.Redis(port=port, socket_connect_timeout=1)
    try:
        return bool(await client.ping())
    except redis.RedisError:
        return False
    finally:
        await client.aclose()


@asynccontextmanager
async def local_model(tmp: Path) -> AsyncIterator[str]:
    """The offline local model as a subprocess (its CPU is not counted as hosting cost)."""
    port = free_port()
    async with serving(["-m", "hosting.local_model", "--port", str(port)], os.environ, tmp / "local-model.log", port,
                       "/local/requests", "local model") as base:
        yield base


def clean_env() -> dict[str, str]:
    """Our environment minus anything that would configure the agent behind our back."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "ANTHROPIC_", "CLAUDE_"))}


@dataclass
class Server:
    """A running ``python -m hosting.server`` and the knobs it was started with."""

    name: str
    base_url: str
    process: Process
    warm_sessions: int
    prewarm: int
    env_knobs: dict[str, str]

    @property
    def pid(self) -> int:
        return self.process.pid

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "env": self.env_knobs, "warm_sessions": self.warm_sessions, "prewarm": self.prewarm}

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
        """Label a part's result with this server's knobs, and keep its log's end if turns failed."""
        result = {"server": self.describe(), **result}
        if result.get("errors"):
            result["server_log_tail"] = self.process.log_tail(60)
        return result


def effective_knobs(env: Mapping[str, str]) -> tuple[int, int]:
    """``(warm_sessions, prewarm)`` as the server will read them: from its own Settings,
    so "default config" is recorded as the numbers actually in force."""
    from hosting.server.settings import Settings

    settings = Settings.from_env(env)
    return settings.warm_sessions, getattr(settings, "prewarm", 0)


@asynccontextmanager
async def server(model_url: str, tmp: Path, name: str, knobs: Mapping[str, str],
                 cgroup: MemoryCgroup | None = None) -> AsyncIterator[Server]:
    """A fresh server on a fresh data dir (inside ``cgroup`` if given); always killed (with
    its CLIs) and its dir removed. The warm cap and pool it reports are those in force
    (sized from its own box), else those its settings would pick here."""
    root = tmp / name
    root.mkdir(parents=True)
    port = free_port()
    env = clean_env() | {
        "ANTHROPIC_BASE_URL": model_url,
        "ANTHROPIC_API_KEY": API_KEY,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "AGENT_DATA_DIR": str(root / "data"),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        **knobs,
    }
    warm, prewarm = effective_knobs(env)
    process = spawn(["-m", "hosting.server"], env, root / "server.log", f"server {name}", cgroup)
    try:
        srv = Server(name, f"http://127.0.0.1:{port}", process, warm, prewarm, dict(knobs))
        await process.await_http(f"{srv.base_url}/health", 60)
        async with httpx.AsyncClient(timeout=10) as client:
            status = (await client.get(f"{srv.base_url}/ready")).json()
        srv.warm_sessions = status.get("warm_sessions_cap", warm)
        srv.prewarm = status.get("prewarm_target", prewarm)
        yield srv
    except (ScenarioError, ProcessFailed, httpx.HTTPError) as exc:
        # The server's log is about to be deleted with its directory: keep its end with the error.
        kind = type(exc) if isinstance(exc, ScenarioError) else ScenarioError
        what = str(exc) if isinstance(exc, (ScenarioError, ProcessFailed)) else f"{type(exc).__name__}: {exc}"
        raise kind(f"{what}\n--- end of server {name} log ---\n{process.log_tail()}") from exc
    finally:
        process.stop()
        shutil.rmtree(root, ignore_errors=True)


async def settle(client: httpx.AsyncClient, srv: Server, *, need_prewarm: bool, timeout: float) -> dict[str, Any]:
    """Wait until no turn runs and the prewarm pool is full, so a measurement starts from
    steady state instead of racing the server's own background CLI start-ups.

    Then wait (within the same bound) until the server's process tree is quiet, so
    work left over from the previous turn or a just-started CLI is not billed to the
    next measurement.

    If /ready has no ``prewarmed`` field the server predates prewarming: a scenario
    that needs it fails with :class:`FeatureMissing`; others just skip the wait.
    """
    deadline = time.monotonic() + timeout
    body = await _ready_and_full(client, srv, need_prewarm, deadline, timeout)
    while time.monotonic() < deadline:
        before = tree_cpu_seconds(srv.pid)
        await asyncio.sleep(QUIET_WINDOW_SECONDS)
        if tree_cpu_seconds(srv.pid) - before <= QUIET_CPU_FRACTION * QUIET_WINDOW_SECONDS:
            break
    return body


QUIET_WINDOW_SECONDS = 0.5
QUIET_CPU_FRACTION = 0.05
"""The tree counts as quiet when it used at most this share of one core over the window."""


async def _ready_and_full(client: httpx.AsyncClient, srv: Server, need_prewarm: bool, deadline: float,
                          timeout: float) -> dict[str, Any]:
    body: dict[str, Any] = {}
    while True:
        response = await client.get(f"{srv.base_url}/ready")
        if response.status_code == 200:
            body = response.json()
            if "prewarmed" not in body:
                if need_prewarm:
                    raise FeatureMissing(f"server {srv.name}: GET /ready has no 'prewarmed' field "
                                         f"(AGENT_PREWARM not supported by this server); /ready = {body}")
                if body.get("running_turns", 0) == 0:
                    return body
            elif body["prewarmed"] >= srv.prewarm and body.get("running_turns", 0) == 0:
                return body
        if srv.process.poll() is not None:
            raise ScenarioError(f"server {srv.name} exited:\n{srv.process.log_tail()}")
        if time.monotonic() > deadline:
            raise ScenarioError(f"server {srv.name}: not settled after {timeout:.0f} s "
                                f"(want prewarmed={srv.prewarm}, running_turns=0); last /ready = {body}")
        await asyncio.sleep(0.1)
