"""(g) What the gateway adds: relay overhead, warm-pool first turns, a burst of new sessions.

Each part starts its own gateway (``python -m hosting.gateway``, own data dir and
installation) on the local backend unless it says otherwise; sandboxes are the
gateway's descendants, so its process tree is the whole deployment. Before each
timed phase the warm pool is full and the tree is quiet.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import signal
import time
from collections.abc import AsyncIterator
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
    serving,
    spawn,
    tree_cpu_seconds,
)
from harness.processes import Process, ProcessFailed, free_port
from hosting.contract import NAMESPACE_HEADER

if TYPE_CHECKING:
    from bench.scenarios import Bench

TENANT_TOKEN = "bench-tenant-token"
TURN_GAP_SECONDS = 0.025
"""Between follow-ups of the relay comparison: the last turn's tail (the sandbox's and the
relays' work after ``done``) is over before the next is timed, whichever path came before."""
ADMIN_TOKEN = "bench-admin-token"


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
                  image: str | None = None) -> AsyncIterator[Gateway]:
    root = tmp / name
    root.mkdir(parents=True)
    port = free_port()
    installation = f"b{secrets.token_hex(4)}"
    env = clean_env() | {
        "ANTHROPIC_BASE_URL": model_url, "ANTHROPIC_API_KEY": API_KEY, "HOST": "127.0.0.1", "PORT": str(port),
        "GATEWAY_TENANTS": f"{TENANT_TOKEN}:bench", "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
        # A pool of a fixed size: these scenarios measure it full, not growing with their claims.
        "GATEWAY_WARM_POOL": str(pool), "GATEWAY_WARM_POOL_MAX": str(pool),
        "GATEWAY_DATA_DIR": str(root / "data"), "GATEWAY_BACKEND": backend,
        "GATEWAY_INSTALLATION": installation,
        # The bench measures hosting, not the tenant quotas: lift them.
        "GATEWAY_TENANT_MAX_SANDBOXES": "0", "GATEWAY_TENANT_MAX_TURNS": "0", "GATEWAY_TENANT_TURNS_PER_MINUTE": "0",
    }
    if backend == "docker":
        assert image is not None
        env |= {"GATEWAY_DOCKER_IMAGE": image, "GATEWAY_DOCKER_NETWORK": "host"}
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


async def relay_overhead(bench: Bench) -> dict[str, Any]:
    """Follow-ups on one session through the gateway, straight to its sandbox and through a
    bare relay (:mod:`bench.bare_relay`), in turn (so a drift in the machine's speed reaches
    all alike). Beside the p50s: the median of the gateway/straight pairs' differences,
    and the gateway process's own CPU per relayed turn."""
    counts = bench.counts
    async with gateway(bench.model_url, bench.tmp, "g-relay", pool=1) as gw, client() as via, client(ADMIN_TOKEN) as admin:
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
        return {**{name: summarize(done, recall_expected=len(done), recall_ok=sum(recalled(t, value) for t in done))
                   for name, done in turns.items()},
                "paired_median_added_s": percentile(paired, 50),
                "gateway_cpu_s_per_turn": gateway_cpu / len(turns["gateway"])}


async def first_turns(bench: Bench, pool: int, backend: str = "local", image: str | None = None) -> dict[str, Any]:
    """First turns of new sessions, one at a time, each from steady state (pool refilled)."""
    name, counts = f"g-first-{backend}-pool{pool}", bench.counts
    async with (gateway(bench.model_url, bench.tmp, name, pool, backend, image) as gw, client() as via,
                client(ADMIN_TOKEN) as admin):
        turns = []
        for i in range(counts.gw_first_turns):
            await settle(admin, gw, counts.prewarm_timeout)
            value, prompt = remember_prompt()
            turn = await http_turn(via, gw.base_url, f"first-{i}", prompt)
            turns.append(turn)
        return {"backend": backend, "pool": pool, **summarize(turns)}


async def burst(bench: Bench) -> dict[str, Any]:
    """``burst`` new sessions at once, each "Remember" then the recall, through one gateway."""
    counts = bench.counts
    async with gateway(bench.model_url, bench.tmp, "g-burst", pool=2) as gw, client() as via, client(ADMIN_TOKEN) as admin:
        await settle(admin, gw, counts.prewarm_timeout)

        async def session(i: int) -> tuple[TurnResult, TurnResult, str]:
            value, prompt = remember_prompt()
            first = await http_turn(via, gw.base_url, f"burst-{i}", prompt)
            return first, await http_turn(via, gw.base_url, f"burst-{i}", RECALL), value

        with Peak(gw.pid) as peak:
            started = time.perf_counter()
            done = await asyncio.gather(*(session(i) for i in range(counts.gw_burst)))
            wall = time.perf_counter() - started
        turns = [t for first, second, _ in done for t in (first, second)]
        recalls = sum(recalled(second, value) for _, second, value in done)
        return {**summarize(turns, wall, recall_expected=counts.gw_burst, recall_ok=recalls),
                "peak_rss_bytes": peak.rss_bytes, "peak_processes": peak.processes}
