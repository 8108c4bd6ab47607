"""Real gateway processes for the end-to-end tests, on the local or Docker backend.

Each gateway gets its own installation name, so the sandboxes and Redis keys of
one test never meet another's, and teardown removes exactly what the test made:
the gateway (SIGTERM, then the process group), every sandbox of its
installation, and for Docker its containers and volumes. A plugin (``tests/conftest.py``).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.processes import Process, ProcessFailed, free_port
from harness.sse import WireEvent, turn_stream, wire_events
from hosting.gateway.routing.memory import MemoryRoutingStore
from hosting.gateway.routing.protocols import RoutingStore
from hosting.gateway.routing.redis import RedisRoutingStore
from tests.support import ROOT
from tests.support.servers import LocalModel, agent_env

ALICE, BOB, ADMIN = "alice-token-1f9e", "bob-token-77c2", "admin-token-5d0a"
TENANTS = f"{ALICE}:alice,{BOB}:bob"


def auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


class OpenTurn:
    """A turn whose stream the test holds open: read up to its ``session`` event at once,
    then read it to the end (:meth:`finish`) or leave mid-stream (:meth:`drop`)."""

    def __init__(self, url: str, session_id: str, prompt: str, token: str = ALICE) -> None:
        self._client = httpx.Client(timeout=120)
        self._connection = turn_stream(self._client, url, session_id, prompt, auth(token))
        source = self._connection.__enter__()
        assert source.response.status_code == 200, source.response.read()
        self._events: Iterator[WireEvent] = wire_events(source)
        self.events: list[tuple[str, dict[str, Any]]] = []
        first = next(self._events)
        self.events.append((first["event"], first["data"]))
        assert self.kinds == ["session"]

    @property
    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]

    @property
    def text(self) -> str:
        return "".join(data.get("text", "") for kind, data in self.events if kind == "text")

    def finish(self) -> list[str]:
        """Read to the end of the stream; the kinds of every event."""
        self.events += [(event["event"], event["data"]) for event in self._events]
        self.drop()
        return self.kinds

    def drop(self) -> None:
        self._connection.__exit__(None, None, None)
        self._client.close()


@contextmanager
def open_turn(url: str, session_id: str, prompt: str, token: str = ALICE) -> Iterator[OpenTurn]:
    held = OpenTurn(url, session_id, prompt, token)
    try:
        yield held
    finally:
        held.drop()


@dataclass
class GatewayProcess:
    env: dict[str, str]
    data_dir: Path
    port: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"gateway-{self.port}.log"

    def start(self, wait_pool: bool = True) -> GatewayProcess:
        self.process = Process([sys.executable, "-m", "hosting.gateway"], log_path=self.log_path, name="gateway",
                               cwd=ROOT, env={**self.env, "PORT": str(self.port)})
        self.process.wait_http(f"{self.base_url}/health", timeout=60)
        if wait_pool:
            self.wait_pool_full()
        return self

    def wait_pool_full(self, timeout: float = 180) -> None:
        """Until the warm pool holds its current target (the error says the pool's status,
        with the gateway's log)."""
        assert self.process is not None
        status: dict[str, Any] = {}

        def full() -> bool:
            status.update(self.pool())
            return len(status["sandboxes"]) >= status["target"]

        try:
            self.process.wait_until(full, timeout)
        except ProcessFailed as exc:
            raise AssertionError(f"warm pool not full ({status}): {exc}") from None

    def log(self) -> str:
        return self.process.log() if self.process else ""

    def admin(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.base_url}/admin/{path}", headers=auth(ADMIN), timeout=10)

    def pool(self) -> dict[str, Any]:
        return self.admin("pool").json()

    def route(self, session_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        response = self.admin(f"sessions/{session_id}" + (f"?tenant={tenant}" if tenant else ""))
        return None if response.status_code == 404 else response.json()

    def sandboxes(self) -> list[dict[str, Any]]:
        return self.admin("sandboxes").json()["sandboxes"]

    def terminate(self, timeout: float = 60) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self) -> None:
        """Teardown: SIGTERM and up to 30 s to drain, then the whole process group."""
        if self.process is not None:
            self.process.stop(signal.SIGTERM, grace=30)


@dataclass
class Gateways:
    """Factory of gateways sharing one installation (so replicas see one another's sandboxes)."""

    local_model: LocalModel
    root: Path
    backend: str
    image: str | None
    scope: str = "session"
    """``GATEWAY_SANDBOX_SCOPE`` of the gateways started: a sandbox per session, or per tenant's sessions."""
    installation: str = field(default_factory=lambda: f"t{secrets.token_hex(4)}")
    started: list[GatewayProcess] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        env = agent_env(self.local_model, self.root / "unused")
        env = {k: v for k, v in env.items() if not k.startswith(("AGENT_", "HOST", "GATEWAY_"))}
        env.update({"HOST": "127.0.0.1", "GATEWAY_TENANTS": TENANTS, "GATEWAY_ADMIN_TOKEN": ADMIN,
                    "GATEWAY_BACKEND": self.backend, "GATEWAY_DATA_DIR": str(self.root / "gateway-data"),
                    "GATEWAY_INSTALLATION": self.installation, "GATEWAY_WARM_POOL": "1",
                    "GATEWAY_PROVISION_TIMEOUT_SECONDS": "90", "SOME_GATEWAY_SECRET": "must-not-leak",
                    "GATEWAY_SANDBOX_SCOPE": self.scope})
        if self.backend == "docker":
            assert self.image is not None
            env.update({"GATEWAY_DOCKER_IMAGE": self.image, "GATEWAY_DOCKER_NETWORK": "host"})
        env.update(extra)
        # A test's pool stays at its size (the sandboxes a test starts are the ones it says);
        # a test of a pool that follows demand sets its max.
        env.setdefault("GATEWAY_WARM_POOL_MAX", env["GATEWAY_WARM_POOL"])
        return env

    def start(self, wait_pool: bool = True, **extra: str) -> GatewayProcess:
        gateway = GatewayProcess(self.env(**extra), self.root / "gateway-data")
        self.started.append(gateway)
        return gateway.start(wait_pool=wait_pool)

    def kill_sandbox(self, sandbox_id: str, pid: int | None) -> None:
        """Kill a sandbox the way a crash would: SIGKILL its server / ``docker kill``."""
        if self.backend == "docker":
            import docker

            docker.from_env().containers.get(f"agent-{sandbox_id}").kill()
        else:
            assert pid is not None
            os.kill(pid, signal.SIGKILL)

    def sandbox_alive(self, sandbox_id: str, pid: int | None) -> bool:
        if self.backend == "docker":
            import docker

            client = docker.from_env()
            found = client.containers.list(filters={"label": f"research-agent.sandbox={sandbox_id}"})
            return bool(found)
        assert pid is not None
        try:
            state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        return state != "Z"

    def cleanup(self) -> None:
        for gateway in self.started:
            gateway.stop()
        if self.backend == "docker":
            import asyncio

            from hosting.sandboxes.docker import DockerBackend

            async def remove() -> None:
                backend = DockerBackend(image=self.image or "", installation=self.installation, network="host",
                                        memory_bytes=None, nano_cpus=None)
                await backend.remove_installation()
                await backend.aclose()

            asyncio.run(remove())
        records = self.root / "gateway-data" / "sandboxes"
        for record in records.glob("*.json") if records.exists() else []:
            pid = json.loads(record.read_text()).get("pid")
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture(params=["local", pytest.param("docker", marks=pytest.mark.docker)])
def gateways(request: pytest.FixtureRequest, local_model: LocalModel, tmp_path: Path) -> Iterator[Gateways]:
    """Gateways on each backend (the same tests run on both)."""
    image = request.getfixturevalue("agent_image") if request.param == "docker" else None
    factory = Gateways(local_model, tmp_path, request.param, image)
    yield factory
    factory.cleanup()


@pytest.fixture(params=["local", pytest.param("docker", marks=pytest.mark.docker), "local-tenant"])
def scoped_gateways(request: pytest.FixtureRequest, local_model: LocalModel, tmp_path: Path) -> Iterator[Gateways]:
    """Gateways on each backend in session scope, and on the local one in tenant scope: for the
    tests of what the scope changes (provisioning, replacement, reaping, deletion). Tenant scope
    is backend-agnostic logic, so it does not run on Docker too."""
    backend, _, scope = str(request.param).partition("-")
    image = request.getfixturevalue("agent_image") if backend == "docker" else None
    factory = Gateways(local_model, tmp_path, backend, image, scope or "session")
    yield factory
    factory.cleanup()


@pytest.fixture
def local_gateways(local_model: LocalModel, tmp_path: Path) -> Iterator[Gateways]:
    """Gateways on the local backend only (for tests of backend-agnostic logic)."""
    factory = Gateways(local_model, tmp_path, "local", None)
    yield factory
    factory.cleanup()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.stores)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[RoutingStore]:
    """Each routing store: in memory, and Redis for real (own key prefix per test)."""
    if request.param == "memory":
        yield MemoryRoutingStore()
        return
    redis_store = RedisRoutingStore(request.getfixturevalue("redis_url"), installation=f"t{secrets.token_hex(4)}")
    yield redis_store
    await redis_store.aclose()


@pytest.fixture
def docker_gateways(agent_image: str, local_model: LocalModel, tmp_path: Path) -> Iterator[Gateways]:
    """Gateways on the Docker backend only (for what only containers do, like outliving their gateway)."""
    factory = Gateways(local_model, tmp_path, "docker", agent_image)
    yield factory
    factory.cleanup()
