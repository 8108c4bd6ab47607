"""The server under a real 1 GiB memory limit: sized from it, within its budget when idle,
serving sessions without ever meeting the OOM killer, and refusing (503) rather than
thrashing when the budget is full.

The server runs in a memory cgroup the test makes (bench/cgroups.py: v1 as on the bench
machine, or v2), entered before it execs, so it and every CLI it starts are charged
there, as in a container. The cgroup is removed at teardown, whatever happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from bench.cgroups import CgroupUnavailable, MemoryCgroup, drop_file_cache
from harness.processes import free_port
from hosting.server.box import MEMORY_SHARE
from hosting.server.cli import BUNDLED_CLI
from tests.support import ROOT
from tests.support.polling import wait_for
from tests.support.servers import LocalModel, agent_env, ready
from tests.support.turns import Turn, post_turn

pytestmark = pytest.mark.e2e

LIMIT = 2**30
RECALL = "What value did I ask you to remember?"


@pytest.fixture
def one_gib() -> Iterator[MemoryCgroup]:
    try:
        cgroup = MemoryCgroup.create(LIMIT)
    except CgroupUnavailable as exc:
        pytest.skip(f"no memory cgroup for the test: {exc}")
    try:
        yield cgroup
    finally:
        cgroup.close()


@dataclass
class LimitedServer:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
        try:
            return httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(30)


@pytest.fixture
def start_limited(local_model: LocalModel, tmp_path: Path, one_gib: MemoryCgroup) -> Iterator[Any]:
    """Factory: a server inside the 1 GiB cgroup, with the sizes it picks itself."""
    started: list[LimitedServer] = []

    def start(**extra: str) -> LimitedServer:
        port = free_port()
        env = agent_env(local_model, tmp_path / "data", PORT=str(port), **extra)
        if "AGENT_PREWARM" not in extra:
            del env["AGENT_PREWARM"]  # sized from the limit, as in production
        log_path = tmp_path / f"server-{port}.log"
        drop_file_cache(BUNDLED_CLI)  # charge the CLI's executable pages here, as in a new container
        with open(log_path, "ab") as log:
            process = subprocess.Popen(one_gib.command([sys.executable, "-m", "hosting.server"]), cwd=ROOT,
                                       env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        server = LimitedServer(process, f"http://127.0.0.1:{port}", log_path)
        started.append(server)
        wait_for(server.healthy, timeout=60, interval=0.1)
        return server

    yield start
    for server in started:
        server.stop()


def turn_retrying_503(base_url: str, session_id: str, prompt: str, refusals: list[float]) -> Turn:
    """A turn as a well-behaved client makes it: a 503 (JSON detail, Retry-After) is retried
    after the time it names; each refusal's Retry-After is recorded."""
    while True:
        with httpx.Client(timeout=120) as client, connect_sse(
            client, "POST", f"{base_url}/sessions/{session_id}/messages", json={"prompt": prompt}
        ) as source:
            if source.response.status_code != 503:
                assert source.response.status_code == 200, source.response.read()
                return Turn([{"event": sse.event, "id": sse.id, "data": json.loads(sse.data)}
                             for sse in source.iter_sse() if sse.data])
            source.response.read()
            assert source.response.json()["detail"]
            retry_after = float(source.response.headers["retry-after"])
        refusals.append(retry_after)
        time.sleep(retry_after)


def settled(server: LimitedServer) -> dict[str, Any]:
    """/ready once the pool is full and no turn runs."""
    return wait_for(lambda: (s := ready(server.base_url))["prewarmed"] >= s["prewarm_target"]
                    and s["running_turns"] == 0 and s, timeout=120, interval=0.2)


def test_sized_to_the_limit_it_serves_sessions_without_reclaim_or_oom(start_limited, one_gib):
    server = start_limited()
    status = settled(server)
    assert status["memory_limit_bytes"] == LIMIT and status["memory_budget_bytes"] == int(LIMIT * MEMORY_SHARE)
    assert (status["cli_budget"], status["warm_sessions_cap"], status["prewarm_target"]) == (3, 2, 1)
    assert one_gib.usage() <= status["memory_budget_bytes"]

    refusals: list[float] = []
    turns: dict[int, tuple[Turn, Turn]] = {}
    failures: list[BaseException] = []

    def session(n: int) -> None:
        try:
            first = turn_retrying_503(server.base_url, f"lim-{n}", f"Remember this value: lim{n}", refusals)
            turns[n] = (first, turn_retrying_503(server.base_url, f"lim-{n}", RECALL, refusals))
        except BaseException as exc:  # noqa: BLE001 - reported below, on the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=session, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert not failures, failures
    for n, (first, second) in sorted(turns.items()):
        for turn in (first, second):
            assert turn.types[-2:] == ["result", "done"] and "error" not in turn.types, (n, turn.events)
        assert f"You asked me to remember lim{n}." in second.text
    assert len(turns) == 10

    after = settled(server)
    assert after["live_clis"] <= after["cli_budget"] == 3
    assert one_gib.usage() <= after["memory_budget_bytes"]
    assert one_gib.oom_kills() == 0, one_gib.counters()
    assert one_gib.limit_hits() == 0, one_gib.counters()  # never even pushed into reclaim
    assert (one_gib.peak() or 0) <= LIMIT


def test_a_turn_that_finds_no_room_gets_503_and_leaves_nothing(start_limited, one_gib):
    server = start_limited(AGENT_QUEUE_TIMEOUT_SECONDS="1")
    base = server.base_url
    settled(server)
    held: list[Turn] = []
    threads = [threading.Thread(target=lambda n=n: held.append(
        post_turn(base, f"held-{n}", f"Remember this value: h{n} [[delay:8]]"))) for n in range(3)]
    for thread in threads:
        thread.start()
    wait_for(lambda: (s := ready(base))["running_turns"] == 3 and s["queued_turns"] == 0, timeout=60)

    started = time.monotonic()
    refused = httpx.post(f"{base}/sessions/late/messages", json={"prompt": "Remember this value: late"}, timeout=30)
    assert refused.status_code == 503 and refused.headers["retry-after"].isdigit()
    assert "busy" in refused.json()["detail"]
    assert 1 <= time.monotonic() - started < 5
    assert httpx.get(f"{base}/sessions/late").status_code == 404

    for thread in threads:
        thread.join(120)
    assert [turn.types[-2:] for turn in held] == [["result", "done"]] * 3
    assert "Noted: I will remember late." in post_turn(base, "late", "Remember this value: late").text
    assert one_gib.oom_kills() == 0, one_gib.counters()


def test_settings_that_cannot_fit_are_kept_with_one_warning(start_limited):
    server = start_limited(AGENT_WARM_SESSIONS="40", AGENT_PREWARM="0")
    status = ready(server.base_url)
    assert (status["warm_sessions_cap"], status["prewarm_target"], status["cli_budget"]) == (40, 0, 40)
    assert server.log().count("AGENT_WARM_SESSIONS=40 and AGENT_PREWARM=0 may hold 40 CLIs") == 1
