"""The scenarios. Each starts its own servers, so one scenario's warm CLIs never help another.

Each *part* (one server, or the direct-SDK comparison) is measured independently:
a part that cannot run (say, the server lacks prewarming) is reported as such and
the others still run.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench import gateway, observability
from bench.cgroups import CgroupUnavailable, MemoryCgroup, drop_file_cache
from bench.drive import (
    RECALL,
    TurnResult,
    direct_options,
    direct_turn,
    http_client,
    http_turn,
    http_turn_retrying,
    recalled,
    remember_prompt,
    summarize,
)
from bench.procs import FeatureMissing, Peak, ScenarioError, Server, server, settle, tree, tree_cpu_seconds
from harness.processes import ProcessFailed
from hosting.server.cli import BUNDLED_CLI


@dataclass(frozen=True)
class Counts:
    """How much each scenario does; ``--quick`` shrinks every count."""

    follow_ups: int = 20        # (a) sequential follow-ups per path
    first_turns: int = 15       # (b) sequential first turns per path
    prewarm_b: int = 16         # (b) AGENT_PREWARM; more than first_turns so the pool never runs dry
    burst_b: int = 10           # (b) new sessions' first turns at once on a server with prewarm_b CLIs ready
    established: int = 25       # (c) sessions
    follow_ups_c: int = 4       # (c) follow-ups per session
    burst: int = 25             # (e) new sessions at once (and AGENT_PREWARM of the prewarmed server)
    burst_rounds: int = 3       # (e) rounds of the three servers, alternated; the median round is reported
    limit_mib: int = 1024       # (limits) the memory limit; first turns, follow-ups and the burst use the counts above
    gw_follow_ups: int = 300    # (g) follow-ups per path, in turn (at 100 a p50 moved by ±1.5 ms from run to run)
    gw_first_turns: int = 8     # (g) first turns of new sessions per gateway (warm pool, no pool)
    gw_burst: int = 25          # (g) new sessions at once through the gateway, two turns each
    gw_wave: int = 15           # (g) new sessions at once in each of the two bursts (the pool that follows demand)
    gw_wave_gap: float = 60.0   # (g) seconds from the first burst's start to the second's
    gw_floor_timeout: float = 420.0  # (g) most seconds after the last claim for the pool to be back at its floor
    gw_frozen: int = 5          # (g) sessions whose sandbox is stopped mid-turn, one after another
    obs_turns: int = 150        # (o) follow-ups per server, telemetry on and off, alternated (fewer: noise > 3%)
    settle_timeout: float = 60.0
    prewarm_timeout: float = 240.0


QUICK = Counts(follow_ups=3, first_turns=3, prewarm_b=4, burst_b=3, established=3, follow_ups_c=3, burst=3,
               burst_rounds=1, gw_follow_ups=5, gw_first_turns=2, gw_burst=4, gw_wave=3, gw_wave_gap=10.0, gw_frozen=1,
               obs_turns=6, settle_timeout=30.0, prewarm_timeout=90.0)


@dataclass
class Bench:
    """What every scenario needs: the local model, a scratch dir, the counts, a time bound."""

    model_url: str
    tmp: Path
    counts: Counts
    part_timeout: float
    failures: list[str]
    docker_image: str | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


async def part(bench: Bench, name: str, run: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """Run one measured part, bounded in time; turn its failure into a reported status."""
    started = time.monotonic()
    try:
        result = await asyncio.wait_for(run(), bench.part_timeout)
        result["status"] = "ok"
    except FeatureMissing as exc:
        result = {"status": "missing_feature", "error": str(exc)}
    except (ScenarioError, ProcessFailed, TimeoutError, OSError, httpx.HTTPError) as exc:
        message = f"timed out after {bench.part_timeout:.0f} s" if isinstance(exc, TimeoutError) else str(exc)
        result = {"status": "failed", "error": f"{type(exc).__name__}: {message}"}
        bench.failures.append(f"{name}: {result['error']}")
    result["elapsed_s"] = round(time.monotonic() - started, 2)
    print(f"  {name}: {result['status']} in {result['elapsed_s']} s"
          + (f" - {result['error'].splitlines()[0]}" if "error" in result else ""), flush=True)
    return result


def _need(turn: TurnResult, what: str) -> None:
    if turn.error is not None:
        raise ScenarioError(f"{what} failed: {turn.error}")


# -- (a) follow-up latency ---------------------------------------------------

async def follow_ups_server(bench: Bench) -> dict[str, Any]:
    """Sequential recall follow-ups on one session of a default server (its CLI stays warm)."""
    async with server(bench.model_url, bench.tmp, "a-default", {}) as srv, http_client() as client:
        await settle(client, srv, need_prewarm=False, timeout=bench.counts.prewarm_timeout)
        value, prompt = remember_prompt()
        sid = new_id("a")
        _need(await http_turn(client, srv.base_url, sid, prompt), "first turn")
        turns = [await http_turn(client, srv.base_url, sid, RECALL) for _ in range(bench.counts.follow_ups)]
        return srv.finish(summarize(turns, recall_expected=len(turns), recall_ok=sum(recalled(t, value) for t in turns)))


async def follow_ups_direct(bench: Bench) -> dict[str, Any]:
    """The same follow-ups with plain ``query(resume=...)``: a CLI spawned and the transcript
    reloaded every time, which is what hosting without warm sessions would cost."""
    workdir = Path(tempfile.mkdtemp(prefix="direct-a-", dir=bench.tmp))
    value, prompt = remember_prompt()
    first, sid = await direct_turn(prompt, direct_options(workdir, bench.model_url))
    _need(first, "direct first query")
    if sid is None:
        raise ScenarioError("direct first query returned no session id")
    turns = [(await direct_turn(RECALL, direct_options(workdir, bench.model_url, resume=sid)))[0]
             for _ in range(bench.counts.follow_ups)]
    return summarize(turns, recall_expected=len(turns), recall_ok=sum(recalled(t, value) for t in turns))


# -- (b) first-turn latency --------------------------------------------------

async def first_turns_server(bench: Bench, name: str, prewarm: int) -> dict[str, Any]:
    """Sequential first turns of new sessions. Before each, wait for the pool to refill, so
    each turn sees a full pool (the steady state the setting is meant to provide)."""
    need = prewarm > 0
    async with server(bench.model_url, bench.tmp, name, {"AGENT_PREWARM": str(prewarm)}) as srv, \
            http_client() as client:
        turns = []
        for _ in range(bench.counts.first_turns):
            await settle(client, srv, need_prewarm=need, timeout=bench.counts.prewarm_timeout)
            turns.append(await http_turn(client, srv.base_url, new_id("b"), remember_prompt()[1]))
        return srv.finish(summarize(turns))


async def first_turns_paired(bench: Bench) -> dict[str, Any]:
    """First turns on a prewarmed server and first direct ``query()`` calls (fresh directory
    each), alternated, so a drift in the machine's speed hits both sides of the ratio alike.
    The server is settled (pool full, tree quiet) before every turn of either kind."""
    async with server(bench.model_url, bench.tmp, "b-prewarm", {"AGENT_PREWARM": str(bench.counts.prewarm_b)}) as srv, \
            http_client() as client:
        served, direct = [], []
        for _ in range(bench.counts.first_turns):
            await settle(client, srv, need_prewarm=True, timeout=bench.counts.prewarm_timeout)
            served.append(await http_turn(client, srv.base_url, new_id("b"), remember_prompt()[1]))
            await settle(client, srv, need_prewarm=True, timeout=bench.counts.prewarm_timeout)
            workdir = Path(tempfile.mkdtemp(prefix="direct-b-", dir=bench.tmp))
            direct.append((await direct_turn(remember_prompt()[1], direct_options(workdir, bench.model_url)))[0])
        return {"prewarmed": srv.finish(summarize(served)), "direct": summarize(direct)}


async def first_turns_at_once(bench: Bench) -> dict[str, Any]:
    """``burst_b`` new sessions' first turns at once on a server with ``prewarm_b`` pre-started
    CLIs (settled first): what refilling the pool meanwhile costs them, against (b)'s lone
    first turn on the same kind of server."""
    counts = bench.counts
    async with server(bench.model_url, bench.tmp, "b-at-once", {"AGENT_PREWARM": str(counts.prewarm_b)}) as srv, \
            http_client() as client:
        await settle(client, srv, need_prewarm=True, timeout=counts.prewarm_timeout)
        started = time.perf_counter()
        turns = await asyncio.gather(*(http_turn(client, srv.base_url, new_id("b"), remember_prompt()[1])
                                       for _ in range(counts.burst_b)))
        return srv.finish({"sessions": counts.burst_b, **summarize(list(turns), time.perf_counter() - started)})


# -- (c) concurrent follow-ups on established sessions -----------------------

async def _measured(srv: Server, load: Callable[[], Awaitable[list[TurnResult]]]) -> tuple[list[TurnResult], dict[str, Any]]:
    """Run ``load`` while recording wall time, the tree's CPU delta and peak RSS."""
    cpu_before = tree_cpu_seconds(srv.pid)
    with Peak(srv.pid) as peak:
        started = time.perf_counter()
        turns = await load()
        wall = time.perf_counter() - started
    cpu = tree_cpu_seconds(srv.pid) - cpu_before
    return turns, {
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_s_per_turn": cpu / len(turns) if turns else None,
        "peak_rss_bytes": peak.rss_bytes,
        "peak_processes": peak.processes,
        "peak_clis": peak.direct_children,
        "rss_samples": peak.samples,
        "end_rss_bytes": sum(p.rss_bytes for p in tree(srv.pid)),
    }


async def established(bench: Bench) -> dict[str, Any]:
    """All sessions at once, each sending its follow-ups back to back (a session takes one
    turn at a time: a second concurrent turn on it would be a 409 by contract)."""
    counts = bench.counts
    async with server(bench.model_url, bench.tmp, "c-default", {}) as srv, http_client() as client:
        await settle(client, srv, need_prewarm=False, timeout=counts.prewarm_timeout)
        values = {new_id("c"): remember_prompt() for _ in range(counts.established)}
        gate = asyncio.Semaphore(5)  # set-up is not measured: be gentle with 2 cores

        async def first(sid: str) -> TurnResult:
            async with gate:
                return await http_turn(client, srv.base_url, sid, values[sid][1])

        for turn in await asyncio.gather(*(first(sid) for sid in values)):
            _need(turn, "set-up first turn")
        await settle(client, srv, need_prewarm=False, timeout=counts.prewarm_timeout)

        recalls: list[bool] = []

        async def session(sid: str) -> list[TurnResult]:
            turns = [await http_turn(client, srv.base_url, sid, RECALL) for _ in range(counts.follow_ups_c)]
            recalls.extend(recalled(t, values[sid][0]) for t in turns)
            return turns

        async def load() -> list[TurnResult]:
            return [t for ts in await asyncio.gather(*(session(sid) for sid in values)) for t in ts]

        turns, cost = await _measured(srv, load)
        return srv.finish({"sessions": len(values), **cost, **summarize(turns, cost["wall_s"],
                                                                        recall_expected=len(turns),
                                                                        recall_ok=sum(recalls))})


# -- (e) burst of new sessions -----------------------------------------------

async def burst(bench: Bench, name: str, knobs: dict[str, str], need_prewarm: bool) -> dict[str, Any]:
    """Brand-new sessions all at once, each: remember, then recall (sequential within a session)."""
    counts = bench.counts
    async with server(bench.model_url, bench.tmp, name, knobs) as srv, http_client() as client:
        await settle(client, srv, need_prewarm=need_prewarm, timeout=counts.prewarm_timeout)
        recalls: list[bool] = []

        async def session() -> list[TurnResult]:
            sid = new_id("e")
            value, prompt = remember_prompt()
            first = await http_turn(client, srv.base_url, sid, prompt)
            second = await http_turn(client, srv.base_url, sid, RECALL)
            recalls.append(recalled(second, value))
            return [first, second]

        async def load() -> list[TurnResult]:
            return [t for ts in await asyncio.gather(*(session() for _ in range(counts.burst))) for t in ts]

        turns, cost = await _measured(srv, load)
        return srv.finish({"sessions": counts.burst, **cost, **summarize(turns, cost["wall_s"],
                                                                         recall_expected=counts.burst,
                                                                         recall_ok=sum(recalls))})


# -- (limits) under a memory limit --------------------------------------------

@asynccontextmanager
async def memory_cgroup(bench: Bench) -> AsyncIterator[MemoryCgroup]:
    """A fresh cgroup limited to ``limit_mib``, always removed. The CLI's executable is
    evicted from the page cache first, so the limited server's CLIs are charged for reading
    it, as in a new container."""
    try:
        cgroup = MemoryCgroup.create(bench.counts.limit_mib * 2**20)
    except CgroupUnavailable as exc:
        raise FeatureMissing(f"no memory cgroup to run a server under a limit: {exc}") from None
    try:
        drop_file_cache(BUNDLED_CLI)
        yield cgroup
    finally:
        cgroup.close()


async def _settle_all(client: httpx.AsyncClient, servers: tuple[Server, ...], counts: Counts) -> None:
    for srv in servers:
        await settle(client, srv, need_prewarm=True, timeout=counts.prewarm_timeout)


async def limited_vs_unlimited(bench: Bench) -> dict[str, Any]:
    """Two default servers, one under the memory limit (so sized from it) and one without:
    sequential first turns of new sessions, then sequential follow-ups on one session each,
    alternated turn by turn, both servers settled (pools full, trees quiet) before every
    first turn and before the follow-ups. The limited server starts first, so its CLIs are
    the ones charged for reading the CLI's executable."""
    counts = bench.counts
    async with memory_cgroup(bench) as cgroup, \
            server(bench.model_url, bench.tmp, "limits-limited", {}, cgroup) as boxed, http_client() as client:
        await settle(client, boxed, need_prewarm=True, timeout=counts.prewarm_timeout)
        async with server(bench.model_url, bench.tmp, "limits-unlimited", {}) as free:
            servers = (boxed, free)
            first: dict[str, list[TurnResult]] = {srv.name: [] for srv in servers}
            for _ in range(counts.first_turns):
                for srv in servers:
                    await _settle_all(client, servers, counts)
                    first[srv.name].append(await http_turn(client, srv.base_url, new_id("l"), remember_prompt()[1]))
            sessions = {srv.name: (new_id("l"), *remember_prompt()) for srv in servers}
            for srv in servers:
                sid, _, prompt = sessions[srv.name]
                _need(await http_turn(client, srv.base_url, sid, prompt), "first turn")
            await _settle_all(client, servers, counts)
            follow: dict[str, list[TurnResult]] = {srv.name: [] for srv in servers}
            for _ in range(counts.follow_ups):
                for srv in servers:
                    follow[srv.name].append(await http_turn(client, srv.base_url, sessions[srv.name][0], RECALL))

            def follow_ups(srv: Server) -> dict[str, Any]:
                turns, value = follow[srv.name], sessions[srv.name][1]
                return summarize(turns, recall_expected=len(turns), recall_ok=sum(recalled(t, value) for t in turns))

            return {
                "first_limited": boxed.finish({**summarize(first[boxed.name]), **cgroup.counters()}),
                "first_unlimited": free.finish(summarize(first[free.name])),
                "follow_limited": boxed.finish({**follow_ups(boxed), **cgroup.counters()}),
                "follow_unlimited": free.finish(follow_ups(free)),
            }


async def limited_burst(bench: Bench) -> dict[str, Any]:
    """``burst`` brand-new sessions at once on a default server under the memory limit, each
    "remember" then the recall. A 503 (no room for another CLI) is retried after its
    ``Retry-After``, as a client would; it is counted, not an error."""
    counts = bench.counts
    async with memory_cgroup(bench) as cgroup, \
            server(bench.model_url, bench.tmp, "limits-burst", {}, cgroup) as srv, http_client() as client:
        await settle(client, srv, need_prewarm=True, timeout=counts.prewarm_timeout)
        recalls: list[bool] = []
        refusals: list[str] = []

        async def session() -> list[TurnResult]:
            sid = new_id("l")
            value, prompt = remember_prompt()
            first = await http_turn_retrying(client, srv.base_url, sid, prompt, refusals)
            second = await http_turn_retrying(client, srv.base_url, sid, RECALL, refusals)
            recalls.append(recalled(second, value))
            return [first, second]

        async def load() -> list[TurnResult]:
            return [t for ts in await asyncio.gather(*(session() for _ in range(counts.burst))) for t in ts]

        turns, cost = await _measured(srv, load)
        return srv.finish({"sessions": counts.burst, "refusals_503": len(refusals),
                           "limit_bytes": counts.limit_mib * 2**20, **cgroup.counters(), **cost,
                           **summarize(turns, cost["wall_s"], recall_expected=counts.burst, recall_ok=sum(recalls))})


LIMITS_PAIRED = ("first_limited", "first_unlimited", "follow_limited", "follow_unlimited")


BURST_SERVERS: list[tuple[str, str, dict[str, str], bool]] = [
    # key, server name, env knobs, needs prewarm
    ("default", "e-default", {}, False),
    ("baseline", "e-baseline", {"AGENT_WARM_SESSIONS": "0", "AGENT_PREWARM": "0"}, False),
    ("prewarm", "e-prewarm", {}, True),  # AGENT_PREWARM filled in from counts.burst
]


async def run_all(bench: Bench, only: set[str]) -> dict[str, Any]:
    """Every scenario in order; ``only`` picks a subset (a, b, c, e, limits, g, o)."""
    counts = bench.counts
    results: dict[str, Any] = {}
    if "a" in only:
        print("(a) follow-up latency", flush=True)
        results["a"] = {"server": await part(bench, "a/server", lambda: follow_ups_server(bench)),
                        "direct": await part(bench, "a/direct", lambda: follow_ups_direct(bench))}
    if "b" in only:
        print("(b) first-turn latency", flush=True)
        paired = await part(bench, "b/prewarmed+direct", lambda: first_turns_paired(bench))
        if paired["status"] == "ok":
            results["b"] = {key: {**paired[key], "status": "ok"} for key in ("prewarmed", "direct")}
        else:
            results["b"] = {key: paired for key in ("prewarmed", "direct")}
        results["b"]["no_prewarm"] = await part(bench, "b/no_prewarm", lambda: first_turns_server(bench, "b-no-prewarm", 0))
        results["b"]["at_once"] = await part(bench, "b/at_once", lambda: first_turns_at_once(bench))
    if "c" in only:
        print("(c) concurrent follow-ups on established sessions", flush=True)
        results["c"] = await part(bench, "c/default", lambda: established(bench))
    if "e" in only:
        print("(e) burst of new sessions", flush=True)
        rounds: dict[str, list[dict[str, Any]]] = {key: [] for key, *_ in BURST_SERVERS}
        for round_no in range(1, counts.burst_rounds + 1):
            for key, name, knobs, need in BURST_SERVERS:
                knobs = {**knobs, "AGENT_PREWARM": str(counts.burst)} if key == "prewarm" else knobs
                rounds[key].append(await part(bench, f"e/{key} round {round_no}",
                                              functools.partial(burst, bench, f"{name}-{round_no}", knobs, need)))
        results["e"] = {key: median_round(parts) for key, parts in rounds.items()}
    if "limits" in only:
        print(f"(limits) under a {counts.limit_mib} MiB memory limit", flush=True)
        paired = await part(bench, "limits/paired", lambda: limited_vs_unlimited(bench))
        results["limits"] = {key: {**paired[key], "status": "ok"} if paired["status"] == "ok" else paired
                             for key in LIMITS_PAIRED}
        results["limits"]["burst"] = await part(bench, "limits/burst", lambda: limited_burst(bench))
    if "g" in only:
        print("(g) the gateway", flush=True)
        g: dict[str, Any] = {}
        for scope, sfx in (("session", ""), ("tenant", "_tenant")):
            g[f"relay{sfx}"] = await part(bench, f"g/relay{sfx}", functools.partial(gateway.relay_overhead, bench, scope))
            for pool, key in ((1, f"first_pool{sfx}"), (0, f"first_no_pool{sfx}")):
                g[key] = await part(bench, f"g/{key}", functools.partial(gateway.first_turns, bench, pool, scope=scope))
            g[f"burst{sfx}"] = await part(bench, f"g/burst{sfx}", functools.partial(gateway.burst, bench, scope))
        g["waves"] = await part(bench, "g/waves", functools.partial(gateway.two_bursts, bench))
        g["frozen"] = await part(bench, "g/frozen", functools.partial(gateway.frozen_sandbox, bench))
        if bench.docker_image is not None:
            image = bench.docker_image
            for scope, sfx in (("session", ""), ("tenant", "_tenant")):
                for pool, key in ((1, f"docker_first_pool{sfx}"), (0, f"docker_first_no_pool{sfx}")):
                    g[key] = await part(bench, f"g/{key}", functools.partial(
                        gateway.first_turns, bench, pool, "docker", image, scope))
                g[f"docker_burst{sfx}"] = await part(bench, f"g/docker_burst{sfx}",
                                                     functools.partial(gateway.burst, bench, scope, "docker", image))
        results["g"] = g
    if "o" in only:
        print("(o) telemetry on vs off", flush=True)
        results["o"] = await part(bench, "o/overhead", lambda: observability.overhead(bench))
    return results


def median_round(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median turns/s (a failed round is reported instead, so it is seen),
    with every round's turns/s alongside. Rounds alternate the servers, so a drift in the
    machine's speed during the run reaches all of them."""
    failed = [p for p in parts if p["status"] != "ok"]
    if failed:
        return failed[0]
    ordered = sorted(parts, key=lambda p: p.get("turns_per_s") or 0.0)
    return {**ordered[(len(ordered) - 1) // 2], "rounds_turns_per_s": [p.get("turns_per_s") for p in parts]}
