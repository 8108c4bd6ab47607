"""Shared fixtures: the real local model, real server processes, SSE helpers.

Everything here drives real parts: the local model is a real HTTP server, the
agent server is a real ``python -m hosting.server`` process, and turns go
through the real claude-agent-sdk and its bundled Claude Code CLI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from httpx_sse import connect_sse

from hosting.local_model import create_app as create_local_model

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-test-secret-6b1f0c2e9a"
BASE_IMAGE = os.environ.get("AGENT_TEST_BASE_IMAGE", "research-agent-base:bookworm")
IMAGE = "research-agent:test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalModel:
    base_url: str

    def requests_total(self) -> int:
        return httpx.get(f"{self.base_url}/local/requests").json()["total"]


@pytest.fixture(scope="session")
def local_model() -> Iterator[LocalModel]:
    """The local model, served in-process on a background thread."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_local_model(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("local model did not start")
        time.sleep(0.05)
    yield LocalModel(f"http://127.0.0.1:{port}")
    server.should_exit = True
    thread.join(10)


def docker(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The docker CLI; fails the test with its output unless ``check=False``."""
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def agent_image() -> str:
    """The product image, built once per run on the offline base image (needs a Docker engine)."""
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.fail("no Docker engine: run scripts/start-dockerd.sh as root")
    subprocess.run([str(ROOT / "hosting/docker/build-base-image.sh"), BASE_IMAGE], check=True, timeout=900)
    docker("build", "-q", "-f", "hosting/Dockerfile", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
           "--network", "host", "-t", IMAGE, str(ROOT), timeout=900)
    return IMAGE


def agent_env(local_model: LocalModel, data_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for an agent process pointed at the local model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "ANTHROPIC_", "CLAUDE_"))}
    env.update({
        "ANTHROPIC_BASE_URL": local_model.base_url,
        "ANTHROPIC_API_KEY": API_KEY,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_MAX_RETRIES": "0",
        "AGENT_DATA_DIR": str(data_dir),
        "HOST": "127.0.0.1",
        # The default pool (12) is sized for serving; a test server needs only a couple.
        "AGENT_PREWARM": "2",
    })
    env.update(extra)
    return env


@dataclass
class ServerProcess:
    """A real agent server process; always stopped (with its CLIs) at teardown."""

    env: dict[str, str]
    data_dir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hosting.server"], cwd=ROOT,
            env={**self.env, "PORT": str(self.port)}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not become healthy:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Signal the server process only (not its group) and wait for it."""
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(60)

    def stop(self) -> None:
        """Teardown: end the whole process group (server and any CLI it left)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(30)


@pytest.fixture
def start_server(local_model: LocalModel, tmp_path: Path) -> Iterator[Any]:
    """Factory: ``start_server(**env)`` starts a server on a fresh data dir (or ``data_dir=``)."""
    started: list[ServerProcess] = []

    def start(data_dir: Path | None = None, **extra: str) -> ServerProcess:
        data_dir = data_dir or tmp_path / "data"
        server = ServerProcess(agent_env(local_model, data_dir, **extra), data_dir)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (the CLIs a server started)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state != "Z":
            out.add(pid)
    return out


def wait_for(predicate: Any, timeout: float = 30, interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; fail the test at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def healthy(base_url: str) -> bool:
    """``GET /health`` answers 200; ``False`` while nothing listens there yet."""
    try:
        return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def ready(base_url: str) -> dict[str, Any]:
    return httpx.get(f"{base_url}/ready").json()


def workspace_of(data_dir: Path, session_id: str) -> Path:
    """The workspace directory a session is bound to."""
    entry = json.loads((data_dir / "sessions" / f"{session_id}.json").read_text())
    return data_dir / "workspaces" / entry["sdk_session_id"]


def bound_sessions(data_dir: Path) -> set[str]:
    return {p.stem for p in (data_dir / "sessions").glob("*.json")}


def workspace_dirs(data_dir: Path) -> set[str]:
    return {p.name for p in (data_dir / "workspaces").iterdir()}


@dataclass
class Turn:
    """What one POST /messages produced: the raw SSE events, in order."""

    events: list[dict[str, Any]]

    @property
    def types(self) -> list[str]:
        return [e["event"] for e in self.events]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e["data"] for e in self.events if e["event"] == kind]

    @property
    def text(self) -> str:
        return "".join(d["text"] for d in self.of("text"))

    @property
    def result(self) -> dict[str, Any]:
        (result,) = self.of("result")
        return result


def event_order(event_id: str) -> tuple[int, int]:
    """``"<turn>-<seq>"`` as numbers, for checking ids grow."""
    turn, _, seq = event_id.partition("-")
    return int(turn), int(seq)


def post_turn(base_url: str, session_id: str, prompt: str, *, headers: dict[str, str] | None = None,
              timeout: float = 120) -> Turn:
    """One turn over real HTTP, parsed with httpx-sse."""
    events = []
    with httpx.Client(timeout=timeout) as client, connect_sse(
        client, "POST", f"{base_url}/sessions/{session_id}/messages", json={"prompt": prompt}, headers=headers or {}
    ) as source:
        assert source.response.status_code == 200, source.response.read()
        for sse in source.iter_sse():
            if not sse.data:  # a heartbeat comment, not an event
                continue
            events.append({"event": sse.event, "id": sse.id, "data": json.loads(sse.data)})
    return Turn(events)
