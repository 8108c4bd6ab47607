"""Self-hosted environments end to end on the local backend: the real orchestrator process,
the real ``anthropic`` SDK worker in each sandbox, against the environment API stand-in.

What the tests prove:

- every tool of the agent toolset (bash, read, write, edit, glob, grep) runs in the
  session's own directory and its result reaches the service; a second session gets its
  own sandbox, whose file tools cannot reach the first one's files; the environment key
  is nowhere in a sandbox (its processes' environments, its files), the runner used only
  the item's own token;
- faults: a runner killed mid-item (the lease lapses, the item comes back, a new runner
  finishes the turn); the orchestrator killed and restarted (its sandboxes end with it,
  the restarted one serves the item once); two orchestrators sharing Redis (never two
  live leases for one session, the newest item wins); an idle sandbox stopped and started
  again on the next item with its files; a terminated session's sandbox removed and its files
  archived, then removed after the archive period (0: at once);
- webhook mode: a signed delivery drains the queue, a bad signature starts nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.processes import free_port
from hosting.environments.sandboxes import sandbox_name
from hosting.sandboxes.local import LocalBackend
from tests.standins.environments import EnvironmentStandIn, OrchestratorProcess, orchestrator_env, serve
from tests.support.polling import wait_for
from tests.support.servers import healthy

ENVIRONMENT_KEY = "envkey-" + secrets.token_hex(16)
WEBHOOK_SECRET = "whsec_" + "c2VjcmV0LWZvci10aGUtd2ViaG9vay10ZXN0cw=="
TOOLS = [
    ("write", {"file_path": "notes.txt", "content": "alpha\nbeta\n"}),
    ("read", {"file_path": "notes.txt"}),
    ("edit", {"file_path": "notes.txt", "old_string": "beta", "new_string": "gamma"}),
    ("glob", {"pattern": "*.txt"}),
    ("grep", {"pattern": "gamma"}),
    ("bash", {"command": "pwd; cat notes.txt; tr '\\0' '\\n' < /proc/$PPID/environ | cut -d= -f1 | sort"}),
]
TURN_SECONDS = 90


@pytest.fixture
def standin() -> Iterator[EnvironmentStandIn]:
    yield from serve(EnvironmentStandIn(environment_key=ENVIRONMENT_KEY, webhook_secret=WEBHOOK_SECRET))


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """The orchestrators' data dir; every process of its sandboxes is gone afterwards."""
    path = tmp_path / "env-data"
    path.mkdir()
    yield path
    _kill_sandbox_processes(path)


@pytest.fixture
def start_orchestrator(standin: EnvironmentStandIn, data_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    key_file = tmp_path / "environment.key"
    key_file.write_text(ENVIRONMENT_KEY)
    installation = f"t{secrets.token_hex(4)}"
    started: list[OrchestratorProcess] = []

    def start(**extra: str) -> OrchestratorProcess:
        env = orchestrator_env(standin, data_dir, key_file, installation, **extra)
        orchestrator = OrchestratorProcess(env, tmp_path / f"orchestrator-{len(started)}.log")
        started.append(orchestrator)
        return orchestrator.start()

    yield start
    for orchestrator in started:
        orchestrator.stop()


def _kill_sandbox_processes(data_dir: Path) -> None:
    """SIGKILL every process whose environment places it under ``data_dir`` (servers, runners, tools)."""
    marker = f"AGENT_DATA_DIR={data_dir}".encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if any(v.startswith(marker) for v in (proc / "environ").read_bytes().split(b"\0")):
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue


def volume_dir(standin: EnvironmentStandIn, data_dir: Path, session_id: str) -> Path:
    return data_dir / "volumes" / sandbox_name(standin.environment_id, session_id)


def workspace_of(standin: EnvironmentStandIn, data_dir: Path, session_id: str) -> Path:
    return volume_dir(standin, data_dir, session_id) / "workspace" / session_id


def runner_record(standin: EnvironmentStandIn, data_dir: Path, session_id: str) -> dict[str, Any]:
    path = volume_dir(standin, data_dir, session_id) / "environment" / "runner.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def runner_log(standin: EnvironmentStandIn, data_dir: Path, session_id: str) -> str:
    path = volume_dir(standin, data_dir, session_id) / "environment" / "runner.log"
    return path.read_text(errors="replace") if path.exists() else ""


def pid_alive(pid: int) -> bool:
    try:
        return b"State:\tZ" not in Path(f"/proc/{pid}/status").read_bytes()
    except OSError:
        return False


def sandbox_ids(data_dir: Path) -> set[str]:
    return {p.stem for p in (data_dir / "sandboxes").glob("*.json")}


def wait_turn(standin: EnvironmentStandIn, session_id: str, orchestrator: OrchestratorProcess,
              timeout: float = TURN_SECONDS) -> None:
    try:
        wait_for(lambda: standin.turn_done(session_id), timeout=timeout, interval=0.2)
    except AssertionError:
        raise AssertionError(f"turn of {session_id} not done; orchestrator log:\n{orchestrator.log()[-4000:]}") from None


def assert_every_tool_ran(standin: EnvironmentStandIn, session_id: str, home: Path) -> None:
    """Each of ``TOOLS`` succeeded in ``home``, the session's working directory, and the
    runner's environment held the item's own secret, never the environment key."""
    results = standin.results(session_id)
    assert [(name, error) for name, error, _ in results] == [(name, False) for name, _ in TOOLS]
    texts = {name: text for name, _, text in results}
    assert texts["read"] == "alpha\nbeta\n"
    assert texts["glob"] == f"{home}/notes.txt"
    assert texts["grep"] == f"{home}/notes.txt:2:gamma"
    bash_lines = texts["bash"].splitlines()
    assert bash_lines[:3] == [str(home), "alpha", "gamma"]
    assert (home / "notes.txt").read_text() == "alpha\ngamma\n"
    # The runner holds the item's own secret, not the environment key.
    assert "ANTHROPIC_WORK_SECRET" in bash_lines and "ANTHROPIC_ENVIRONMENT_KEY" not in bash_lines


def test_every_tool_runs_in_the_sessions_own_sandbox(standin: EnvironmentStandIn, data_dir: Path,
                                                      start_orchestrator: Callable[..., OrchestratorProcess]) -> None:
    orchestrator = start_orchestrator()
    first = standin.create_session(TOOLS)
    wait_turn(standin, first, orchestrator)
    outside = workspace_of(standin, data_dir, first) / "notes.txt"
    second = standin.create_session([("glob", {"pattern": "*.txt"}), ("read", {"file_path": str(outside)}),
                                     ("bash", {"command": "pwd"})])
    wait_turn(standin, second, orchestrator)

    home = workspace_of(standin, data_dir, first)
    assert_every_tool_ran(standin, first, home)

    other = standin.results(second)
    assert other[0] == ("glob", False, "no matches")
    assert other[1][0] == "read" and other[1][1] is True
    assert other[2] == ("bash", False, str(workspace_of(standin, data_dir, second)))
    assert volume_dir(standin, data_dir, first) != volume_dir(standin, data_dir, second)

    # Nothing in any sandbox's files holds the key; the runners' calls used the items' tokens.
    for path in (data_dir / "volumes").rglob("*"):
        if path.is_file():
            assert ENVIRONMENT_KEY.encode() not in path.read_bytes(), path
    for call in standin.calls:
        if call.route in ("heartbeat", "events.list", "events.stream", "events.send"):
            assert call.credential.startswith("sessions_token:"), call
        if call.route in ("poll", "ack"):
            assert call.credential == "environment_key", call
    items = [item for session in (first, second) for item in standin.items_of(session)]
    assert len(items) == 2
    wait_for(lambda: all(standin.item(i.id).state == "stopped" for i in items), timeout=30)
    assert [i.deliveries for i in items] == [1, 1]
    assert ENVIRONMENT_KEY not in orchestrator.log()


def test_a_runner_killed_mid_item_is_replaced_and_finishes_the_turn(
        standin: EnvironmentStandIn, data_dir: Path, start_orchestrator: Callable[..., OrchestratorProcess]) -> None:
    standin.lease_ttl = 10  # the lease lapses sooner after the kill
    orchestrator = start_orchestrator()
    session = standin.create_session([("bash", {"command": "sleep 2; echo slept"}),
                                      ("write", {"file_path": "after.txt", "content": "done"})])
    (item,) = standin.items_of(session)
    wait_for(lambda: standin.item(item.id).state == "active", timeout=60, interval=0.1)
    first_pid = int(runner_record(standin, data_dir, session)["pid"])
    os.kill(first_pid, signal.SIGKILL)

    wait_turn(standin, session, orchestrator)
    assert item.id in standin.requeued
    assert standin.item(item.id).deliveries == 2
    assert [(n, e) for n, e, _ in standin.results(session)] == [("bash", False), ("write", False)]
    assert standin.results(session)[0][2] == "slept"
    record = runner_record(standin, data_dir, session)
    assert record["work_id"] == item.id and record["pid"] != first_pid
    assert (workspace_of(standin, data_dir, session) / "after.txt").read_text() == "done"


def test_an_orchestrator_killed_and_restarted_serves_the_item_once(
        standin: EnvironmentStandIn, data_dir: Path, start_orchestrator: Callable[..., OrchestratorProcess]) -> None:
    standin.lease_ttl = 10  # the dead runner's lease lapses sooner
    first = start_orchestrator()
    session = standin.create_session([("bash", {"command": "sleep 2; echo one"}),
                                      ("write", {"file_path": "x.txt", "content": "x"})])
    (item,) = standin.items_of(session)
    wait_for(lambda: standin.item(item.id).state == "active", timeout=60, interval=0.1)
    old_runner = int(runner_record(standin, data_dir, session)["pid"])
    first.kill()
    # A local sandbox ends with its orchestrator: nothing of the first one keeps running.
    wait_for(lambda: not pid_alive(old_runner), timeout=10)

    second = start_orchestrator()
    wait_turn(standin, session, second)
    assert runner_log(standin, data_dir, session).count("serving work_id=") == 2
    assert "another runner is running" not in runner_log(standin, data_dir, session)
    assert [(n, e) for n, e, _ in standin.results(session)] == [("bash", False), ("write", False)]
    # The dead sandbox's record was cleaned up; only live sandboxes are recorded.
    live = asyncio.run(LocalBackend(data_dir, second.env["ENVIRONMENT_INSTALLATION"]).list())
    assert sandbox_ids(data_dir) == {s.sandbox_id for s in live}


@pytest.mark.stores
def test_two_orchestrators_never_run_two_runners_for_one_session(
        standin: EnvironmentStandIn, data_dir: Path, start_orchestrator: Callable[..., OrchestratorProcess],
        redis_url: str) -> None:  # noqa: F811
    orchestrators = [start_orchestrator(ENVIRONMENT_REDIS_URL=redis_url) for _ in range(2)]
    session = standin.create_session([("bash", {"command": "sleep 1; echo busy"}),
                                      ("write", {"file_path": "y.txt", "content": "y"})])
    extra = [standin.enqueue(session), standin.enqueue(session)]
    others = [standin.create_session([("bash", {"command": "echo other"})]) for _ in range(2)]

    for each in (session, *others):
        wait_turn(standin, each, orchestrators[0])
    assert standin.max_active_leases(session) == 1
    items = standin.items_of(session)
    assert len(items) == 3
    wait_for(lambda: all(standin.item(i.id).state == "stopped" for i in items), timeout=30)
    # The newest item ended the turn; the older ones were force-stopped, at most one served at a time.
    assert runner_record(standin, data_dir, session)["work_id"] == extra[-1]
    for each in (session, *others):
        assert "another runner is running" not in runner_log(standin, data_dir, each)
    logs = "".join(o.log() for o in orchestrators)
    assert "exists already" not in logs


def test_an_idle_sandbox_is_stopped_and_started_again_with_its_files(
        standin: EnvironmentStandIn, data_dir: Path, start_orchestrator: Callable[..., OrchestratorProcess]) -> None:
    orchestrator = start_orchestrator(ENVIRONMENT_IDLE_SECONDS="1")
    session = standin.create_session([("write", {"file_path": "kept.txt", "content": "still here"})],
                                     [("read", {"file_path": "kept.txt"})])
    wait_turn(standin, session, orchestrator)
    sandbox_id = sandbox_name(standin.environment_id, session)
    wait_for(lambda: sandbox_id not in sandbox_ids(data_dir), timeout=30)
    wait_for(lambda: "stopped idle sandbox" in orchestrator.log(), timeout=10)  # logged once it is gone
    assert (workspace_of(standin, data_dir, session) / "kept.txt").read_text() == "still here"

    assert standin.next_turn(session) is not None
    wait_turn(standin, session, orchestrator)
    assert standin.results(session)[-1] == ("read", False, "still here")


def test_a_terminated_sessions_sandbox_is_archived_and_its_files_removed_after_the_archive_period(
        standin: EnvironmentStandIn, data_dir: Path, start_orchestrator: Callable[..., OrchestratorProcess]) -> None:
    """The sandbox goes as soon as the session ends; its files stay for the archive period,
    across an orchestrator restart (the ledger is on disk), and then go."""
    archive = {"ENVIRONMENT_ARCHIVE_SECONDS": "10"}
    orchestrator = start_orchestrator(**archive)
    session = standin.create_session([("write", {"file_path": "kept.txt", "content": "for the record"})])
    wait_turn(standin, session, orchestrator)
    volume = volume_dir(standin, data_dir, session)
    sandbox = sandbox_name(standin.environment_id, session)

    standin.terminate(session)
    wait_for(lambda: sandbox not in sandbox_ids(data_dir), timeout=30)
    ended = time.monotonic()
    assert (workspace_of(standin, data_dir, session) / "kept.txt").read_text() == "for the record"
    wait_for(lambda: "its files archived" in orchestrator.log(), timeout=10)  # logged once the files are kept
    # Work for a terminated session is force-stopped, and no sandbox is made for it.
    late = standin.enqueue(session)
    wait_for(lambda: standin.item(late).state == "stopped", timeout=30)
    assert standin.item(late).force_stopped and sandbox not in sandbox_ids(data_dir)

    orchestrator.stop()
    assert volume.is_dir() and time.monotonic() - ended < 10
    restarted = start_orchestrator(**archive)
    wait_for(lambda: not volume.exists(), timeout=30)
    assert time.monotonic() - ended >= 8  # the period, less the janitor's interval and the wait's
    wait_for(lambda: "archive of session" in restarted.log(), timeout=10)  # logged once the files are gone


def test_with_no_archive_period_a_terminated_sessions_files_go_with_its_sandbox(
        standin: EnvironmentStandIn, data_dir: Path, start_orchestrator: Callable[..., OrchestratorProcess]) -> None:
    orchestrator = start_orchestrator(ENVIRONMENT_ARCHIVE_SECONDS="0")
    session = standin.create_session([("write", {"file_path": "gone.txt", "content": "soon"})])
    wait_turn(standin, session, orchestrator)
    volume = volume_dir(standin, data_dir, session)
    assert volume.is_dir()
    standin.terminate(session)
    wait_for(lambda: not volume.exists(), timeout=30)
    assert sandbox_name(standin.environment_id, session) not in sandbox_ids(data_dir)


def test_a_signed_webhook_drains_the_queue_and_a_bad_signature_starts_nothing(
        standin: EnvironmentStandIn, data_dir: Path, start_orchestrator: Callable[..., OrchestratorProcess]) -> None:
    port = free_port()
    orchestrator = start_orchestrator(ENVIRONMENT_MODE="webhook", ENVIRONMENT_WEBHOOK_SECRET=WEBHOOK_SECRET,
                                      ENVIRONMENT_WEBHOOK_DRAIN_SECONDS="600", HOST="127.0.0.1", PORT=str(port))
    wait_for(lambda: healthy(f"http://127.0.0.1:{port}"), timeout=30)
    polls_before = len(standin.calls_of("poll"))
    session = standin.create_session(TOOLS[:2])  # no webhook URL yet: queued silently
    (item,) = standin.items_of(session)

    standin.webhook_url = f"http://127.0.0.1:{port}/webhooks"
    forged = {"type": "event", "id": "wevt_forged", "created_at": "2026-01-01T00:00:00Z",
              "data": {"type": "session.pending", "id": session}}
    assert standin.post_webhook(forged, secret="whsec_" + "d3Jvbmcta2V5LXdyb25nLWtleQ==") == 400
    time.sleep(2)
    assert len(standin.calls_of("poll")) == polls_before
    assert standin.item(item.id).deliveries == 0 and not (data_dir / "volumes").exists()

    assert standin.post_webhook({**forged, "id": "wevt_real"}) == 202
    wait_turn(standin, session, orchestrator)
    assert [(n, e) for n, e, _ in standin.results(session)] == [("write", False), ("read", False)]
    assert standin.webhook_statuses == [400, 202]
