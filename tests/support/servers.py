"""The local model and real agent server processes, and what the tests read of them.

Everything here drives real parts: the local model is a real HTTP server, the agent server is
a real ``python -m hosting.server`` process, and turns go through the real claude-agent-sdk and
its bundled Claude Code CLI. A plugin (``tests/conftest.py``): its fixtures exist once per run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from harness.processes import Process, free_port, http_ok
from hosting.local_model import create_app as create_local_model
from tests.support import ROOT
from tests.support.polling import wait_for

API_KEY = "sk-test-secret-6b1f0c2e9a"


@dataclass
class LocalModel:
    base_url: str

    def requests_total(self) -> int:
        """``POST /v1/messages`` requests served so far."""
        return httpx.get(f"{self.base_url}/local/requests").json()["total"]

    def token_counts(self) -> int:
        """``POST /v1/messages/count_tokens`` requests served so far."""
        return httpx.get(f"{self.base_url}/local/requests").json()["count_tokens"]


@pytest.fixture(scope="session")
def local_model() -> Iterator[LocalModel]:
    """The local model, served in-process on a background thread."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_local_model(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=15)
    yield LocalModel(f"http://127.0.0.1:{port}")
    server.should_exit = True
    thread.join(10)


def agent_env(local_model: LocalModel, data_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for an agent process pointed at the local model.

    No CLI is started ahead of a turn (``AGENT_PREWARM=0``): a test server serves a few
    sessions, and each pre-started CLI costs a CLI start the test never uses. A test whose
    point needs pre-started CLIs asks for them.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "ANTHROPIC_", "CLAUDE_"))}
    env.update({
        "ANTHROPIC_BASE_URL": local_model.base_url,
        "ANTHROPIC_API_KEY": API_KEY,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_MAX_RETRIES": "0",
        "AGENT_DATA_DIR": str(data_dir),
        "HOST": "127.0.0.1",
        "AGENT_PREWARM": "0",
    })
    env.update(extra)
    return env


@dataclass
class ServerProcess:
    """A real agent server process; always stopped (with its CLIs) at teardown."""

    env: dict[str, str]
    data_dir: Path
    port: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"server-{self.port}.log"

    def start(self) -> ServerProcess:
        self.process = Process([sys.executable, "-m", "hosting.server"], log_path=self.log_path, name="server", cwd=ROOT,
                               env={**self.env, "PORT": str(self.port)})
        self.process.wait_http(f"{self.base_url}/health", timeout=30)
        return self

    def log(self) -> str:
        return self.process.log() if self.process else ""

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Signal the server process only (not its group) and wait for it."""
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(60)

    def stop(self) -> None:
        """Teardown: end the whole process group (server and any CLI it left)."""
        if self.process is not None:
            self.process.stop()



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


def healthy(base_url: str) -> bool:
    """``GET /health`` answers 200; ``False`` while nothing listens there yet."""
    return http_ok(f"{base_url}/health", timeout=2)


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
