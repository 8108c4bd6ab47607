"""(g) What the gateway adds: relay overhead, warm-pool first turns, bursts of new sessions.

Each part starts its own gateway (``python -m hosting.gateway``, own data dir and
installation) on the local backend unless it says otherwise, in one sandbox scope
(``GATEWAY_SANDBOX_SCOPE``: ``session`` or ``tenant``); on the local backend sandboxes
are the gateway's descendants, so its process tree is the whole deployment. Before each
timed phase the warm pool is full and the tree is quiet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from bench.drive import RECALL, TurnResult, http_turn, percentile, recalled, remember_prompt, summarize
from bench.procs import (
    API_KEY,
    CLK_TCK,
    QUIET_CPU_FRACTION,
    QUIET_WINDOW_SECONDS,
    Peak,
    ScenarioError,
    clean_env,
    read_stat,
    redis_server,
    serving,
    spawn,
    tree,
    tree_cpu_seconds,
)
from harness.processes import Process, ProcessFailed, descendants, free_port
from hosting.contract import NAMESPACE_HEADER
from hosting.gateway.pool_demand import PoolSizing

if TYPE_CHECKING:
    from bench.scenarios import Bench

TENANT_TOKEN = "bench-tenant-token"
TURN_GAP_SECONDS = 0.025
"""Between follow-ups of the relay comparison: the last turn's tail (the sandbox's and the
relays' work after ``done``) is over before the next is timed, whichever path came before."""
ADMIN_TOKEN = "bench-admin-token"
DEFAULT_POOL_MAX = PoolSizing().ceiling


@dataclass
class Gateway:
    base_url: str
    process: Process
    pool_target: int
    backend: str
    installation: str

    @property
    def pid(self) -> int:
        return self.process.pid


def client(token: str = TENANT_TOKEN, connections: int = 200) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=10.0), limits=limits,
                             headers={"authorization": f"Bearer {token}"})


@asynccontextmanager
async def gateway(model_url: str, tmp: Path, name: str, pool: int, backend: str = "local",
                  image: str | None = None, scope: str = "session", pool_max: int | None = None,
                  extra_env: Mapping[str, str] | None = None) -> AsyncIterator[Gateway]:
    """A gateway of its own; its warm pool holds ``pool`` (fixed, unless ``pool_max`` lets it
    follow demand up to that)."""
    root = tmp / name
    root.mkdir(parents=True)
    port = free_port()
    installation = f"b{secrets.token_hex(4)}"
    env = clean_env() | {
        "ANTHROPIC_BASE_URL": model_url, "ANTHROPIC_API_KEY": API_KEY, "HOST": "127.0.0.1", "PORT": str(port),
        "GATEWAY_TENANTS": f"{TENANT_TOKEN}:bench", "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
        # A pool of a fixed size unless the part measures it growing with its claims.
        "GATEWAY_WARM_POOL": str(pool), "GATEWAY_WARM_POOL_MAX": str(pool if pool_max is None else pool_max),
        "GATEWAY_SANDBOX_SCOPE": scope,
        "GATEWAY_DATA_DIR": str(root / "data"), "GATEWAY_BACKEND": backend,
        "GATEWAY_INSTALLATION": installation,
        # The bench measures hosting, not the tenant quotas: lift them.
        "GATEWAY_TENANT_MAX_SANDBOXES": "0", "GATEWAY_TENANT_MAX_TURNS": "0", "GATEWAY_TENANT_TURNS_PER_MINUTE": "0",
    }
    if backend == "docker":
        assert image is not None
        env |= {"GATEWAY_DOCKER_IMAGE": image, "GATEWAY_DOCKER_NETWORK": "host"}
    env |= dict(extra_env or {})
    process = spawn(["-m", "hosting.gateway"], env, root / "gateway.log", f"gateway {name}")
    try:
        gw = Gateway(f"http://127.0.0.1:{port}", process, pool, backend, installation)
        await process.await_http(f"{gw.base_url}/health", 60)
        yield gw
    except (ScenarioError, ProcessFailed, httpx.HTTPError) as exc:
        raise ScenarioError(f"{exc}\n--- end of gateway {name} log ---\n{process.log_tail()}") from exc
    finally:
        # SIGTERM and up to 60 s to exit by itself, then its whole tree.
        await asyncio.to_thread(process.stop, signal.SIGTERM, 60)
        if backend == "docker":
            await _remove_docker_installation(image or "", installation)
        shutil.rmtree(root, ignore_errors=True)


async def _remove_docker_installation(image: str, installation: str) -> None:
    from hosting.sandboxes.docker import DockerBackend

    backend = DockerBackend(image=image, installation=installation, network="host", memory_bytes=None, nano_cpus=None)
    try:
        await backend.remove_installation()
    finally:
        await backend.aclose()


async def settle(admin: httpx.AsyncClient, gw: Gateway, timeout: float) -> None:
    """Wait for a full pool, then for a quiet process tree (the sandboxes are in it)."""
    deadline = time.monotonic() + timeout
    while True:
        pool = (await admin.get(f"{gw.base_url}/admin/pool")).json()
        if len(pool["sandboxes"]) >= gw.pool_target:
            break
        if gw.process.poll() is not None or time.monotonic() > deadline:
            raise ScenarioError(f"gateway pool not full ({pool}):\n{gw.process.log_tail()}")
        await asyncio.sleep(0.1)
    while time.monotonic() < deadline:
        before = tree_cpu_seconds(gw.pid)
        await asyncio.sleep(QUIET_WINDOW_SECONDS)
        if tree_cpu_seconds(gw.pid) - before <= QUIET_CPU_FRACTION * QUIET_WINDOW_SECONDS:
            return


def _sandbox_token(pid: int) -> str:
    """The sandbox's own bearer token, from its environment (the bench runs as the same user)."""
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if item.startswith(b"AGENT_AUTH_TOKEN="):
            return item.split(b"=", 1)[1].decode()
    raise ScenarioError(f"no AGENT_AUTH_TOKEN in the environment of pid {pid}")


def _own_cpu_seconds(pid: int) -> float:
    """User and system CPU of the process alone (not its children: the sandbox's server and CLIs)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    utime, stime = (int(x) for x in stat[stat.rindex(")") + 2:].split()[11:13])
    return (utime + stime) / CLK_TCK


@asynccontextmanager
async def bare_relay(bench: Bench, sandbox: str, token: str, namespace: str) -> AsyncIterator[str]:
    """:mod:`bench.bare_relay` in front of ``sandbox``: its base URL."""
    port = free_port()
    env = clean_env() | {"PORT": str(port), "BARE_RELAY_SANDBOX": sandbox, "BARE_RELAY_SANDBOX_TOKEN": token,
                         "BARE_RELAY_NAMESPACE": namespace}
    async with serving(["-m", "bench.bare_relay"], env, bench.tmp / "bare-relay.log", port, "/health",
                       "bare relay") as base_url:
        yield base_url


async def relay_overhead(bench: Bench, scope: str = "session") -> dict[str, Any]:
    """Follow-ups on one session through the gateway, straight to its sandbox and through a
    bare relay (:mod:`bench.bare_relay`), in turn (so a drift in the machine's speed reaches
    all alike). Beside the p50s: the median of the gateway/straight pairs' differences,
    and the gateway process's own CPU per relayed turn."""
    counts = bench.counts
    async with (gateway(bench.model_url, bench.tmp, f"g-relay-{scope}", pool=1, scope=scope) as gw, client() as via,
                client(ADMIN_TOKEN) as admin):
        await settle(admin, gw, counts.prewarm_timeout)
        value, prompt = remember_prompt()
        first = await http_turn(via, gw.base_url, "relay", prompt)
        if first.error:
            raise ScenarioError(f"first turn failed: {first.error}")
        route = (await admin.get(f"{gw.base_url}/admin/sessions/relay")).json()
        token = _sandbox_token(route["pid"])
        # The sandbox serves one tenant's session ids, named as the gateway names them.
        namespace = f"{gw.installation}/{route['tenant']}"
        async with (client(token) as direct, bare_relay(bench, route["address"], token, namespace) as bare_url,
                    client() as bare):
            direct.headers[NAMESPACE_HEADER] = namespace
            paths = {"gateway": (via, gw.base_url), "direct": (direct, route["address"]), "bare": (bare, bare_url)}
            turns: dict[str, list[TurnResult]] = {name: [] for name in paths}
            for http, base_url in paths.values():  # every path warm before timing
                await http_turn(http, base_url, "relay", RECALL)
            await settle(admin, gw, counts.prewarm_timeout)
            cpu_before = _own_cpu_seconds(gw.pid)  # over every path's turns: what the gateway does after done counts
            for _ in range(counts.gw_follow_ups):
                for name, (http, base_url) in paths.items():
                    turns[name].append(await http_turn(http, base_url, "relay", RECALL))
                    await asyncio.sleep(TURN_GAP_SECONDS)
            gateway_cpu = _own_cpu_seconds(gw.pid) - cpu_before
        paired = [g.latency - d.latency for g, d in zip(turns["gateway"], turns["direct"], strict=True)
                  if g.error is None and d.error is None]
        return {"scope": scope,
                **{name: summarize(done, recall_expected=len(done), recall_ok=sum(recalled(t, value) for t in done))
                   for name, done in turns.items()},
                "paired_median_added_s": percentile(paired, 50),
                "gateway_cpu_s_per_turn": gateway_cpu / len(turns["gateway"])}


async def first_turns(bench: Bench, pool: int, backend: str = "local", image: str | None = None,
                      scope: str = "session") -> dict[str, Any]:
    """First turns of new sessions, one at a time, each from steady state (pool refilled)."""
    name, counts = f"g-first-{backend}-{scope}-pool{pool}", bench.counts
    async with (gateway(bench.model_url, bench.tmp, name, pool, backend, image, scope) as gw, client() as via,
                client(ADMIN_TOKEN) as admin):
        turns = []
        for i in range(counts.gw_first_turns):
            await settle(admin, gw, counts.prewarm_timeout)
            value, prompt = remember_prompt()
            turn = await http_turn(via, gw.base_url, f"first-{i}", prompt)
            turns.append(turn)
        return {"backend": backend, "scope": scope, "pool": pool, **summarize(turns)}


async def _sessions_at_once(via: httpx.AsyncClient, gw: Gateway, prefix: str, sessions: int,
                            turns_each: int) -> tuple[list[TurnResult], list[TurnResult], int, float]:
    """``sessions`` new sessions at once, each "Remember" then (with two turns) the recall:
    every turn, the first turns, the recalls that held, and the wall time."""

    async def session(i: int) -> tuple[list[TurnResult], bool]:
        value, prompt = remember_prompt()
        done = [await http_turn(via, gw.base_url, f"{prefix}-{i}", prompt)]
        if turns_each == 2:
            done.append(await http_turn(via, gw.base_url, f"{prefix}-{i}", RECALL))
            return done, recalled(done[1], value)
        return done, False

    started = time.perf_counter()
    done = await asyncio.gather(*(session(i) for i in range(sessions)))
    wall = time.perf_counter() - started
    return [t for turns, _ in done for t in turns], [turns[0] for turns, _ in done], sum(ok for _, ok in done), wall


def _sandbox_memory(gw: Gateway) -> tuple[int, int]:
    """Resident bytes of every sandbox's process tree summed (the gateway itself left out),
    and how many sandboxes there are: the local backend's are the gateway's children, a
    docker one's processes are found through the engine (same host, so /proc has them)."""
    if gw.backend == "local":
        procs = [p for p in tree(gw.pid) if p.pid != gw.pid]
        return sum(p.rss_bytes for p in procs), sum(1 for p in procs if p.ppid == gw.pid)
    import docker

    from hosting.sandboxes.docker import INSTALLATION_LABEL

    engine = docker.from_env()
    try:
        containers = engine.containers.list(filters={"label": f"{INSTALLATION_LABEL}={gw.installation}"})
        pids = [int(row[0]) for c in containers for row in c.top(ps_args="-o pid")["Processes"]]
    finally:
        engine.close()
    stats = [s for s in (read_stat(pid) for pid in pids) if s is not None]
    return sum(s.rss_bytes for s in stats), len(containers)


async def burst(bench: Bench, scope: str = "session", backend: str = "local", image: str | None = None) -> dict[str, Any]:
    """``gw_burst`` new sessions at once, each "Remember" then the recall, through one gateway
    (warm pool of two); then, with the tree quiet again, the memory of all its sandboxes per
    live session."""
    counts = bench.counts
    async with (gateway(bench.model_url, bench.tmp, f"g-burst-{backend}-{scope}", 2, backend, image, scope) as gw,
                client() as via, client(ADMIN_TOKEN) as admin):
        await settle(admin, gw, counts.prewarm_timeout)
        with Peak(gw.pid) as peak:
            turns, firsts, recalls, wall = await _sessions_at_once(via, gw, "burst", counts.gw_burst, 2)
        await settle(admin, gw, counts.prewarm_timeout)
        memory, sandboxes = _sandbox_memory(gw)
        first = summarize(firsts)
        return {"backend": backend, "scope": scope,
                **summarize(turns, wall, recall_expected=counts.gw_burst, recall_ok=recalls),
                "first_turn_p50_s": first["p50_s"], "first_turn_p95_s": first["p95_s"],
                "sandboxes": sandboxes, "sandbox_rss_bytes": memory,
                "rss_bytes_per_session": memory / counts.gw_burst,
                "peak_rss_bytes": peak.rss_bytes if backend == "local" else None,
                "peak_processes": peak.processes if backend == "local" else None}


async def two_bursts(bench: Bench) -> dict[str, Any]:
    """Session scope, a pool that follows demand (floor 2, ``GATEWAY_WARM_POOL_MAX``'s
    default): ``gw_wave`` new sessions at once, the same again ``gw_wave_gap`` seconds after
    the first began, first turns only; then how long until, with no claims, the pool is
    back at its floor (the target falls as claims leave the pool's window)."""
    counts = bench.counts
    async with (gateway(bench.model_url, bench.tmp, "g-waves", 2, pool_max=DEFAULT_POOL_MAX) as gw, client() as via,
                client(ADMIN_TOKEN) as admin):
        await settle(admin, gw, counts.prewarm_timeout)
        started = time.perf_counter()
        _, first, _, first_wall = await _sessions_at_once(via, gw, "wave1", counts.gw_wave, 1)
        pool_between = (await admin.get(f"{gw.base_url}/admin/pool")).json()
        await asyncio.sleep(max(0.0, counts.gw_wave_gap - (time.perf_counter() - started)))
        pool_before = (await admin.get(f"{gw.base_url}/admin/pool")).json()
        _, second, _, second_wall = await _sessions_at_once(via, gw, "wave2", counts.gw_wave, 1)
        last_claim = time.perf_counter()
        deadline = last_claim + counts.gw_floor_timeout
        while True:
            pool = (await admin.get(f"{gw.base_url}/admin/pool")).json()
            if pool["target"] == pool["floor"] and pool["ready"] == pool["floor"] and not pool["starting_here"]:
                break
            if time.perf_counter() > deadline:
                raise ScenarioError(f"the pool is not back at its floor {counts.gw_floor_timeout:.0f} s after "
                                    f"the last claim: {pool}")
            await asyncio.sleep(1)
        return {"sessions_per_burst": counts.gw_wave, "gap_s": counts.gw_wave_gap,
                "first": summarize(first, first_wall), "second": summarize(second, second_wall),
                "pool_after_first": {k: pool_between[k] for k in ("target", "reason", "ready")},
                "pool_before_second": {k: pool_before[k] for k in ("target", "reason", "ready")},
                "back_to_floor_s": time.perf_counter() - last_claim}


async def frozen_sandbox(bench: Bench) -> dict[str, Any]:
    """A session's sandbox stopped mid-turn (SIGSTOP, its server and CLIs), as a frozen VM
    or a hung node would be; then the session's next turn, through a gateway with its routes
    and the session store in Redis (local backend, no pool, so the replacement starts a
    sandbox): how long until that turn's first event and its end, and whether it recalls.
    Repeated ``gw_frozen`` times, each on a new session."""
    counts = bench.counts
    async with (redis_server(bench.tmp / "frozen-redis") as redis_url,
                gateway(bench.model_url, bench.tmp, "g-frozen", 0, extra_env={
                    "AGENT_SESSION_STORE": redis_url, "GATEWAY_REDIS_URL": redis_url.replace("/0", "/1")}) as gw,
                client() as via, client(ADMIN_TOKEN) as admin):
        turns: list[TurnResult] = []
        recalls = 0
        for i in range(counts.gw_frozen):
            session = f"frozen-{i}"
            value, prompt = remember_prompt()
            if (await http_turn(via, gw.base_url, session, prompt)).error:
                raise ScenarioError(f"the first turn of {session} failed")
            route = (await admin.get(f"{gw.base_url}/admin/sessions/{session}")).json()
            stuck = asyncio.create_task(http_turn(via, gw.base_url, session, "Tell me a long story [[slow:0.5]]"))
            await asyncio.sleep(1.0)  # mid-turn
            frozen = [route["pid"], *descendants(route["pid"])]
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            try:
                turn = await http_turn(via, gw.base_url, session, RECALL)
            finally:
                for pid in frozen:  # a killed one is gone: nothing to resume
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
            await stuck
            turns.append(turn)
            recalls += recalled(turn, value)
        return summarize(turns, recall_expected=counts.gw_frozen, recall_ok=recalls)
